"""End to end: the tiny profile through real DVC — repro, then `dvc exp run -S alpha=...` re-runs only what
alpha touches, and `dvc metrics diff` shows the change."""

import json
import os
import re
import shutil
import subprocess
import sys
from pathlib import Path

import pytest
import yaml

from kd.arms import student_arms
from kd.profiles import load as load_profile

ROOT = Path(__file__).resolve().parents[1]
# two strategies keep the test quick; every stage kind still runs (the full tiny profile is `kd verify`'s job)
STRATEGIES = ["none", "gold_hint"]


def _project_files():
    out = subprocess.run(["git", "ls-files", "-co", "--exclude-standard"], cwd=ROOT, capture_output=True,
                         text=True, check=True).stdout.split()
    return [f for f in out if not f.startswith(("metrics/", "reports/", "dvc.lock")) and (ROOT / f).is_file()]


def _run(cmd, cwd, env):
    res = subprocess.run(cmd, cwd=cwd, env=env, capture_output=True, text=True)
    assert res.returncode == 0, f"{' '.join(cmd)} failed:\n{res.stdout[-3000:]}\n{res.stderr[-3000:]}"
    return res.stdout + res.stderr


@pytest.fixture(scope="module")
def project(tmp_path_factory):
    root = tmp_path_factory.mktemp("project")
    for f in _project_files():
        (root / f).parent.mkdir(parents=True, exist_ok=True)
        shutil.copy2(ROOT / f, root / f)
    params = load_profile("tiny", ROOT)
    params["prompting"]["strategies"] = STRATEGIES
    (root / "params.yaml").write_text(yaml.safe_dump(params, sort_keys=False))
    env = {**os.environ, "PATH": f"{Path(sys.executable).parent}{os.pathsep}{os.environ['PATH']}",
           "DVC_NO_ANALYTICS": "1", "GIT_AUTHOR_NAME": "t", "GIT_AUTHOR_EMAIL": "t@t",
           "GIT_COMMITTER_NAME": "t", "GIT_COMMITTER_EMAIL": "t@t"}
    _run(["git", "init", "-q"], root, env)
    if not (root / ".dvc").exists():
        _run(["dvc", "init", "-q"], root, env)
    _run(["dvc", "config", "core.analytics", "false"], root, env)
    _run(["git", "add", "-A"], root, env)
    _run(["git", "commit", "-qm", "project"], root, env)  # dvclive refuses a repo without commits
    out = _run(["dvc", "repro"], root, env)
    _run(["git", "add", "-A"], root, env)
    _run(["git", "commit", "-qm", "tiny run"], root, env)
    return root, env, out


def test_repro_produces_every_output(project):
    root, env, _ = project
    for s in STRATEGIES:
        responses = [json.loads(l) for l in (root / f"data/teacher/{s}/responses.jsonl").read_text().splitlines()]
        assert [r["id"] for r in responses] == sorted(r["id"] for r in responses)
        assert json.loads((root / f"data/logits/{s}/manifest.json").read_text())["recompute_max_abs_diff"] == 0.0
        assert (root / f"models/kd-{s}/adapter_model.safetensors").exists()
        assert json.loads((root / f"metrics/distill/{s}.json").read_text())["steps"] > 0
    assert (root / "models/finetune/adapter_model.safetensors").exists()  # the fine-tune control
    for m in ["teacher", "student", "student_cot", "finetune"] + [f"kd-{s}" for s in STRATEGIES]:
        metrics = json.loads((root / f"metrics/eval/{m}.json").read_text())
        assert 0.0 <= metrics["accuracy_strict"] <= 1.0 and metrics["n"] == 8 and "truncated" in metrics
    # one attention stage per student arm (kd.arms), and the report's table is exactly their rows
    arms = student_arms(STRATEGIES)
    per_arm = [r for a in arms for r in json.loads((root / f"reports/attention/{a}.json").read_text())]
    assert [r["model"] for r in per_arm] == [a for a in arms for _ in range(2)]  # the tiny student has 2 layers
    table = json.loads((root / "reports/attention.json").read_text())
    assert [(r["model"], r["layer"]) for r in table] == [(r["model"], r["layer"]) for r in per_arm]
    assert table[0]["entropy_norm"] == pytest.approx(per_arm[0]["entropy_norm"], rel=1e-5)
    report = json.loads((root / "metrics/report.json").read_text())
    assert set(report) == {"best_arm", "finetune", *(f"kd-{s}" for s in STRATEGIES)}
    assert (root / "reports/index.html").exists() and (root / "reports/index.md").exists()
    assert "accuracy" in (root / "reports/index.md").read_text().lower()
    status = _run(["dvc", "status"], root, env)
    assert "up to date" in status.lower() or status.strip() == ""


def test_dry_run_shows_what_a_change_will_rerun(project):
    """`kd repro --dry --force-downstream` (README): after a temperature change, the stages a real run re-runs,
    listed without running any (dvc.lock and params.yaml untouched); kd.dvc_compat is DVC with its dry-run fix."""
    root, env, _ = project
    params = (root / "params.yaml").read_text()
    lock = (root / "dvc.lock").read_bytes()
    try:
        (root / "params.yaml").write_text(re.sub(r"(?m)^temperature: .*$", "temperature: 2.0", params))
        env = {**env, "PYTHONPATH": str(root)}
        out = _run([sys.executable, "-m", "kd.cli", "repro", "--dry", "--force-downstream"], root, env)
        ran = set(re.findall(r"Running stage '([^']+)'", out))
        assert ran == {f"{stage}@{s}" for stage in ("distill", "eval_kd", "attention_kd") for s in STRATEGIES} | {
            "report"}, out
        assert (root / "dvc.lock").read_bytes() == lock
    finally:
        (root / "params.yaml").write_text(params)


def test_alpha_change_reruns_only_what_alpha_touches(project):
    root, env, _ = project
    out = _run(["dvc", "exp", "run", "-S", "alpha=0.3"], root, env)
    ran = set(re.findall(r"Running stage '([^']+)'", out))
    expected = {f"{stage}@{s}" for stage in ("distill", "eval_kd", "attention_kd") for s in STRATEGIES} | {"report"}
    assert ran == expected, out
    diff = _run(["dvc", "metrics", "diff"], root, env)
    assert "metrics/distill/none.json" in diff and "final_loss" in diff, diff

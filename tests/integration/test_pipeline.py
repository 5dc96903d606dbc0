"""End to end: the tiny profile through real DVC — repro, then `dvc exp run -S alpha=...` re-runs only what
alpha touches, and `dvc metrics diff` shows the change."""

import json
import re
import sys

import pytest
from stage_runner import dvc_project, run_cmd

from kd.config.arms import student_arms

pytestmark = pytest.mark.slow  # the tiny pipeline end to end through real DVC (minutes)

# two strategies keep the test quick; every stage kind still runs (the full tiny profile is `kd verify`'s job)
STRATEGIES = ["none", "gold_hint"]


@pytest.fixture(scope="module")
def project(tmp_path_factory):
    return dvc_project(tmp_path_factory.mktemp("project"), STRATEGIES)


def test_repro_produces_every_output(project):
    root, env, _ = project
    for s in STRATEGIES:
        responses = [json.loads(l) for l in (root / f"data/teacher/{s}/responses.jsonl").read_text().splitlines()]
        assert [r["id"] for r in responses] == sorted(r["id"] for r in responses)
        assert json.loads((root / f"data/logits/{s}/manifest.json").read_text())["recompute_max_abs_diff"] == 0.0
        assert (root / f"models/kd-{s}/adapter_model.safetensors").exists()
        assert json.loads((root / f"results/distill/{s}.json").read_text())["steps"] > 0
    assert (root / "models/finetune/adapter_model.safetensors").exists()  # the fine-tune control
    for m in ["teacher", "student", "student_cot", "finetune"] + [f"kd-{s}" for s in STRATEGIES]:
        metrics = json.loads((root / f"results/eval/{m}.json").read_text())
        assert 0.0 <= metrics["accuracy_strict"] <= 1.0 and metrics["n"] == 8 and "truncated" in metrics
    for kind in ("strict", "flexible"):  # the headline: one row per arm and per teacher strategy, same keys
        rows = {p.stem: json.loads(p.read_text()) for p in (root / "metrics" / kind).glob("*.json")}
        assert set(rows) == {"teacher", "student", "student_cot", "finetune", *(f"kd-{s}" for s in STRATEGIES),
                             *(f"teacher@{s}" for s in STRATEGIES)}
        assert all(set(r) == {"acc", "lo", "hi"} for r in rows.values()), rows
    # the paper's comparisons (issue 19), read from the committed per-question rows results/eval/<arm>.jsonl
    compare = {p.relative_to(root / "metrics/compare").as_posix() for p in (root / "metrics/compare").rglob("*.json")}
    assert compare == {"priming/kd-gold_hint.json", "teacher/kd-none.json", "teacher/kd-gold_hint.json",
                       "training/finetune.json", "training/kd-none.json", "training/kd-gold_hint.json"}, compare
    md = (root / "reports/index.md").read_text()
    assert [x for x in md.splitlines() if x.startswith("## ")][1].startswith("## KD with a priming strategy")
    # `dvc metrics show` is one narrow table (DVC makes a column of every key any metrics file has)
    shown = run_cmd(["dvc", "metrics", "show"], root, env)
    assert max(map(len, shown.splitlines())) <= 120, shown
    # one attention stage per student arm (kd.config.arms), and the report's table is exactly their rows
    arms = student_arms(STRATEGIES)
    per_arm = [r for a in arms for r in json.loads((root / f"reports/attention/{a}.json").read_text())]
    assert [r["model"] for r in per_arm] == [a for a in arms for _ in range(2)]  # the tiny student has 2 layers
    table = json.loads((root / "reports/attention.json").read_text())
    assert [(r["model"], r["layer"]) for r in table] == [(r["model"], r["layer"]) for r in per_arm]
    assert table[0]["entropy_norm"] == pytest.approx(per_arm[0]["entropy_norm"], rel=1e-5)
    for a in arms:  # each attention stage records its environment, like every stage that runs model math
        assert json.loads((root / f"environment/attention-{a}.json").read_text())["stage"] == f"attention-{a}"
    assert (root / "reports/index.html").exists() and (root / "reports/index.md").exists()
    assert "accuracy" in (root / "reports/index.md").read_text().lower()
    status = run_cmd(["dvc", "status"], root, env)
    assert "up to date" in status.lower() or status.strip() == ""


def test_dry_run_shows_what_a_change_will_rerun(project):
    """`kd repro --dry --force-downstream` (README): after a temperature change, the stages a real run re-runs,
    listed without running any (dvc.lock and params.yaml untouched); kd repro runs DVC through kd.harness.dvc_compat."""
    root, env, _ = project
    params = (root / "params.yaml").read_text()
    lock = (root / "dvc.lock").read_bytes()
    try:
        (root / "params.yaml").write_text(re.sub(r"(?m)^temperature: .*$", "temperature: 2.0", params))
        env = {**env, "PYTHONPATH": str(root)}
        out = run_cmd([sys.executable, "-m", "kd.tools.cli", "repro", "--dry", "--force-downstream"], root, env)
        ran = set(re.findall(r"Running stage '([^']+)'", out))
        # a dry run cannot know that the validate stage's output will not change, so with --force-downstream it lists
        # everything after it; a real run re-runs only what temperature touches (test_alpha_change_... below)
        assert {f"{stage}@{s}" for stage in ("distill", "eval_kd", "attention_kd") for s in STRATEGIES} | {
            "report", "validate"} <= ran, out
        assert (root / "dvc.lock").read_bytes() == lock
    finally:
        (root / "params.yaml").write_text(params)


def test_alpha_change_reruns_only_what_alpha_touches(project):
    root, env, _ = project
    out = run_cmd(["dvc", "exp", "run", "-S", "alpha=0.3"], root, env)
    ran = set(re.findall(r"Running stage '([^']+)'", out))
    # the KD arms and the control (its CE weight is alpha: it is the KD arms minus the teacher term), what reads them,
    # and the validate stage (every param; its output does not change, so it re-runs nothing by itself)
    expected = {f"{stage}@{s}" for stage in ("distill", "eval_kd", "attention_kd") for s in STRATEGIES} | {
        "finetune", "eval_finetune", "attention_finetune", "report", "validate"}
    assert ran == expected, out
    diff = run_cmd(["dvc", "metrics", "diff"], root, env)  # the headline: only what changed, if anything did
    assert all(len(line) <= 120 for line in diff.splitlines()) and "results/" not in diff, diff
    before = json.loads(run_cmd(["git", "show", "HEAD:results/distill/none.json"], root, env))  # the detail did change
    assert json.loads((root / "results/distill/none.json").read_text())["final_loss"] != before["final_loss"]

"""Sweeps on the DVC queue (README "Sweeps"): two α values queued as experiments on the tiny profile, run by DVC's
queue worker, then compared with `dvc exp show --json` and `dvc metrics diff`. The teacher and its signal are reused
from the baseline run: the queued experiments re-run only distil, eval_kd and report."""

import json
import os
import re
import shutil
import subprocess
import sys
from pathlib import Path

import pytest
import yaml

ROOT = Path(__file__).resolve().parents[1]
ALPHAS = ["0.2", "0.9"]


def _run(cmd, cwd, env):
    res = subprocess.run(cmd, cwd=cwd, env=env, capture_output=True, text=True)
    assert res.returncode == 0, f"{' '.join(cmd)} failed:\n{res.stdout[-3000:]}\n{res.stderr[-3000:]}"
    return res.stdout + res.stderr


@pytest.fixture(scope="module")
def queued(tmp_path_factory):
    root = tmp_path_factory.mktemp("queue")
    files = subprocess.run(["git", "ls-files", "-co", "--exclude-standard"], cwd=ROOT, capture_output=True,
                           text=True, check=True).stdout.split()
    for f in files:
        if not f.startswith(("metrics/", "reports/", "dvc.lock")) and (ROOT / f).is_file():
            (root / f).parent.mkdir(parents=True, exist_ok=True)
            shutil.copy2(ROOT / f, root / f)
    params = yaml.safe_load((ROOT / "profiles/tiny.yaml").read_text())
    params["prompting"]["strategies"] = ["none"]   # one strategy: the grid's other axis is the same mechanism
    (root / "params.yaml").write_text(yaml.safe_dump(params, sort_keys=False))
    env = {**os.environ, "PATH": f"{Path(sys.executable).parent}{os.pathsep}{os.environ['PATH']}",
           "DVC_NO_ANALYTICS": "1", "GIT_AUTHOR_NAME": "t", "GIT_AUTHOR_EMAIL": "t@t",
           "GIT_COMMITTER_NAME": "t", "GIT_COMMITTER_EMAIL": "t@t"}
    _run(["git", "init", "-q"], root, env)
    if not (root / ".dvc").exists():
        _run(["dvc", "init", "-q"], root, env)
    _run(["dvc", "config", "core.analytics", "false"], root, env)
    _run(["git", "add", "-A"], root, env)
    _run(["git", "commit", "-qm", "project"], root, env)
    _run(["dvc", "repro"], root, env)
    _run(["git", "add", "-A"], root, env)
    _run(["git", "commit", "-qm", "baseline"], root, env)
    names = []
    for a in ALPHAS:
        name = f"alpha-{a.replace('.', '')}"
        _run(["dvc", "exp", "run", "--queue", "-n", name, "-S", f"alpha={a}"], root, env)
        names.append(name)
    # the README's sweep command: one worker, runs the queue to the end (--run-all waits for it)
    _run(["dvc", "exp", "run", "--run-all", "-j", "1"], root, env)
    return root, env, names


def test_queued_experiments_ran_and_differ(queued):
    root, env, names = queued
    shown = json.loads(_run(["dvc", "exp", "show", "--json"], root, env))
    baseline = shown[0]
    exps = {e["name"]: e for e in baseline["experiments"] or []}
    assert set(names) <= set(exps), exps.keys()
    by_alpha, teacher_outs = {}, set()
    for name in names:
        rev = exps[name]["revs"][0]
        assert rev["data"]["status"] == "Success" if "status" in rev["data"] else True, rev
        data = rev["data"]
        alpha = data["params"]["params.yaml"]["data"]["alpha"]
        distill = data["metrics"]["metrics/distill/none.json"]["data"]
        assert distill["steps"] > 0
        by_alpha[alpha] = distill["final_loss"]
        teacher_outs.add(json.dumps(data["outs"]["data/teacher/none"], sort_keys=True))
        teacher_outs.add(json.dumps(data["outs"]["data/logits/none"], sort_keys=True))
    assert sorted(by_alpha) == sorted(float(a) for a in ALPHAS), by_alpha
    assert len(set(by_alpha.values())) == 2, by_alpha   # different α, different distillation loss
    base = baseline["data"]
    teacher_outs.add(json.dumps(base["outs"]["data/teacher/none"], sort_keys=True))
    teacher_outs.add(json.dumps(base["outs"]["data/logits/none"], sort_keys=True))
    assert len(teacher_outs) == 2, teacher_outs   # teacher and logits outputs identical to the baseline's
    diff = _run(["dvc", "metrics", "diff", names[0], names[1], "--json"], root, env)
    assert "final_loss" in json.loads(diff)["metrics/distill/none.json"], diff


def test_queued_experiments_reused_the_teacher(queued):
    root, env, names = queued
    for name in names:
        log = _run(["dvc", "queue", "logs", name], root, env)
        ran = set(re.findall(r"Running stage '([^']+)'", log))
        assert ran == {"distill@none", "eval_kd@none", "report"}, log[-3000:]

"""Sweeps on the DVC queue (README "Sweeps"): two α values queued as experiments on the tiny profile, run by DVC's
queue worker, then compared with `dvc exp show --json`, the experiments' commits and `dvc metrics diff`. The teacher and its signal are reused
from the baseline run: the queued experiments re-run only distil, eval_kd and report."""

import json
import re

import pytest
from stage_runner import dvc_project, run_cmd

pytestmark = pytest.mark.slow  # two queued DVC experiments run on the tiny profile (minutes)

ALPHAS = ["0.2", "0.9"]


@pytest.fixture(scope="module")
def queued(tmp_path_factory):
    # one strategy: the grid's other axis is the same mechanism (prompting.strategies is a matrix)
    root, env, _ = dvc_project(tmp_path_factory.mktemp("queue"), ["none"])
    names = []
    for a in ALPHAS:
        name = f"alpha-{a.replace('.', '')}"
        run_cmd(["dvc", "exp", "run", "--queue", "-n", name, "-S", f"alpha={a}"], root, env)
        names.append(name)
    # the README's sweep command: one worker, runs the queue to the end (--run-all waits for it)
    run_cmd(["dvc", "exp", "run", "--run-all", "-j", "1"], root, env)
    return root, env, names


def test_queued_experiments_ran_and_differ(queued):
    root, env, names = queued
    shown = json.loads(run_cmd(["dvc", "exp", "show", "--json"], root, env))
    baseline = next(x for x in shown if x.get("experiments"))   # the commit the queue ran from (not the workspace)
    exps = {e["name"]: e for e in baseline["experiments"] or []}
    assert set(names) <= set(exps), exps.keys()
    by_alpha, teacher_outs = {}, set()
    for name in names:
        rev = exps[name]["revs"][0]
        assert rev["error"] is None, rev["error"]
        data = rev["data"]
        alpha = data["params"]["params.yaml"]["data"]["alpha"]
        # the distill details are a git-tracked (cache: false) output: in the experiment's commit
        distill = json.loads(run_cmd(["git", "show", f"{rev['rev']}:results/distill/none.json"], root, env))
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
    diff = json.loads(run_cmd(["dvc", "metrics", "diff", names[0], names[1], "--json"], root, env))
    assert all(path.startswith("metrics/") for path in diff), diff   # the headline only: whatever changed


def test_queued_experiments_reused_the_teacher(queued):
    root, env, names = queued
    for name in names:
        log = run_cmd(["dvc", "queue", "logs", name], root, env)
        ran = set(re.findall(r"Running stage '([^']+)'", log))
        assert ran == {"distill@none", "eval_kd@none", "attention_kd@none", "finetune", "eval_finetune",
                       "attention_finetune", "report", "validate"}, log[-3000:]

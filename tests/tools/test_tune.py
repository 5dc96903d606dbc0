"""`kd tune` on the tiny profile: a three-trial study, resume after SIGKILL mid-trial, two processes sharing one
SQLite study, the eval split never needed (deleted for the whole module), and `--apply` invalidating only distill
and later stages. Trials are real: LoRA distillation on the tiny pair, validation gold NLL, Optuna RDB storage."""

import json
import os
import re
import signal
import subprocess
import sys
import time
from pathlib import Path

import optuna
import pytest
import yaml
from click.testing import CliRunner
from stage_runner import in_process  # stages/<name>.py run in this process

from kd.config.profiles import load as load_profile
from kd.harness.dvc_project import make_copy, placeholder_outputs, tool_env
from kd.tools.cli import cli

ROOT = Path(__file__).resolve().parents[2]
pytestmark = pytest.mark.slow


def params(root: Path, epochs: int = 1, **tune) -> dict:
    p = load_profile("tiny", ROOT)
    p["prompting"]["strategies"] = ["none"]
    p["distill"]["epochs"] = epochs  # 8 steps an epoch: the tests are about the study, not the training
    p["tune"].update({"objective": "nll", "report_every": 2, "heartbeat": 1, **tune})
    (root / "params.yaml").write_text(yaml.safe_dump(p, sort_keys=False), encoding="utf-8")
    return p


@pytest.fixture(scope="module")
def project(tmp_path_factory):
    root = make_copy(ROOT, tmp_path_factory.mktemp("tune") / "project")
    params(root)
    for args in (("prepare",), ("model", "teacher"), ("model", "student"), ("teacher", "none"), ("logits", "none")):
        in_process(root, *args)
    (root / "data/prepared/eval.jsonl").unlink()  # tuning must never need (nor read) the eval split
    return root


def kd(root: Path, *args: str, **popen) -> subprocess.Popen:
    """`kd ARGS` as its own process, importing the project copy's kd."""
    return subprocess.Popen([sys.executable, "-m", "kd.tools.cli", *args], cwd=root, env=tool_env(root=root),
                            stdout=subprocess.PIPE, stderr=subprocess.STDOUT, text=True, **popen)


def trials(root: Path, p: dict) -> list[optuna.trial.FrozenTrial]:
    from kd.config.params import parse
    from kd.tools.tune.storage import study_name

    url = p["tune"]["storage"].replace("sqlite:///", f"sqlite:///{root}/")
    return optuna.load_study(study_name=study_name(parse(p)), storage=url).get_trials()


def counted(ts) -> list:
    return [t for t in ts if t.state in (optuna.trial.TrialState.COMPLETE, optuna.trial.TrialState.PRUNED)]


def test_three_trial_study(project):
    p = params(project, storage="sqlite:///tune/three.db")
    out = kd(project, "tune").communicate(timeout=600)[0]
    assert "expected wall time: 3 trial(s)" in out, out
    assert [line.split(":")[0] for line in out.splitlines() if "finished]" in line or "pruned at" in line] == \
        ["trial 0", "trial 1", "trial 2"], out
    ts = trials(project, p)
    done = [t for t in ts if t.state == optuna.trial.TrialState.COMPLETE]
    assert [t.number for t in done][:2] == [0, 1] and len(counted(ts)) == 3  # startup trials are never pruned
    for t in done:
        assert sorted(t.intermediate_values) == [2, 4, 6, 8]  # every report_every steps, kept in the database
        assert t.value == pytest.approx(t.intermediate_values[8])  # the final gold NLL is the objective
    for t in ts:
        assert 0 <= t.params["alpha"] <= 1 and 1 <= t.params["temperature"] <= 10
        if t.state == optuna.trial.TrialState.PRUNED:  # the median rule, checked by hand at the step it stopped
            step = max(t.intermediate_values)
            earlier = sorted(d.intermediate_values[step] for d in done if d.number < t.number)
            median = (earlier[(len(earlier) - 1) // 2] + earlier[len(earlier) // 2]) / 2
            assert t.intermediate_values[step] > median
    assert len({(t.params["alpha"], t.params["temperature"]) for t in ts}) == 3
    m = json.loads((project / "metrics/tune.json").read_text())
    best = min(done, key=lambda t: t.value)
    assert m["best"]["trial"] == best.number and m["best"]["params"] == best.params
    assert m["trials"]["complete"] == len(done) and m["split"] == "validation" and m["validation_questions"] == 4
    for name in ("history.png", "importance.png", "contour.png", "index.md"):
        assert (project / "reports/tune" / name).stat().st_size > 0
    assert "| paper | 0.609 | 5.94 |" in (project / "reports/tune/index.md").read_text()
    # the plots are byte-stable: rewriting them from the same study gives the same bytes
    before = {f.name: f.read_bytes() for f in (project / "reports/tune").iterdir()}
    assert kd(project, "tune", "--report").wait(timeout=300) == 0
    assert before == {f.name: f.read_bytes() for f in (project / "reports/tune").iterdir()}
    # running again does nothing: the study already holds n_trials finished trials
    out = kd(project, "tune").communicate(timeout=300)[0]
    assert "3 finished trial(s), 0 to run" in out and len(trials(project, p)) == 3
    assert not (project / "data/prepared/eval.jsonl").exists()


def test_resume_after_sigkill(project):
    # 6 epochs (48 steps) a trial, so the second trial stays mid-way long enough for a poll to see it on a fast
    # machine (with 8 steps it finished between two polls in CI)
    p = params(project, epochs=6, storage="sqlite:///tune/killed.db")
    proc = kd(project, "tune")
    killed = None
    deadline = time.time() + 300
    while time.time() < deadline and killed is None:  # kill in the middle of the second trial's training
        time.sleep(0.05)
        assert proc.poll() is None, "the study finished before a trial was seen mid-way:\n" + proc.stdout.read()
        try:
            ts = trials(project, p)
        except Exception:  # the study or its database is not created yet
            continue
        running = [t for t in ts if t.state == optuna.trial.TrialState.RUNNING and t.intermediate_values]
        if counted(ts) and running:
            proc.send_signal(signal.SIGKILL)
            proc.wait()
            killed = running[0]
    assert killed is not None, "no trial was seen mid-way"
    time.sleep(2 * p["tune"]["heartbeat"] + 1)  # the killed trial's heartbeat goes stale
    out = kd(project, "tune").communicate(timeout=600)[0]
    assert f"(retry of {killed.number})" in out, out
    ts = trials(project, p)
    assert len(counted(ts)) == 3  # nothing lost, nothing counted twice
    failed = [t for t in ts if t.state == optuna.trial.TrialState.FAIL]
    assert [t.number for t in failed] == [killed.number]
    assert failed[0].intermediate_values  # what the killed trial measured is kept for inspection
    retry = [t for t in ts if t.system_attrs.get("failed_trial") == killed.number]
    assert len(retry) == 1 and retry[0] in counted(ts)
    assert retry[0].params == killed.params
    assert json.loads((project / "metrics/tune.json").read_text())["trials"]["fail"] == 1


def test_two_workers_share_one_sqlite_study(project):
    p = params(project, storage="sqlite:///tune/shared.db", n_trials=4)
    procs = [kd(project, "tune") for _ in range(2)]
    outs = [pr.communicate(timeout=600)[0] for pr in procs]
    assert [pr.returncode for pr in procs] == [0, 0], outs
    ts = trials(project, p)
    # MaxTrialsCallback stops both once 4 are finished; a trial already started in the other process may finish too
    assert 4 <= len(counted(ts)) <= 5 and all(t.state != optuna.trial.TrialState.FAIL for t in ts)
    workers = {t.user_attrs["worker"] for t in ts}
    assert workers == {f"{os.uname().nodename}:{pr.pid}" for pr in procs}  # both did trials of the one study
    assert len({(t.params["alpha"], t.params["temperature"]) for t in ts}) == len(ts)  # no point proposed twice


def test_accuracy_objective_scores_validation_with_lm_eval(project):
    p = params(project, storage="sqlite:///tune/accuracy.db", n_trials=1, objective="accuracy")
    out = kd(project, "tune").communicate(timeout=600)[0]
    assert "validation error (1 - strict accuracy)" in out and "[1/1 finished]" in out, out
    (t,) = trials(project, p)
    assert 0 <= t.user_attrs["accuracy_strict"] <= 1 and t.user_attrs["gold_nll"] > 0
    assert t.value == pytest.approx(1 - t.user_attrs["accuracy_strict"])  # minimised error, not a loss
    m = json.loads((project / "metrics/tune.json").read_text())
    assert m["objective"] == "accuracy" and m["best"]["accuracy_strict"] == t.user_attrs["accuracy_strict"]
    assert not (project / "data/prepared/eval.jsonl").exists()


# ------------------------------------------------------------------------------ --apply and DVC experiments


@pytest.fixture(scope="module")
def ran(tmp_path_factory):
    """A tiny project that looks fully run (placeholders recorded in dvc.lock), in seconds."""
    root = make_copy(ROOT, tmp_path_factory.mktemp("tune-apply") / "project")
    placeholder_outputs(root)
    assert _stale(root) == []
    return root


def _stale(root: Path) -> list[str]:
    from kd.tools.tune.apply import dvc_stale

    return dvc_stale(root)


def _apply(root: Path, best: dict) -> str:
    (root / "metrics").mkdir(exist_ok=True)
    (root / "metrics/tune.json").write_text(json.dumps({"best": {"params": best}}))
    cwd = os.getcwd()
    os.chdir(root)
    try:
        res = CliRunner().invoke(cli, ["tune", "--apply"], catch_exceptions=False)
    finally:
        os.chdir(cwd)
    assert res.exit_code == 0, res.output
    return res.output


def test_apply_invalidates_only_distill_and_later(ran):
    original = (ran / "params.yaml").read_text()
    try:
        out = _apply(ran, {"alpha": 0.25, "temperature": 3.5})
        assert "alpha: 0.6093348343631224 -> 0.25" in out
        text = (ran / "params.yaml").read_text()
        assert re.search(r"^alpha: 0.25 +# weight of the hard \(CE\) loss", text, re.M)  # comments kept
        assert re.search(r"^temperature: 3.5 +# softmax temperature", text, re.M)
        assert [a for a, b in zip(original.splitlines(), text.splitlines()) if a != b] == \
            [line for line in original.splitlines() if line.startswith(("alpha:", "temperature:"))]
        # eval_kd@* follow from distill's outs; the fine-tune control weights its CE term by alpha, so it re-runs;
        # validate re-checks every param (its output is unchanged when they are valid, so it re-runs nothing)
        after_alpha = ["distill@none", "distill@teacher", "finetune", "report", "validate"]
        assert _stale(ran) == after_alpha
        # lr and rank are shared with the control as well: the same stages, never teacher or logits
        _apply(ran, {"alpha": 0.25, "temperature": 3.5, "lr": 0.003, "lora_r": 8})
        p = yaml.safe_load((ran / "params.yaml").read_text())
        assert (p["distill"]["lr"], p["distill"]["lora"]["r"]) == (0.003, 8)
        assert _stale(ran) == after_alpha
    finally:
        (ran / "params.yaml").write_text(original)


def test_apply_without_a_study_says_so(ran, tmp_path):
    from kd.core.errors import KdError
    from kd.tools.tune.apply import apply_best

    with pytest.raises(KdError, match=r"metrics/tune.json: no study results; run `kd tune` first"):
        apply_best(tmp_path)


def test_trials_queue_as_dvc_experiments(ran):
    env = tool_env(root=ran)
    for a, t in (("0.3", "2.0"), ("0.7", "8.0")):
        subprocess.run(["dvc", "exp", "run", "--queue", "-S", f"alpha={a}", "-S", f"temperature={t}"], cwd=ran,
                       env=env, check=True, capture_output=True, text=True)
    try:
        status = subprocess.run(["dvc", "queue", "status"], cwd=ran, env=env, check=True, capture_output=True,
                                text=True).stdout
        assert status.count("Queued") == 2, status
    finally:
        subprocess.run(["dvc", "queue", "remove", "--all"], cwd=ran, env=env, capture_output=True)

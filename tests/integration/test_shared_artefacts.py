"""Shared artefacts through a DVC remote, and `kd verify --committed`, end to end on the tiny profile.

One `dvc repro` (tiny) in project A, committed and pushed to a local-directory remote; a colleague's clone B gets
everything with `dvc pull`: `dvc status` clean, every output byte-identical, nothing recomputed. Then
`kd verify --committed` re-runs teacher@none in a fresh clone of A: identical on this machine; after a committed
output is perturbed it fails (same environment fingerprint), and with a committed fingerprint of another machine
it gives a drift report instead."""

from __future__ import annotations

import json
from pathlib import Path

import pytest

from kd.harness.dvc_project import make_copy, read_lock, run, tool_env
from kd.harness.verify_committed import drift_report, exit_code, render, verify_committed

ROOT = Path(__file__).resolve().parents[2]
pytestmark = pytest.mark.slow


def _outputs(root: Path) -> dict[str, bytes]:
    """Every file of every output dvc.lock lists, by path."""
    files = {}
    for stage in read_lock(root).values():
        for o in stage.get("outs", []):
            p = root / o["path"]
            for f in ([p] if p.is_file() else sorted(x for x in p.rglob("*") if x.is_file())):
                files[str(f.relative_to(root))] = f.read_bytes()
    return files


@pytest.fixture(scope="module")
def pushed(tmp_path_factory):
    base = tmp_path_factory.mktemp("shared")
    a = base / "a"
    env = tool_env(root=a)
    make_copy(ROOT, a, "tiny", env)
    run(["dvc", "repro"], a, env, timeout=1800)
    run(["dvc", "remote", "add", "-d", "shared", str(base / "remote")], a, env)
    run(["dvc", "push", "-q"], a, env)
    run(["git", "add", "-A"], a, env)
    run(["git", "commit", "-qm", "tiny run"], a, env)
    return base, a, env


def test_dvc_pull_gives_a_colleague_the_committed_outputs(pushed):
    base, a, _ = pushed
    b = base / "b"
    env = tool_env(root=b)
    run(["git", "clone", "-q", str(a), str(b)], base, env)
    assert not (b / "models").exists() and not (b / "data/teacher").exists()  # a clone has no outputs
    run(["dvc", "pull", "-q"], b, env)
    status = run(["dvc", "status"], b, env).stdout
    assert "up to date" in status, status
    assert _outputs(b) == _outputs(a)
    assert (b / "environment/teacher-none.json").read_bytes() == (a / "environment/teacher-none.json").read_bytes()
    headline = json.loads((b / "metrics/environment.json").read_text())
    assert headline["fingerprint"] not in ("mixed", "none recorded")
    # `dvc repro` after a pull recomputes nothing
    assert "Running stage" not in run(["dvc", "repro"], b, env).stdout


def test_verify_committed_identical_then_defect_then_drift(pushed):
    base, a, env = pushed
    checks = verify_committed(a, ["teacher@none"], workdir=base, echo=lambda s: None)
    assert [c.verdict for c in checks] == ["identical"], render(checks)
    assert checks[0].same_environment is True and exit_code(checks) == 0

    # perturb one committed output: the first response loses its last token
    resp = a / "data/teacher/none/responses.jsonl"
    rows = [json.loads(x) for x in resp.read_text().splitlines()]
    rows[0]["response_ids"] = rows[0]["response_ids"][:-1]
    resp.write_text("".join(json.dumps(r, sort_keys=True) + "\n" for r in rows))
    run(["dvc", "commit", "-f", "-q", "teacher@none"], a, env)
    run(["dvc", "push", "-q"], a, env)  # the clone pulls from the remote
    run(["git", "commit", "-qam", "perturbed"], a, env)
    checks = verify_committed(a, ["teacher@none"], workdir=base, echo=lambda s: None)
    assert checks[0].verdict.startswith("DIFFERS") and exit_code(checks) == 1, render(checks)
    assert "FAILED" in render(checks)

    # ... and say the committed results came from another machine: a drift report, not a failure
    envf = a / "environment/teacher-none.json"
    e = json.loads(envf.read_text())
    e["cpu"]["model"] = "Another CPU"
    envf.write_text(json.dumps(e, indent=2, sort_keys=True) + "\n")
    run(["dvc", "commit", "-f", "-q", "teacher@none"], a, env)
    run(["git", "commit", "-qam", "other machine"], a, env)
    checks = verify_committed(a, ["teacher@none"], workdir=base, echo=lambda s: None)
    c = checks[0]
    assert c.verdict == "drift (other environment)" and exit_code(checks) == 0, render(checks)
    assert c.drift["n"] == len(rows) and c.drift["identical_responses"] == len(rows) - 1
    assert 0.9 < c.drift["token_agreement"] < 1.0
    assert "DRIFT" in render(checks) and "token agreement" in render(checks)
    assert not list(base.glob("kd-verify-committed-*")), "the clones are removed"


def test_drift_report_against_a_hand_count():
    committed = {1: {"response_ids": [1, 2, 3, 4], "correct_strict": True, "correct_flexible": True},
                 2: {"response_ids": [5, 6], "correct_strict": False, "correct_flexible": True},
                 3: {"response_ids": [7], "correct_strict": False, "correct_flexible": False}}
    rerun = {1: {"response_ids": [1, 2, 9, 4, 5], "correct_strict": False, "correct_flexible": True},
             2: {"response_ids": [5, 6], "correct_strict": False, "correct_flexible": True},
             3: {"response_ids": [7], "correct_strict": False, "correct_flexible": False}}
    d = drift_report(committed, rerun)
    assert d["identical_responses"] == 2 and d["median_first_divergence"] == 2
    assert d["token_agreement"] == pytest.approx((2 + 2 + 1) / (5 + 2 + 1))
    assert d["strict"]["committed"] == pytest.approx(1 / 3) and d["strict"]["rerun"] == 0.0
    assert d["strict"]["difference"] == pytest.approx(-1 / 3) and d["strict"]["mcnemar_p"] == 1.0
    lo, hi = d["strict"]["committed_ci95"]
    assert lo < 1 / 3 < hi and d["strict"]["rerun_inside_committed_ci"] is (lo <= 0.0)
    assert d["flexible"]["difference"] == 0.0


def test_eval_rows_compare_words():
    a = {0: {"response": "x = 3 so #### 3", "correct_strict": True, "correct_flexible": True}}
    b = {0: {"response": "x = 4 so #### 4", "correct_strict": False, "correct_flexible": False}}
    d = drift_report(a, b)
    assert d["median_first_divergence"] == 2 and d["token_agreement"] == pytest.approx(2 / 6)


def test_verify_committed_without_a_remote(tmp_path):
    """No DVC remote: the checkout's own cache serves the pull; a fresh clone with an empty cache recomputes the
    inputs and compares by dvc.lock hash (the acceptance case: `kd verify --committed` on a fresh clone)."""
    src = tmp_path / "src"
    env = tool_env(root=src)
    make_copy(ROOT, src, "tiny", env)
    run(["dvc", "repro", "teacher@none"], src, env, timeout=1800)
    run(["git", "add", "-A"], src, env)
    run(["git", "commit", "-qm", "teacher@none"], src, env)
    checks = verify_committed(src, ["teacher@none"], workdir=tmp_path, echo=lambda s: None)
    assert [c.verdict for c in checks] == ["identical"], render(checks)

    fresh = tmp_path / "fresh"
    run(["git", "clone", "-q", str(src), str(fresh)], tmp_path, env)  # no outputs, no cache, no remote
    said = []
    checks = verify_committed(fresh, ["teacher@none"], workdir=tmp_path, echo=said.append)
    assert [c.verdict for c in checks] == ["identical"] and exit_code(checks) == 0, render(checks)
    assert any("could not pull" in s for s in said)


def test_committed_environment_is_found_by_the_stage_outs(tmp_path):
    """eval_kd@none's environment is environment/eval-kd-none.json (not the stage name with '@' -> '-'): found from
    the stage's outs, so a differing eval stage is judged by its environment, not 'committed environment unknown'."""
    from kd.core.environment import collect
    from kd.harness.verify_committed import _compare

    kept, clone = tmp_path / "kept", tmp_path / "clone"
    paths = ["environment/eval-kd-none.json", "results/eval/kd-none.json"]
    for root, acc, cpu in ((kept, 0.5, "A"), (clone, 0.25, "B")):
        (root / "environment").mkdir(parents=True)
        (root / "results/eval").mkdir(parents=True)
        env = collect()
        env["cpu"]["model"] = cpu
        (root / paths[0]).write_text(json.dumps(env))
        (root / paths[1]).write_text(json.dumps({"n": 4, "accuracy_strict": acc, "accuracy_flexible": acc}))
    lock_a = {"eval_kd@none": {"outs": [{"path": p, "md5": f"a{i}"} for i, p in enumerate(paths)]}}
    lock_b = {"eval_kd@none": {"outs": [{"path": p, "md5": f"b{i}"} for i, p in enumerate(paths)]}}
    c = _compare("eval_kd@none", paths, kept, clone, lock_a, lock_b, 0.0)
    assert c.verdict == "drift (other environment)" and c.differing == ["results/eval/kd-none.json"], c
    (clone / paths[0]).write_text((kept / paths[0]).read_text())
    c = _compare("eval_kd@none", paths, kept, clone, lock_a, lock_b, 0.0)
    assert c.verdict == "DIFFERS (same environment: a defect)", c

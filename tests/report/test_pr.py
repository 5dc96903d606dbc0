"""`kd pr-report` on a hand-made two-commit git repository (no pipeline run: seconds). The pipeline-made one, with
α changed between two real tiny runs, is tests/integration/test_ci.py's."""

from __future__ import annotations

import json
import os
import re
import subprocess
import sys
from pathlib import Path

import pytest
import yaml
from scipy import stats

ENV = {**os.environ, "GIT_AUTHOR_NAME": "t", "GIT_AUTHOR_EMAIL": "t@t", "GIT_COMMITTER_NAME": "t",
       "GIT_COMMITTER_EMAIL": "t@t", "GIT_AUTHOR_DATE": "2020-01-01T00:00:00Z",
       "GIT_COMMITTER_DATE": "2020-01-01T00:00:00Z"}


def _git(root: Path, *args: str) -> str:
    return subprocess.run(["git", *args], cwd=root, env=ENV, check=True, capture_output=True, text=True).stdout


def _kd(root: Path, *args: str) -> subprocess.CompletedProcess:
    return subprocess.run([sys.executable, "-m", "kd.tools.cli", *args], cwd=root, env=ENV, capture_output=True)


def _rows(right: set[int], ids) -> str:
    return "".join(json.dumps({"id": i, "gold": "1", "strict": None, "flexible": "1" if i in right else "2",
                               "correct_strict": False, "correct_flexible": i in right, "tokens": 5,
                               "truncated": False}, sort_keys=True) + "\n" for i in ids)


def _lock(alpha: float, kd_hash: str) -> dict:
    return {"schema": "2.0", "stages": {
        "distill@none": {"cmd": "python -m stages.distill none", "params": {"params.yaml": {"alpha": alpha}},
                         "outs": [{"path": "models/kd-none", "md5": kd_hash}]},
        "eval_student@student": {"cmd": "python -m stages.eval student",
                                 "outs": [{"path": "results/eval/student.jsonl", "md5": "s1"}]},
        "eval_kd@none": {"cmd": "python -m stages.eval kd-none", "deps": [{"path": "models/kd-none", "md5": kd_hash}],
                         "outs": [{"path": "results/eval/kd-none.jsonl", "md5": kd_hash + "e"}]}}}


def _commit(root: Path, files: dict[str, str], message: str) -> None:
    for path, text in files.items():
        (root / path).parent.mkdir(parents=True, exist_ok=True)
        (root / path).write_text(text)
    _git(root, "add", "-A")
    _git(root, "commit", "-qm", message)


def _env(fp: str) -> str:
    return json.dumps({"fingerprint": fp})


@pytest.fixture
def repo(tmp_path):
    """BASE: kd-none right on 5 of questions 0..29; HEAD (alpha 0.3): right on 15 (10 flipped to right, none to
    wrong), question 30 scored only at HEAD and 29 dropped; student unchanged; another environment."""
    root = tmp_path / "repo"
    root.mkdir()
    _git(root, "init", "-q", "-b", "main")
    params = {"alpha": 0.6, "prompting": {"strategies": ["none"]}, "report": {"primary_metric": "flexible"}}
    _commit(root, {
        "params.yaml": yaml.safe_dump(params), "dvc.lock": yaml.safe_dump(_lock(0.6, "a")),
        "results/eval/student.jsonl": _rows({1, 2, 3}, range(30)),
        "results/eval/kd-none.jsonl": _rows(set(range(5)), range(30)),
        "results/teacher/none.json": json.dumps({"accuracy_strict": 0.5, "accuracy_flexible": 0.625,
                                                 "finished_fraction": 1.0, "n": 8}),
        "metrics/environment.json": _env("aaa"), "environment/eval-kd-none.json": _env("aaa"),
        "reports/distill/none/plots/metrics/train/loss.tsv": "step\tloss\n0\t2.0\n1\t1.5\n",
    }, "base")
    params["alpha"] = 0.3
    _commit(root, {
        "params.yaml": yaml.safe_dump(params), "dvc.lock": yaml.safe_dump(_lock(0.3, "b")),
        "results/eval/kd-none.jsonl": _rows(set(range(15)) | {30}, [*range(29), 30]),
        "metrics/environment.json": _env("bbb"), "environment/eval-kd-none.json": _env("bbb"),
        "reports/distill/none/plots/metrics/train/loss.tsv": "step\tloss\n0\t2.0\n1\t1.2\n",
    }, "alpha 0.3")
    return root


def _table_row(md: str, kind: str, arm: str) -> list[str]:
    section = md.split(f"### {kind}", 1)[1].split("\n\n", 2)[1]
    row = next(line for line in section.splitlines() if line.startswith(f"| {arm} |"))
    return [c.strip() for c in row.strip("|").split("|")]


def _recomputed_p(root: Path, arm: str, kind: str) -> float:
    """The exact McNemar p from the committed rows, independently of kd: a two-sided binomial test of the
    HEAD-only wins among the questions the two commits disagree on (shared questions only)."""
    rows = []
    for rev in ("HEAD~1", "HEAD"):
        text = _git(root, "show", f"{rev}:results/eval/{arm}.jsonl")
        rows.append({r["id"]: r[f"correct_{kind}"] for r in map(json.loads, text.splitlines())})
    shared = set(rows[0]) & set(rows[1])
    wins = sum(rows[1][i] and not rows[0][i] for i in shared)
    losses = sum(rows[0][i] and not rows[1][i] for i in shared)
    return 1.0 if wins + losses == 0 else stats.binomtest(wins, wins + losses, 0.5).pvalue


def test_report_names_params_stages_arms_and_recomputable_p_values(repo):
    res = _kd(repo, "pr-report", "HEAD~1", "HEAD")
    assert res.returncode == 0, res.stderr.decode()
    md = res.stdout.decode()
    assert "| `alpha` | `0.6` | `0.3` |" in md
    assert "re-ran (lock entry changed): `distill@none`, `eval_kd@none`" in md
    assert "unchanged: 1 stage(s)" in md
    assert "Arms whose eval re-ran: `kd-none`." in md
    row = _table_row(md, "flexible", "kd-none")
    assert row[1] == "16.7 % [7.3, 33.6] (5/30)" and row[2] == "53.3 % [36.1, 69.8] (16/30)", row
    assert row[4:6] == ["29", "0 / 10"], row
    p = _recomputed_p(repo, "kd-none", "flexible")
    assert row[6] == f"{p:.3g}" and p < 0.01
    assert row[8:] == ["yes", "yes"], row  # beyond noise (Holm over the 2 paired arms), eval re-ran
    student = _table_row(md, "flexible", "student")
    assert student[6] == "1" and student[8:] == ["no", "no"], student
    # detectable: at the observed disagreement (10 of 29 questions), with no best-case floor: where the commits did
    # not disagree at all (student) no difference is detectable
    assert row[7] == "±31.0" and student[7] == "none", (row, student)
    assert _table_row(md, "strict", "kd-none")[6] == "1"  # no strict answer right at either commit
    # the questions only one commit scored are named, not dropped
    assert "1 only at HEAD~1 (ids 29); 1 only at HEAD (ids 30)" in md
    assert "**Beyond noise**" in md and "**kd-none**" in md
    # the teacher rows and the environment, a change said in words
    assert "| none | 50.0 % | 50.0 % | 62.5 % | 62.5 % | 100.0 % | 100.0 % |" in md
    assert "The environment changed between the two commits" in md and "`eval-kd-none`" in md
    assert "![accuracy per arm at both commits](pr-report/accuracy.png)" in md
    assert (repo / "pr-report/accuracy.png").read_bytes()[:4] == b"\x89PNG"
    assert (repo / "pr-report/loss.png").exists()


def test_same_revisions_give_the_same_bytes(repo, tmp_path):
    first = _kd(repo, "pr-report", "HEAD~1", "--plots", "figs")
    pngs = {p.name: p.read_bytes() for p in (repo / "figs").iterdir()}
    second = _kd(repo, "pr-report", "HEAD~1", "HEAD", "--plots", "figs")
    assert first.returncode == second.returncode == 0
    assert first.stdout == second.stdout
    assert {p.name: p.read_bytes() for p in (repo / "figs").iterdir()} == pngs and set(pngs) == {"accuracy.png",
                                                                                                "loss.png"}
    # another clone, another folder: still the same bytes (nothing depends on paths or time)
    clone = tmp_path / "clone"
    _git(tmp_path, "clone", "-q", str(repo), str(clone))
    third = _kd(clone, "pr-report", "HEAD~1", "--plots", "figs")
    assert third.stdout == first.stdout
    assert {p.name: p.read_bytes() for p in (clone / "figs").iterdir()} == pngs


def test_a_stale_lock_and_missing_per_question_files_are_said(repo):
    params = yaml.safe_load((repo / "params.yaml").read_text())
    params["alpha"] = 0.9  # committed without `dvc repro`: the lock still says 0.3
    (repo / "results/eval/student.jsonl").unlink()
    (repo / "results/eval/student.json").write_text(json.dumps({"n": 30, "correct_strict": 0,
                                                                 "correct_flexible": 3}))
    _commit(repo, {"params.yaml": yaml.safe_dump(params)}, "alpha 0.9, no repro")
    md = _kd(repo, "pr-report", "HEAD~1").stdout.decode()
    assert "**HEAD's dvc.lock is stale**" in md and "`alpha` = `0.3` in the lock, `0.9` in params" in md
    assert "no per-question results at HEAD (`results/eval/student.jsonl`)" in md
    row = _table_row(md, "flexible", "student")
    assert row[1] == row[2] == "10.0 % [3.5, 25.6] (3/30)" and row[6] == "—", row  # from student.json, no test


@pytest.mark.parametrize("args, message", [
    (["nope"], r"^error: BASE 'nope': not a commit in this repository"),
    (["HEAD~1", "HEAD~9"], r"^error: HEAD 'HEAD~9': not a commit"),
    (["HEAD~1", "--plots", "."], r"^error: --plots \.: must be a folder of its own"),
    (["HEAD~1", "--plots", "results"], r"^error: --plots results: holds other files"),
    (["HEAD~1", "--plots", "params.yaml"], r"^error: --plots params.yaml: exists and is not a folder"),
])
def test_bad_input_is_one_line_and_loses_nothing(repo, args, message):
    before = {p: p.read_bytes() for p in repo.rglob("*") if p.is_file() and ".git" not in p.parts}
    res = _kd(repo, "pr-report", *args)
    err = res.stderr.decode()
    assert res.returncode == 2 and re.match(message, err) and err.count("\n") == 1, err
    assert res.stdout == b""
    assert {p: p.read_bytes() for p in repo.rglob("*") if p.is_file() and ".git" not in p.parts} == before


def test_outside_git_is_one_line(tmp_path):
    res = _kd(tmp_path, "pr-report", "main")
    assert res.returncode == 2 and res.stderr.decode().startswith("error: ") and "not a git repository" in \
        res.stderr.decode()


def test_corrupt_per_question_rows_name_the_revision_and_file(repo):
    _commit(repo, {"results/eval/kd-none.jsonl": '{"id": 1, "correct_strict": false, "correct_flexible": "yes"}\n'},
            "broken")
    res = _kd(repo, "pr-report", "HEAD~1")
    assert res.returncode == 2
    assert res.stderr.decode().startswith("error: HEAD:results/eval/kd-none.jsonl:1: `correct_flexible` must be")

"""`kd verify`: the two-run comparison (naming the first difference, exact vs --tolerance), the invalidation table
against the real dvc.yaml (and that it catches a missing or an extra dep), the code-deps check, `kd verify --quick`.

The full `kd verify` (two tiny pipeline runs, ~3-5 min on 2 CPU cores) is CI's job (.ci/run), not the unit suite's;
tests/test_faults.py compares real stage outputs across runs."""

from __future__ import annotations

import json
import subprocess
import sys
from pathlib import Path

import pytest
import yaml

from kd.verify import (INVALIDATION, Change, Verdict, check_code_deps, check_invalidation, compare_locks,
                       compare_metrics, compare_projects, expand, make_copy, output_prefixes, placeholder_outputs,
                       project_files, render, tool_env, values_match)

ROOT = Path(__file__).resolve().parents[1]


# ------------------------------------------------------------------------------------------------ comparison


def _lock(**outs) -> dict:
    return {stage: {"cmd": "x", "outs": [{"path": p, "md5": h} for p, h in o]} for stage, o in outs.items()}


def test_identical_locks():
    a = _lock(prepare=[("data/prepared", "1.dir")], report=[("reports/index.md", "2")])
    rows = compare_locks(a, json.loads(json.dumps(a)))
    assert [r.stage for r in rows] == ["prepare", "report"] and all(r.identical for r in rows)


def test_differing_output_and_missing_stage_are_named(tmp_path):
    a = _lock(prepare=[("data/prepared", "1.dir")], distill=[("models/kd-none", "2.dir"), ("m.json", "3")])
    b = _lock(prepare=[("data/prepared", "1.dir")], distill=[("models/kd-none", "9.dir"), ("m.json", "3")],
              extra=[("x", "4")])
    for root, text in ((tmp_path / "a", '["q_proj", "o_proj"]'), (tmp_path / "b", '["o_proj", "q_proj"]')):
        (root / "models/kd-none").mkdir(parents=True)
        (root / "models/kd-none/adapter_model.safetensors").write_bytes(b"same")
        (root / "models/kd-none/adapter_config.json").write_text(text)
    rows = {r.stage: r for r in compare_locks(a, b, tmp_path / "a", tmp_path / "b")}
    assert rows["prepare"].identical
    # a differing folder is opened: the first differing file inside it is named
    assert rows["distill"].differing == ["models/kd-none/adapter_config.json"]
    assert not rows["extra"].identical and "only in run B" in rows["extra"].differing[0]


def _project(root: Path, lock: dict, metrics: dict[str, dict]) -> Path:
    root.mkdir(parents=True)
    (root / "dvc.lock").write_text(yaml.safe_dump({"schema": "2.0", "stages": lock}))
    for name, data in metrics.items():
        (root / name).parent.mkdir(parents=True, exist_ok=True)
        (root / name).write_text(json.dumps(data))
    return root


def test_first_difference_exact_and_within_tolerance(tmp_path):
    lock_a = _lock(distill=[("metrics/distill/none.json", "1")])
    lock_b = _lock(distill=[("metrics/distill/none.json", "2")])
    a = _project(tmp_path / "a", lock_a, {"metrics/distill/none.json": {"final_loss": 1.0, "steps": 16}})
    b = _project(tmp_path / "b", lock_b, {"metrics/distill/none.json": {"final_loss": 1.0 + 1e-9, "steps": 16}})
    rows, diffs, first = compare_projects(a, b)
    assert first == "output metrics/distill/none.json of stage distill differs between two runs"
    assert diffs == [("metrics/distill/none.json", "final_loss", 1.0, 1.0 + 1e-9)]
    rows, diffs, first = compare_projects(a, b, tolerance=(1e-3, 1e-6))
    assert first is None and diffs == []  # bytes differ, metrics agree within the stated tolerance
    text = render(Verdict(first is None, first, rows, diffs, [], [], (1e-3, 1e-6), {}))
    assert "rtol=0.001, atol=1e-06" in text and text.splitlines()[-1].startswith("OK")


def test_metric_rules():
    assert not values_match("n", 1, 1.0, None, None)  # type counts when exact
    assert values_match("accuracy", 0.5, 0.5, None, None)
    assert values_match("accuracy", 0.50, 0.505, 0.0, 0.01)
    assert not values_match("steps", 16, 17, 0.5, 5)  # structural counts stay exact under --tolerance
    assert values_match("x", float("nan"), float("nan"), 0.1, 0.1)
    assert not values_match("x", float("nan"), 1.0, 0.1, 0.1)


def test_metrics_file_missing_on_one_side(tmp_path):
    a = _project(tmp_path / "a", {}, {"metrics/eval/kd-none.json": {"n": 8}})
    b = _project(tmp_path / "b", {}, {})
    assert compare_metrics(a, b) == [("metrics/eval/kd-none.json", "(file)", True, False)]


# ------------------------------------------------------------------------------------------------ copies


def test_copy_has_no_outputs_and_its_own_cache():
    files = project_files(ROOT)
    prefixes = output_prefixes(ROOT)
    assert "dvc.lock" in prefixes and "metrics/distill/" in prefixes and "models/" in prefixes
    assert not [f for f in files if f == "dvc.lock" or f.startswith(("metrics/", "reports/", "models/", "data/"))]
    assert "dvc.yaml" in files and "kd/verify.py" in files and "tests/data/gsm8k/train.jsonl" in files


# ------------------------------------------------------------------------------------------------ invalidation


@pytest.fixture(scope="module")
def placeholder_project(tmp_path_factory):
    root = make_copy(ROOT, tmp_path_factory.mktemp("inval") / "project")
    placeholder_outputs(root)
    return root


def test_expand_patterns():
    stages = ["distill@none", "distill@teacher", "eval@teacher", "eval@kd-none", "report"]
    assert expand(["distill@*", "eval@kd-*", "report"], stages) == {"distill@none", "distill@teacher", "eval@kd-none",
                                                                   "report"}
    assert expand(["nope@x"], stages) == {"nope@x"}  # reported as missing, not silently dropped


@pytest.mark.slow
def test_kd_verify_quick_passes_on_this_project(tmp_path):
    """The hand-written table against the real dvc.yaml, through the CLI: every change re-runs exactly its stages,
    every stage declares the kd modules it imports."""
    res = subprocess.run([sys.executable, "-m", "kd.cli", "verify", "--quick", "--workdir", str(tmp_path)],
                         cwd=ROOT, env=tool_env(), capture_output=True, text=True, timeout=600)
    out = res.stdout + res.stderr
    assert res.returncode == 0, out[-4000:]
    assert "Invalidation (change" in out and "Code deps" in out
    assert out.count(" ok") >= len(INVALIDATION)
    assert not list(tmp_path.iterdir()), "the temporary copy is removed"


def _edit_dvc_yaml(root: Path, stage: str, key: str, remove: str | None = None, add: str | None = None) -> None:
    data = yaml.safe_load((root / "dvc.yaml").read_text())
    body = data["stages"][stage].get("do", data["stages"][stage])
    if remove:
        body[key].remove(remove)
    if add:
        body[key].append(add)
    (root / "dvc.yaml").write_text(yaml.safe_dump(data, sort_keys=False))


@pytest.mark.slow
def test_invalidation_catches_a_missing_and_an_extra_dep(tmp_path):
    root = make_copy(ROOT, tmp_path / "project")
    _edit_dvc_yaml(root, "distill", "deps", remove="kd/loss.py")   # a missing dep
    _edit_dvc_yaml(root, "logits", "params", add="alpha")           # an extra one
    placeholder_outputs(root)
    rows = {r.change: r for r in check_invalidation(root, [c for c in INVALIDATION
                                                           if c.target in ("kd/loss.py", "alpha", "temperature")])}
    assert rows["kd/loss.py"].missing == {"distill@none", "distill@teacher"}
    assert rows["alpha -> 0.3"].extra == {"logits@none", "logits@teacher"}
    assert rows["temperature -> 2.0"].ok
    text = render(Verdict(False, None, [], [], list(rows.values()), [], None, {}))
    assert "FAIL missing: distill@{none,teacher}" in text and "FAIL extra: logits@{none,teacher}" in text


def test_invalidation_probe_restores_the_file(placeholder_project):
    root = placeholder_project
    before = (root / "strategies.yaml").read_bytes()
    rows = check_invalidation(root, [Change("strategies.yaml:teacher", "X {question}", ("teacher@teacher",))])
    assert rows[0].ok and rows[0].actual == {"teacher@teacher"}
    assert (root / "strategies.yaml").read_bytes() == before


def test_code_deps_are_declared_and_a_missing_one_is_named(placeholder_project, tmp_path):
    rows = check_code_deps(placeholder_project)
    assert {r.stage for r in rows} >= {"prepare", "model", "teacher", "logits", "distill", "finetune", "eval_teacher",
                                       "eval_student", "eval_finetune", "eval_kd", "attention_student",
                                       "attention_finetune", "attention_kd", "report"}
    assert all(not r.missing for r in rows), [(r.stage, r.missing) for r in rows if r.missing]
    assert all(not r.unused for r in rows), [(r.stage, r.unused) for r in rows if r.unused]
    # the same check on a dvc.yaml whose attention stage forgot kd/attention.py
    (tmp_path / "stages").mkdir()
    for f in ["dvc.yaml", "stages/attention.py"]:
        (tmp_path / f).write_bytes((ROOT / f).read_bytes())
    (tmp_path / "kd").symlink_to(ROOT / "kd")
    _edit_dvc_yaml(tmp_path, "attention_student", "deps", remove="kd/attention.py")
    data = yaml.safe_load((tmp_path / "dvc.yaml").read_text())
    data["stages"] = {"attention_student": data["stages"]["attention_student"]}
    (tmp_path / "dvc.yaml").write_text(yaml.safe_dump(data))
    (row,) = check_code_deps(tmp_path)
    assert row.missing == ["kd/attention.py"]

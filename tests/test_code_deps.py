"""kd.code_deps: every stage of dvc.yaml declares exactly the kd modules its script imports; a missing one is named."""

from __future__ import annotations

from pathlib import Path

import yaml

from kd.code_deps import check_code_deps

ROOT = Path(__file__).resolve().parents[1]


def test_code_deps_are_declared_and_a_missing_one_is_named(tmp_path):
    rows = check_code_deps(ROOT)
    assert {r.stage for r in rows} >= {"prepare", "model", "teacher", "logits", "distill", "finetune", "eval_teacher",
                                       "eval_student", "eval_finetune", "eval_kd", "attention_student",
                                       "attention_finetune", "attention_kd", "report"}
    assert all(not r.missing for r in rows), [(r.stage, r.missing) for r in rows if r.missing]
    assert all(not r.unused for r in rows), [(r.stage, r.unused) for r in rows if r.unused]
    # the same check on a dvc.yaml whose attention stage forgot kd/attention.py
    (tmp_path / "stages").mkdir()
    (tmp_path / "stages/attention.py").write_bytes((ROOT / "stages/attention.py").read_bytes())
    (tmp_path / "kd").symlink_to(ROOT / "kd")
    stage = yaml.safe_load((ROOT / "dvc.yaml").read_text())["stages"]["attention_student"]
    stage["deps"].remove("kd/attention.py")
    (tmp_path / "dvc.yaml").write_text(yaml.safe_dump({"stages": {"attention_student": stage}}))
    (row,) = check_code_deps(tmp_path)
    assert row.missing == ["kd/attention.py"]

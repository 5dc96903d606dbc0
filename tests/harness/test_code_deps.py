"""kd.harness.code_deps: dvc.yaml's kd/*.py deps are generated from each stage script's import closure; the committed
file equals what `kd code-deps` writes, and a forgotten or stale dep is named and put right."""

from __future__ import annotations

import shutil
from pathlib import Path

from kd.harness.code_deps import check_code_deps, generated_dvc_yaml, stale_code_deps

ROOT = Path(__file__).resolve().parents[2]


def test_committed_dvc_yaml_is_what_kd_code_deps_writes():
    assert not stale_code_deps(ROOT), "dvc.yaml's code deps are stale: run `kd code-deps`"
    rows = check_code_deps(ROOT)
    assert {r.stage for r in rows} >= {"prepare", "model", "teacher", "logits", "distill", "finetune", "eval_teacher",
                                       "eval_student", "eval_finetune", "eval_kd", "attention_student",
                                       "attention_finetune", "attention_kd", "report"}
    assert all(not r.missing and not r.unused for r in rows), [(r.stage, r.missing, r.unused) for r in rows]


def test_a_forgotten_or_stale_dep_is_named_and_regenerated(tmp_path):
    shutil.copytree(ROOT / "stages", tmp_path / "stages")
    (tmp_path / "kd").symlink_to(ROOT / "kd")
    text = (ROOT / "dvc.yaml").read_text(encoding="utf-8")
    assert "      - kd/eval/attention.py\n" in text
    broken = text.replace("      - kd/eval/attention.py\n", "      - kd/eval/stats.py\n", 1)  # forgot one, added one
    (tmp_path / "dvc.yaml").write_text(broken)
    (row,) = [r for r in check_code_deps(tmp_path) if r.stage == "attention_student"]
    assert row.missing == ["kd/eval/attention.py"] and row.unused == ["kd/eval/stats.py"]
    assert stale_code_deps(tmp_path) and generated_dvc_yaml(tmp_path) == text

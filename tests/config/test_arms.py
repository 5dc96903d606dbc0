"""kd.config.arms: the arms table is the one source of the arms and of the stages that make and measure them; dvc.yaml,
the names check, the invalidation table and the report's arm list agree with it."""

from __future__ import annotations

from pathlib import Path

import pytest
import yaml

from kd.core.errors import ParamError
from kd.core.names import is_model
from kd.config.arms import ARMS, BASELINES, arm_names, resolve, run_name, stages_of, student_arms, trained_by
from kd.harness import invalidation

ROOT = Path(__file__).resolve().parents[2]
S = ["none", "teacher"]


def _dvc_stages(root: Path) -> set[str]:
    """Every stage name of root's dvc.yaml as DVC expands it (foreach / matrix over root's params)."""
    from dvc.repo import Repo

    with Repo(str(root)) as repo:
        return {s.name for s in repo.index.stages}


def _mismatches(root: Path) -> list[str]:
    """The table's training, eval and attention stages vs. root's dvc.yaml: the columns that disagree."""
    strategies = yaml.safe_load((root / "params.yaml").read_text())["prompting"]["strategies"]
    stages = _dvc_stages(root)
    return [column for column, prefixes in (("trained_by", ("distill@", "finetune")), ("eval_stage", ("eval_",)),
                                            ("attention_stage", ("attention_",)))
            if set(stages_of(strategies, column)) != {s for s in stages if s.startswith(prefixes)}]


def test_dvc_yaml_stages_are_the_tables():
    assert _mismatches(ROOT) == []


def test_docs_worked_example_add_an_arm(tmp_path, monkeypatch):
    """docs/extending.md's worked example, done for real in a scratch project: `finetune_cot` (the fine-tune control
    under the stock CoT prompt) is one row of the table and one stage of dvc.yaml. Either edit alone is caught."""
    import dvc.repo

    from kd.config import arms

    dvc.repo.Repo.init(str(tmp_path), no_scm=True)
    for f in ("params.yaml", "strategies.yaml"):
        (tmp_path / f).write_bytes((ROOT / f).read_bytes())
    text = (ROOT / "dvc.yaml").read_text()
    block = text[text.index("  eval_finetune:\n"):text.index("  eval_kd:\n")]
    new = block.replace("eval_finetune:", "eval_finetune_cot:").replace("stages.eval finetune", "stages.eval finetune_cot")
    new = new.replace("eval-finetune.json", "eval-finetune_cot.json").replace("eval/finetune", "eval/finetune_cot")
    row = arms.ArmKind("finetune_cot", "student", "cot", "finetune", "finetune", "eval_finetune_cot", None,
                       "fine-tune control, stock zero-shot CoT prompt")
    edited = text.replace("  eval_kd:\n", new + "  eval_kd:\n", 1)
    for table, dvc_yaml, wrong in ((arms.ARMS, edited, ["eval_stage"]),            # dvc.yaml only
                                   ((*arms.ARMS, row), text, ["eval_stage"]),      # the table only
                                   ((*arms.ARMS, row), edited, [])):               # both: the example
        monkeypatch.setattr(arms, "ARMS", table)
        (tmp_path / "dvc.yaml").write_text(dvc_yaml)
        assert _mismatches(tmp_path) == wrong
    arm = resolve("finetune_cot", S, "models")
    assert (arm.adapter_dir, arm.prompt, arm.trained_by) == (Path("models/finetune"), "cot", "finetune")
    assert "finetune_cot" in arm_names(S) and is_model("finetune_cot")


def test_every_arm_resolves_from_its_row():
    assert arm_names(S) == ["teacher", "student", "student_cot", "finetune", "kd-none", "kd-teacher"]
    assert BASELINES == ("teacher", "student", "student_cot", "finetune")
    kd = resolve("kd-teacher", S, "m")
    assert (kd.model_dir, kd.adapter_dir, kd.trained_by, kd.eval_stage, kd.attention_stage, kd.text) == \
        (Path("m/student"), Path("m/kd-teacher"), "distill@teacher", "eval_kd@teacher", "attention_kd@teacher",
         "KD, strategy `teacher`")
    assert resolve("teacher", S).role == "teacher" and resolve("student_cot", S).prompt == "cot"
    assert student_arms(S) == ["student", "finetune", "kd-none", "kd-teacher"]
    assert [run_name(a) for a in ("finetune", "kd-none")] == ["finetune", "none"] and trained_by("student") is None
    with pytest.raises(ParamError, match="kd-other"):
        resolve("kd-other", S)  # the right shape, not a strategy of this experiment
    assert is_model("kd-other") and not is_model("kd-../x") and not is_model("unknown")


def test_invalidation_groups_come_from_the_table():
    assert set(invalidation.TRAIN_ALL) == {k.trained_by.replace("{s}", "*") for k in ARMS if k.trained_by}
    assert set(invalidation.EVAL_ALL) == {k.eval_stage.replace("{s}", "*") for k in ARMS}
    assert "eval_teacher" not in invalidation.EVAL_STUDENTS and len(invalidation.EVAL_STUDENTS) == len(ARMS) - 1

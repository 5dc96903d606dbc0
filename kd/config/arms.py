"""The experiment's arms: every model the report compares, and what each one is.

The paper compares a base student, a fine-tune control (cross-entropy on the gold solutions, no teacher), KD
without priming and KD per priming strategy. kd-prime evaluates:

  teacher       the teacher, under the task prompt (its own accuracy, never measured in the original)
  student       the base student, under the task prompt (question + answer-format instruction)
  student_cot   the base student under a stock zero-shot chain-of-thought prompt ("Let's think step by step."),
                so a reader can see what the task prompt's format instruction alone does for an untrained model
  finetune      the fine-tune control: the same LoRA, schedule and transfer questions, CE on gold solutions only
  kd-<s>        KD on the teacher's responses under strategy <s> (one arm per `prompting.strategies` entry)

The KD arms are derived from `prompting.strategies`: adding a strategy adds its arm. Every adapter arm is a LoRA
adapter over models/student, loaded unmerged (kd.models.loading.load_adapted).
"""

from __future__ import annotations

from dataclasses import dataclass
from pathlib import Path
from typing import Sequence

from kd.core.errors import KdError, ParamError


@dataclass(frozen=True)
class ArmKind:
    """One row of the arms table: a baseline, or the per-strategy family `kd-{s}` (one arm per strategy)."""
    name: str                    # the arm; "kd-{s}" stands for kd-<strategy> for every prompting.strategies entry
    role: str                    # teacher | student: whose params (dtype, trust_remote_code) apply
    prompt: str                  # task | cot (kd.data.prompting.eval_prompt)
    adapter: str | None          # its LoRA adapter over the role's model: models/<adapter>, or None (none)
    trained_by: str | None       # the stage that writes that adapter
    eval_stage: str              # the dvc.yaml stage that evaluates it
    attention_stage: str | None  # the stage that summarises its attention (the student's weights), or None
    text: str                    # what it is, in the report's accuracy table


# The arms table, in report order: what each arm is and which stages make and measure it. Names, evaluation,
# attention, the report, comparisons and the invalidation table read it; tests/config/test_arms.py checks dvc.yaml's
# training, eval and attention stages against it. A new arm is a new row (docs/extending.md).
ARMS = (
    ArmKind("teacher", "teacher", "task", None, None, "eval_teacher", None, "the teacher"),
    ArmKind("student", "student", "task", None, None, "eval_student@student", "attention_student",
            "base student (no training)"),
    ArmKind("student_cot", "student", "cot", None, None, "eval_student@student_cot", None,
            "base student, stock zero-shot CoT prompt"),
    ArmKind("finetune", "student", "task", "finetune", "finetune", "eval_finetune", "attention_finetune",
            "fine-tune control: CE on gold solutions, no teacher"),
    ArmKind("kd-{s}", "student", "task", "kd-{s}", "distill@{s}", "eval_kd@{s}", "attention_kd@{s}",
            "KD, strategy `{s}`"),
)
BASELINES = tuple(k.name for k in ARMS if "{s}" not in k.name)
BASE_ARM = "student"  # every trained arm is compared with this one, paired on the same questions
PROMPTS = ("task", "cot")


@dataclass(frozen=True)
class Arm:
    name: str
    role: str                 # teacher | student: whose params (dtype, trust_remote_code) apply
    model_dir: Path           # the full model folder
    adapter_dir: Path | None  # LoRA adapter over model_dir (finetune, kd-*), else None
    prompt: str               # task | cot (kd.data.prompting.eval_prompt)
    trained_by: str | None    # the stage that writes adapter_dir
    eval_stage: str
    attention_stage: str | None
    text: str

    @property
    def trained(self) -> bool:
        return self.adapter_dir is not None


def _fill(pattern: str | None, s: str | None) -> str | None:
    """A table cell for strategy `s`: "{s}" replaced by plain substitution (never str.format)."""
    return pattern if pattern is None or s is None else pattern.replace("{s}", s)


def arm_kind(name: str) -> tuple[ArmKind, str | None] | None:
    """The table row an arm name has the shape of, and its strategy (kd-<s>), or None. Checks no strategy list."""
    for kind in ARMS:
        if kind.name == name:
            return kind, None
        head = kind.name.split("{s}")[0]
        if "{s}" in kind.name and name.startswith(head) and len(name) > len(head):
            return kind, name[len(head):]
    return None


def trained_by(name: str) -> str | None:
    """The stage that writes arm `name`'s adapter (from the name's shape alone), or None."""
    found = arm_kind(name)
    if found is None or found[0].trained_by is None:
        return None
    kind, s = found
    return _fill(kind.trained_by, s)


def adapter_name(arm: str) -> str:
    """A trained arm's adapter folder under models/ (its `adapter` column)."""
    found = arm_kind(arm)
    if found is None or found[0].adapter is None:
        raise KdError(f"arm {arm!r} has no adapter")
    kind, s = found
    return _fill(kind.adapter, s)


def run_name(arm: str) -> str:
    """A trained arm's run folder (results/distill/<run>.json, reports/distill/<run>/): its training stage's item,
    `finetune` or the strategy of `kd-<strategy>`."""
    stage = trained_by(arm)
    if stage is None:
        raise KdError(f"arm {arm!r} is not trained (no training run)")
    return stage.split("@")[-1]


def arm_names(strategies: Sequence[str]) -> list[str]:
    """Every arm, in report order."""
    return [n for k in ARMS for n in ([_fill(k.name, s) for s in strategies] if "{s}" in k.name else [k.name])]


def stages_of(strategies: Sequence[str], column: str) -> list[str]:
    """One column of the table over every arm (`trained_by`, `eval_stage` or `attention_stage`), Nones dropped."""
    return [st for a in arm_names(strategies) if (st := getattr(resolve(a, strategies), column)) is not None]


def student_arms(strategies: Sequence[str]) -> list[str]:
    """The arms that are the student's weights (base, fine-tuned, distilled): the attention report's models."""
    return [a for a in arm_names(strategies) if resolve(a, strategies).attention_stage is not None]


def resolve(name: str, strategies: Sequence[str], models_dir: str | Path = "models") -> Arm:
    """Map an arm name to its folders and stages. Validates the name only; touches no files."""
    allowed = arm_names(strategies)
    found = arm_kind(name) if name in allowed else None
    if found is None:
        raise ParamError("arm", f"{name!r} is not an arm of this experiment", ", ".join(allowed))
    kind, s = found
    models_dir = Path(models_dir)
    adapter = _fill(kind.adapter, s)
    return Arm(name, kind.role, models_dir / kind.role, models_dir / adapter if adapter else None, kind.prompt,
               _fill(kind.trained_by, s), _fill(kind.eval_stage, s), _fill(kind.attention_stage, s),
               _fill(kind.text, s))

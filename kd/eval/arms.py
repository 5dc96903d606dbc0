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

from kd.core.errors import ParamError

BASELINES = ("teacher", "student", "student_cot", "finetune")
BASE_ARM = "student"  # every trained arm is compared with this one, paired on the same questions
PROMPTS = ("task", "cot")


@dataclass(frozen=True)
class Arm:
    name: str
    role: str                 # teacher | student: whose params (dtype, trust_remote_code) apply
    model_dir: Path           # the full model folder
    adapter_dir: Path | None  # LoRA adapter over model_dir (finetune, kd-*), else None
    prompt: str               # task | cot (kd.data.prompting.eval_prompt)

    @property
    def trained(self) -> bool:
        return self.adapter_dir is not None


def arm_names(strategies: Sequence[str]) -> list[str]:
    """Every arm, in report order."""
    return [*BASELINES, *(f"kd-{s}" for s in strategies)]


def student_arms(strategies: Sequence[str]) -> list[str]:
    """The arms that are the student's weights (base, fine-tuned, distilled): the attention report's models."""
    return [a for a in arm_names(strategies) if a not in ("teacher", "student_cot")]


def resolve(name: str, strategies: Sequence[str], models_dir: str | Path = "models") -> Arm:
    """Map an arm name to its folders. Validates the name only; touches no files."""
    models_dir = Path(models_dir)
    allowed = arm_names(strategies)
    if name not in allowed:
        raise ParamError("arm", f"{name!r} is not an arm of this experiment", ", ".join(allowed))
    if name == "teacher":
        return Arm(name, "teacher", models_dir / "teacher", None, "task")
    student = models_dir / "student"
    if name == "student":
        return Arm(name, "student", student, None, "task")
    if name == "student_cot":
        return Arm(name, "student", student, None, "cot")
    return Arm(name, "student", student, models_dir / name, "task")  # finetune, kd-<s>

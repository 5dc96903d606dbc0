"""params.yaml: load and validate every key before any stage does expensive work.

A bad value raises ParamError naming the key and what is allowed. Unknown keys are errors too (a typo in
`distill.lrr` must not silently train with the default)."""

from __future__ import annotations

import math
import re
from pathlib import Path
from typing import Any, Callable

from kd.dtypes import NAMES as DTYPES
from kd.errors import ParamError
from kd.qlora import OPTIMIZERS, check_params as check_qlora

LOGIT_FORMATS = ["hidden", "full", "topk"]
LOSSES = ["reverse_kl", "forward_kl", "jsd"]
HARD_TARGETS = ["teacher", "gold"]
RESPONSE_FILTERS = ["all", "finished", "correct"]  # which teacher responses distill trains on (kd.distill)
TUNE_OBJECTIVES = ["accuracy", "nll"]  # kd tune: validation strict accuracy (lm-eval) | validation gold NLL
QUANTIZATIONS = ["bnb-4bit", "bnb-8bit"]  # load-time bitsandbytes quantization (teacher; student: kd/qlora.py)
SOURCE_RE = re.compile(r"^(hub:\S+|jsonl:\S+|pypi:[A-Za-z0-9_.\-]+(==\S+)?)$")


# --- small typed checkers: each returns the value or raises ParamError(key, ...) -----------------------
def _int(lo: int | None = None, hi: int | None = None) -> Callable[[str, Any], int]:
    def check(key, v):
        if isinstance(v, bool) or not isinstance(v, int):
            raise ParamError(key, f"must be an integer, got {v!r}", _range(lo, hi))
        if (lo is not None and v < lo) or (hi is not None and v > hi):
            raise ParamError(key, f"is out of range: {v}", _range(lo, hi))
        return v
    return check


def _float(lo: float, hi: float, lo_open: bool = False, hi_open: bool = False) -> Callable[[str, Any], float]:
    desc = f"a number in {'(' if lo_open else '['}{lo}, {hi}{')' if hi_open else ']'}"

    def check(key, v):
        if isinstance(v, bool) or not isinstance(v, (int, float)) or not math.isfinite(v):
            raise ParamError(key, f"must be a finite number, got {v!r}", desc)
        v = float(v)
        if v < lo or v > hi or (lo_open and v == lo) or (hi_open and v == hi):
            raise ParamError(key, f"is out of range: {v}", desc)
        return v
    return check


def _choice(options: list[str]) -> Callable[[str, Any], str]:
    def check(key, v):
        if v not in options:
            raise ParamError(key, f"is {v!r}", ", ".join(options))
        return v
    return check


def _bool(key, v):
    if not isinstance(v, bool):
        raise ParamError(key, f"must be true or false, got {v!r}", "true, false")
    return v


def _str(key, v):
    if not isinstance(v, str) or not v.strip():
        raise ParamError(key, f"must be a non-empty string, got {v!r}")
    return v


def _text(key, v):
    if not isinstance(v, str):
        raise ParamError(key, f"must be a string, got {v!r}")
    return v


def _optional(check):
    return lambda key, v: None if v is None else check(key, v)


def _str_list(key, v):
    if not isinstance(v, list) or not v or not all(isinstance(x, str) and x for x in v):
        raise ParamError(key, f"must be a non-empty list of names, got {v!r}")
    if len(set(v)) != len(v):
        raise ParamError(key, f"has duplicates: {v}")
    return v


def _strategy_list(key, v):
    from kd.names import strategy

    return [strategy(x, key) for x in _str_list(key, v)]


def _instruction(key, v):
    from kd.prompting import check_instruction

    return check_instruction(_text(key, v), key)


def _source(key, v):
    if not isinstance(v, str) or not SOURCE_RE.match(v):
        raise ParamError(key, f"is {v!r}", "hub:<dataset id>, jsonl:<folder>, pypi:<package>[==<version>]")
    return v


def _interval(lo: float, hi: float, positive: bool = False) -> Callable[[str, Any], list[float]]:
    """A search interval [low, high] inside [lo, hi] (positive: both ends > 0, for a log scale)."""
    desc = f"[low, high] with {lo} <= low < high <= {hi}" + (" and low > 0 (log scale)" if positive else "")

    def check(key, v):
        if (not isinstance(v, list) or len(v) != 2
                or any(isinstance(x, bool) or not isinstance(x, (int, float)) or not math.isfinite(x) for x in v)):
            raise ParamError(key, f"must be a pair of numbers, got {v!r}", desc)
        a, b = float(v[0]), float(v[1])
        if not (lo <= a < b <= hi) or (positive and a <= 0):
            raise ParamError(key, f"is out of range: {v}", desc)
        return [a, b]
    return check


def _int_choices(lo: int, hi: int) -> Callable[[str, Any], list[int]]:
    def check(key, v):
        if (not isinstance(v, list) or not v or len(set(map(str, v))) != len(v)
                or any(isinstance(x, bool) or not isinstance(x, int) or not lo <= x <= hi for x in v)):
            raise ParamError(key, f"must be a non-empty list of distinct integers, got {v!r}",
                             f"integers in [{lo}, {hi}]")
        return v
    return check


def _range(lo, hi):
    if lo is not None and hi is not None:
        return f"an integer in [{lo}, {hi}]"
    return f"an integer >= {lo}" if lo is not None else None


MODEL = {"model": _str, "dtype": _choice(DTYPES), "trust_remote_code": _bool}
SCHEMA: dict[str, Any] = {
    "profile": _optional(_str),
    "seed": _int(0, 2**32 - 1),
    "alpha": _float(0.0, 1.0),
    "temperature": _float(0.0, 100.0, lo_open=True),
    "prepare": {"source": _source, "transfer_size": _int(1, 10**6), "validation_size": _int(0, 10**6),
                "eval_size": _int(1, 10**6)},
    "prompting": {"strategies": _strategy_list, "file": _str, "instruction": _instruction},
    "teacher": {**MODEL, "max_new_tokens": _int(1, 32768), "batch_size": _int(1, 4096),
                "quantization": _optional(_choice(QUANTIZATIONS))},
    "student": {**MODEL, "quantization": _optional(_choice(QUANTIZATIONS))},  # QLoRA (kd/qlora.py)
    "logits": {"format": _choice(LOGIT_FORMATS), "top_k": _int(1, 10**7), "shard_rows": _int(1, 10**9)},
    "distill": {"loss": _choice(LOSSES), "hard_target": _choice(HARD_TARGETS),
                "response_filter": _choice(RESPONSE_FILTERS), "epochs": _int(1, 1000),
                "lr": _float(0.0, 10.0, lo_open=True), "momentum": _float(0.0, 1.0, hi_open=True),
                "weight_decay": _float(0.0, 1.0), "max_length": _int(16, 10**6), "kd_chunk": _int(1, 10**6),
                "checkpoint_every": _int(1, 10**9), "optimizer": _choice(OPTIMIZERS),
                "batch_size": _int(1, 4096),
                "lora": {"r": _int(1, 4096), "alpha": _float(0.0, 1e6, lo_open=True),
                         "dropout": _float(0.0, 1.0, hi_open=True), "target_modules": _str_list}},
    "eval": {"limit": _optional(_int(1, 10**7)), "max_new_tokens": _int(1, 32768),
             "batch_size": _int(1, 4096)},
    "report": {"attention_prompts": _int(1, 256)},
    "compute": {"portable": _bool, "processes": _int(1, 4096)},  # kd/portable.py; kd/launch.py
    # `kd tune` (kd/tune.py): no stage reads these, so editing them never invalidates the pipeline
    "tune": {"strategy": _str, "objective": _choice(TUNE_OBJECTIVES), "n_trials": _int(1, 10**6),
             "timeout": _optional(_int(1, 10**8)), "storage": _str, "study": _optional(_str),
             "report_every": _int(1, 10**9), "heartbeat": _int(1, 86400),
             "pruner": {"startup_trials": _int(0, 10**6), "warmup_steps": _int(0, 10**9)},
             "space": {"alpha": _interval(0.0, 1.0), "temperature": _interval(0.0, 100.0, positive=True),
                       "lr": _optional(_interval(0.0, 10.0, positive=True)),
                       "lora_r": _optional(_int_choices(1, 4096))}},
}


def _walk(schema: dict, data: Any, prefix: str) -> dict:
    if not isinstance(data, dict):
        raise ParamError(prefix.rstrip(".") or "params", f"must be a mapping, got {data!r}")
    unknown = sorted(set(data) - set(schema))
    if unknown:
        raise ParamError(prefix + str(unknown[0]), "is not a known key",
                         ", ".join(prefix + k for k in schema))
    out = {}
    for key, check in schema.items():
        full = prefix + key
        if key not in data:
            if key == "profile":
                out[key] = None
                continue
            raise ParamError(full, "is missing")
        out[key] = _walk(check, data[key], full + ".") if isinstance(check, dict) else check(full, data[key])
    return out


def validate(data: Any, root: str | Path = ".") -> dict:
    """Validate a parsed params mapping; cross-key checks included. Returns the cleaned params."""
    p = _walk(SCHEMA, data, "")
    from kd.prompting import load_strategies

    strategies = load_strategies(Path(root) / p["prompting"]["file"])
    for s in p["prompting"]["strategies"]:
        if s not in strategies:
            raise ParamError("prompting.strategies", f"names unknown strategy {s!r}",
                             ", ".join(strategies) + f" (defined in {p['prompting']['file']})")
    if p["compute"]["portable"]:
        for role in ("teacher", "student"):
            if p[role]["dtype"] != "float32":
                raise ParamError("compute.portable", f"is true, which needs {role}.dtype float32, not "
                                 f"{p[role]['dtype']} (bf16 matmul kernels round differently on different CPUs; "
                                 "docs/reproducibility.md)", "false, or true with float32 teacher and student dtypes")
    check_qlora(p)
    if p["tune"]["strategy"] not in p["prompting"]["strategies"]:
        raise ParamError("tune.strategy", f"is {p['tune']['strategy']!r}, not one of prompting.strategies",
                         ", ".join(p["prompting"]["strategies"]))
    if p["distill"]["lora"]["r"] > 4096:
        raise ParamError("distill.lora.r", "is too large", "an integer in [1, 4096]")
    try:
        from kd.models import validate_spec
    except ImportError:  # pragma: no cover - models module always ships
        validate_spec = None
    if validate_spec:
        for role in ("teacher", "student"):
            validate_spec(p[role]["model"], key=f"{role}.model", root=root)
    return p


def read_yaml(path: str | Path) -> Any:
    """Strict: duplicate keys, anchors/aliases (YAML bombs) and files over 1 MiB are errors (kd.io.read_yaml)."""
    from kd.io import read_yaml as strict

    return strict(path, "create one with `kd profile tiny`")


def load_params(path: str | Path = "params.yaml", root: str | Path = ".") -> dict:
    """Paths inside params (prompting.file, jsonl sources, local models) are relative to the project root."""
    return validate(read_yaml(path), root=root)

"""How a refused param is worded: one ParamError naming the dotted key, what is wrong and what is allowed.

kd/config/params.py says what the params are (pydantic models with pydantic's own constraints); this module turns
pydantic's first error, in params order, into that one line, reading what is allowed back from the field's own
declaration (its bounds, its Literal options), so no bound or choice is written twice."""

from __future__ import annotations

import math
from types import UnionType
from typing import Annotated, Any, Literal, Union, get_args, get_origin

from pydantic import BaseModel, ValidationError

from kd.core.errors import ParamError


class Bad(ValueError):
    """A field's value is wrong: what is wrong, and what is allowed (ParamError adds the key)."""

    def __init__(self, problem: str, allowed: str | None = None):
        super().__init__(problem)
        self.problem, self.allowed = problem, allowed


def _order(model: type[BaseModel], loc: tuple) -> tuple:
    """Where an error sits in params order: per level, a field's position, an unknown key before every field."""
    out = []
    for part in loc:
        fields = list(model.model_fields) if model is not None else []
        out.append(fields.index(part) if part in fields else -1)
        ann = model.model_fields[part].annotation if part in fields else None
        model = ann if isinstance(ann, type) and issubclass(ann, BaseModel) else None
    return tuple(out)


def _allowed_keys(root: type[BaseModel], loc: tuple) -> str:
    model: Any = root
    for part in loc:
        model = model.model_fields[part].annotation
    prefix = "".join(f"{p}." for p in loc)
    return ", ".join(prefix + k for k in model.model_fields)


def param_error(e: ValidationError, root: type[BaseModel]) -> ParamError:
    """The first error in params order, as ParamError(dotted key, problem, allowed); `root` is the params model."""
    err = min(e.errors(), key=lambda x: _order(root, x["loc"]))
    loc = tuple(str(p) for p in err["loc"])
    key = ".".join(loc)
    if err["type"] == "extra_forbidden":
        return ParamError(key, "is not a known key", _allowed_keys(root, loc[:-1]))
    if err["type"] == "missing":
        return ParamError(key, "is missing")
    if err["type"] == "model_type":
        return ParamError(key or "params", f"must be a mapping, got {err['input']!r}")
    bad = (err.get("ctx") or {}).get("error")
    if isinstance(bad, Bad):
        return ParamError(key, bad.problem, bad.allowed)
    typ, bounds, options = _constraints(root, loc)
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


def _constraints(root: type[BaseModel], loc: tuple) -> tuple[Any, dict, tuple]:
    """The field at `loc`, read back from its declaration: (its type, {ge/gt/le/lt: bound}, its Literal options)."""
    import annotated_types as at
    from pydantic.fields import FieldInfo

    field = None
    model: Any = root
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

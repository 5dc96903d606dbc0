"""Names that become paths: one rule each, checked in params validation and again at every stage entry.

Strategy names become folders (`data/teacher/<s>`, `.kd-work/distill/<s>`, `models/kd-<s>`, ...), eval model names
become `models/<m>` and `reports/eval/<m>`, profile names become `profiles/<p>.yaml`. A name is therefore a plain
lower-case identifier, never a path: no `/`, `..`, leading `-` (a CLI option), absolute path, dot file or
upper case (two spellings of one folder on a case-insensitive disk).

  strategy:    ^[a-z][a-z0-9_]{0,63}$            (the DVC matrix item and YAML key, too)
  eval model:  teacher | student | kd-<strategy>
  profile:     ^[a-z][a-z0-9_-]{0,63}$           (`kd profile` takes a name, never a path)
"""

from __future__ import annotations

import re

from kd.core.errors import KdError, ParamError

STRATEGY_RE = re.compile(r"[a-z][a-z0-9_]{0,63}")
PROFILE_RE = re.compile(r"[a-z][a-z0-9_-]{0,63}")
STRATEGY_RULE = "a lower-case identifier: a-z first, then a-z, 0-9 or _, at most 64 characters"
PROFILE_RULE = "a profile name (a-z first, then a-z, 0-9, _ or -, at most 64 characters), not a path"


def is_strategy(name: object) -> bool:
    return isinstance(name, str) and STRATEGY_RE.fullmatch(name) is not None


def is_model(name: object) -> bool:
    """An arm name (kd/config/arms.py's table): a baseline or kd-<safe strategy name>."""
    from kd.config.arms import arm_kind

    found = arm_kind(name) if isinstance(name, str) else None
    return found is not None and (found[1] is None or is_strategy(found[1]))


def strategy(name: object, key: str = "prompting.strategies") -> str:
    """`name` if it is a safe strategy name, else ParamError(key)."""
    if not is_strategy(name):
        raise ParamError(key, f"has the strategy name {_show(name)}, which cannot be used as a folder name",
                         STRATEGY_RULE)
    return name  # type: ignore[return-value]


def model(name: object, key: str = "arm") -> str:
    if not is_model(name):
        from kd.config.arms import ARMS

        raise ParamError(key, f"has the model name {_show(name)}",
                         ", ".join(k.name.replace("{s}", "<strategy name>") for k in ARMS))
    return name  # type: ignore[return-value]


def profile(name: object) -> str:
    if not isinstance(name, str) or PROFILE_RE.fullmatch(name) is None:
        raise KdError(f"profile {_show(name)} is not {PROFILE_RULE}")
    return name


def stage_arg(kind: str, name: str, listed: list[str], key: str) -> str:
    """At a stage entry (run by DVC or by hand): the argument is safe and listed in params."""
    if not (is_strategy(name) or is_model(name)):  # checked again here: a stage can be run by hand
        raise KdError(f"the stage argument {_show(name)} is not a safe {kind} name "
                      f"(allowed: {STRATEGY_RULE if kind == 'strategy' else 'teacher, student, student_cot, finetune, kd-<strategy>'})")
    if name not in listed:
        raise ParamError(key, f"does not list {name!r}", ", ".join(listed))
    return name


def _show(name: object) -> str:
    text = repr(name)
    return text if len(text) <= 80 else text[:77] + "..."

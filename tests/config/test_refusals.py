"""kd/config/refusals.py: a refused param is one line naming the key, the problem and what is allowed, where what is
allowed is read back from the field's own pydantic constraints (so a bound written once is the bound reported)."""

from __future__ import annotations

import copy

import pytest

from kd.config.params import Params, parse
from kd.config.profiles import load as load_profile
from kd.core.errors import ParamError
from stage_runner import ROOT

BASE = load_profile("tiny", ROOT)


def refused(key: str, value) -> str:
    p = copy.deepcopy(BASE)
    *path, last = key.split(".")
    d = p
    for k in path:
        d = d[k]
    d[last] = value
    with pytest.raises(ParamError) as e:
        parse(p)
    return str(e.value)


@pytest.mark.parametrize("key, value, problem, allowed", [
    ("seed", -1, "is out of range: -1", "an integer in [0, 4294967295]"),
    ("seed", True, "must be an integer, got True", "an integer in [0, 4294967295]"),
    ("eval.limit", 2.5, "must be an integer, got 2.5", "an integer in [1, 10000000]"),      # Optional[Int]
    ("distill.lr", 0, "is out of range: 0.0", "a number in (0.0, 10.0]"),                   # open lower end
    ("distill.lora.dropout", 1.0, "is out of range: 1.0", "a number in [0.0, 1.0)"),        # open upper end
    ("temperature", float("nan"), "must be a finite number, got nan", "a number in [0.01, 100.0]"),
    ("alpha", "high", "must be a finite number, got 'high'", "a number in [0.0, 1.0]"),
    ("distill.loss", "kl", "is 'kl'", "reverse_kl, forward_kl, jsd"),
    ("student.quantization", "bnb-2bit", "is 'bnb-2bit'", "bnb-4bit, bnb-8bit"),            # Optional[Choice]
    ("compute.portable", "yes", "must be true or false, got 'yes'", "true, false"),
])
def test_the_allowed_values_come_from_the_declaration(key, value, problem, allowed):
    assert refused(key, value) == f"params: `{key}` {problem} (allowed: {allowed})"


def test_every_bounded_field_reports_its_own_bounds():
    """Walk every field of every section: a value below an integer field's lower bound names exactly that bound."""
    import annotated_types as at

    checked = 0
    for section, info in Params.model_fields.items():
        model = info.annotation
        fields = model.model_fields.items() if isinstance(model, type) and hasattr(model, "model_fields") else []
        for name, f in fields:
            ge = next((m.ge for m in f.metadata if isinstance(m, at.Ge)), None)
            if f.annotation is int and ge is not None:
                assert f"`{section}.{name}` is out of range: {ge - 1}" in refused(f"{section}.{name}", ge - 1)
                checked += 1
    assert checked >= 15


def test_a_yaml12_float_string_is_a_number_and_unknown_keys_name_the_known_ones():
    p = copy.deepcopy(BASE)
    p["distill"]["lr"] = "1e-4"  # YAML 1.2 (DVC's `-S distill.lr=1e-4`) reads a number; PyYAML a string
    assert parse(p).distill.lr == 1e-4
    msg = refused("distill.lrr", 0.1)
    assert "`distill.lrr` is not a known key" in msg and "distill.lr," in msg

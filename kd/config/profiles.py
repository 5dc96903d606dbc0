"""Profiles: profiles/base.yaml holds every params key; profiles/<name>.yaml overrides a few of them.

A profile may start from another one (`extends: cpu`): the parent's overrides apply first, then its own, so a variant
states only what it changes and cannot drift from the profile it varies (cpu-long is cpu with more eval questions).

`kd profile <name>` writes the merge into params.yaml, comments kept: the base's comments, except that an overridden
key carries the override's end-of-line comment where it has one, and the page starts with the profile's own header. Nested
mappings merge key by key; any other value (lists included) is replaced whole. A profile name is a name, never a
path (kd.core.names.profile), and an override key the base does not have is an error naming it."""

from __future__ import annotations

import copy
import io
from pathlib import Path
from typing import Any

from kd.core.errors import KdError, ParamError

BASE = "base"


def names(root: str | Path = ".") -> list[str]:
    """The profiles a user may pick: profiles/*.yaml but the base."""
    return sorted(p.stem for p in (Path(root) / "profiles").glob("*.yaml") if p.stem != BASE)


def path(name: str, root: str | Path = ".") -> Path:
    """profiles/<name>.yaml for a profile that exists; anything else (a path, the base, a typo) is refused."""
    from kd.core.names import profile as check

    allowed = ", ".join(names(root))
    try:
        check(name)  # a name, never a path: profiles/<name>.yaml is the only file read
    except KdError as e:
        raise KdError(f"{e} (allowed: {allowed})") from None
    src = Path(root) / "profiles" / f"{name}.yaml"
    if name == BASE or not src.is_file():
        raise KdError(f"profile {name!r} does not exist (allowed: {allowed})")
    return src


def _yaml():
    from ruamel.yaml import YAML

    y = YAML()  # round-trip: comments, key order, flow lists and quotes kept
    y.preserve_quotes = True
    y.width = 4096  # never fold the long instruction strings
    y.representer.add_representer(type(None), lambda r, _: r.represent_scalar("tag:yaml.org,2002:null", "null"))
    return y


def _load(p: Path):
    from kd.core.io import read_yaml

    read_yaml(p, "profiles/ ships with the project")  # the strict checks (size, duplicate keys, no aliases) first
    with open(p, encoding="utf-8") as f:
        return _yaml().load(f)


def _comment(over, base, key) -> None:
    """The key's end-of-line comment from the override (the base's where the override has none), followed by the
    base's lines after it (blank lines, the next key's comment)."""
    o = (over.ca.items.get(key) or [None] * 3)[2]
    b = (base.ca.items.get(key) or [None] * 3)[2]
    line = o.value.split("\n", 1)[0] if o is not None else ""
    token = o if line.strip() else b
    if token is None:
        return
    line = token.value.split("\n", 1)[0]
    rest = b.value.split("\n", 1)[1] if b is not None and "\n" in b.value else ""
    token = copy.copy(token)
    token.value = line + "\n" + rest
    slot = list(base.ca.items.get(key) or [None] * 4)
    slot[2] = token
    base.ca.items[key] = slot


def _merge(base, over, prefix: str, src: str) -> None:
    for key, value in over.items():
        if key not in base:
            raise ParamError(prefix + str(key), f"is not a key of profiles/{BASE}.yaml (in {src})",
                             ", ".join(prefix + str(k) for k in base))
        if isinstance(value, dict) and isinstance(base[key], dict):
            _merge(base[key], value, f"{prefix}{key}.", src)
            continue
        if isinstance(value, dict) or isinstance(base[key], dict):
            raise ParamError(prefix + str(key), f"in {src} must be {'a mapping' if isinstance(base[key], dict) else 'a value'}"
                             f", as in profiles/{BASE}.yaml")
        base[key] = value
        _comment(over, base, key)


def _chain(name: str, root: str | Path) -> list[tuple[str, Any]]:
    """The profile and the profiles it extends, each (name, overrides without `extends`), the furthest ancestor first."""
    chain: list[tuple[str, Any]] = []
    while True:
        over = _load(path(name, root))
        if not isinstance(over, dict) or "profile" not in over or over["profile"] != name:
            raise ParamError("profile", f"in profiles/{name}.yaml must be {name!r}")
        if "extends" not in over:  # optional: most profiles override the base directly
            chain.append((name, over))
            return chain[::-1]
        parent = over["extends"]
        del over["extends"]  # the chain carries overrides only
        chain.append((name, over))
        seen = [n for n, _ in chain]
        if parent in seen or parent == BASE:
            raise ParamError("extends", f"in profiles/{name}.yaml names {parent!r}: "
                             + ("the base applies to every profile" if parent == BASE else
                                "a cycle (" + " -> ".join(seen + [parent]) + ")"),
                             ", ".join(n for n in names(root) if n not in seen))
        name = parent  # checked by path(): a listed profile's name, never a path


def render(name: str, root: str | Path = ".") -> str:
    """params.yaml for a profile: the base with the overrides of the profile and of the profiles it extends (furthest
    first), comments kept."""
    chain = _chain(name, root)
    base = _load(Path(root) / "profiles" / f"{BASE}.yaml")
    for n, over in chain:
        _merge(base, over, "", f"profiles/{n}.yaml")
    over = chain[-1][1]
    head = "".join(t.value for t in (over.ca.comment or [None, []])[1] or [])
    srcs = " + ".join(f"profiles/{n}.yaml" for n, _ in chain)
    head += f"# Written by `kd profile {name}` from profiles/{BASE}.yaml + {srcs}.\n"
    out = io.StringIO()
    _yaml().dump(base, out)
    body = out.getvalue()
    # the base's own header (the lines before its first key) gives way to the profile's
    first = body.index("profile:")
    return head + body[first:]


def load(name: str, root: str | Path = ".") -> dict[str, Any]:
    """A profile's params as plain data (what `kd profile <name>` writes to params.yaml, parsed)."""
    import yaml

    return yaml.safe_load(render(name, root))

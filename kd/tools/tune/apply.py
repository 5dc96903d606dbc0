"""`kd tune --apply`: write the study's best values into params.yaml (comments and layout kept, validated first),
and what `dvc status` then reports out of date."""

from __future__ import annotations

from pathlib import Path

from kd.core.errors import KdError
from kd.core.io import read_json, write_text
from kd.tools.tune.results import METRICS

# where a best value goes in params.yaml
PARAM_KEYS = {"alpha": ("alpha",), "temperature": ("temperature",), "lr": ("distill", "lr"),
              "lora_r": ("distill", "lora", "r")}


def apply_best(root: Path = Path("."), params_path: str = "params.yaml") -> dict[str, tuple]:
    """Write metrics/tune.json's best values into params.yaml, keeping its comments and layout (ruamel round trip);
    the result is validated before it replaces the file. Returns {dotted key: (old, new)}."""
    from ruamel.yaml import YAML

    from kd.config.params import load_config, validate

    root = Path(root)
    mpath = root / METRICS
    if not mpath.exists():
        raise KdError(f"{METRICS}: no study results; run `kd tune` first")
    best = (read_json(mpath).get("best") or {}).get("params")
    if not best:
        raise KdError(f"{METRICS}: the study has no complete trial yet; nothing to apply")
    unknown = sorted(set(best) - set(PARAM_KEYS))
    if unknown:
        raise KdError(f"{METRICS}: unknown parameter {unknown[0]!r} (allowed: {', '.join(PARAM_KEYS)})")
    path = root / params_path
    load_config(path, root=root)  # the strict reader first (no anchors, duplicate keys, oversized files)
    rt = YAML(typ="rt")  # round-trip (safe: builds only plain mappings/lists/scalars): comments, order, flow lists kept
    rt.preserve_quotes = True
    rt.width = 4096
    rt.representer.add_representer(  # keep `null` written as null, not as an empty value
        type(None), lambda r, _: r.represent_scalar("tag:yaml.org,2002:null", "null"))
    doc = rt.load(path.read_text(encoding="utf-8"))
    changes = {}
    for name, value in best.items():
        keys = PARAM_KEYS[name]
        node = doc
        for k in keys[:-1]:
            node = node[k]
        old = node[keys[-1]]
        new = int(value) if name == "lora_r" else float(value)
        if old != new:
            node[keys[-1]] = new
            changes[".".join(keys)] = (old, new)
    buf = __import__("io").StringIO()
    rt.dump(doc, buf)
    import yaml

    validate(yaml.safe_load(buf.getvalue()), root=root)  # never write a params file that does not validate
    write_text(path, buf.getvalue())
    return changes


def dvc_stale(root: Path) -> list[str]:
    """Stages `dvc status` reports out of date (what `dvc repro` would re-run first)."""
    import json
    import subprocess
    import sys

    res = subprocess.run([sys.executable, "-m", "dvc", "status", "--json"], cwd=root, capture_output=True, text=True)
    if res.returncode != 0:
        raise KdError(f"dvc status failed: {res.stderr.strip()[-500:]}")
    return sorted(json.loads(res.stdout or "{}"))

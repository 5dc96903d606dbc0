"""`kd bench`'s command: which models, which dtype, which items; the measuring is in speed.py, invariance.py and
dtypes.py, the table in table.py."""

from __future__ import annotations

import json
import tempfile
from pathlib import Path
from typing import Callable

from kd.core.errors import KdError


def default_dtype(root: Path) -> str:
    """What the pipeline computes in here: params.yaml's student.dtype (bf16 or float32), else bfloat16."""
    from kd.config.params import load_config

    params = root / "params.yaml"
    dtype = load_config(params, root=root).student.dtype if params.is_file() else "bfloat16"
    return dtype if dtype in ("bfloat16", "float32") else "bfloat16"


def run(size: str | None, models_dir: Path | None, dtype: str | None, out: Path, *, train: bool, growth: bool,
        only_invariance: bool, only_dtypes: bool, threads: int | None, echo: Callable[..., None]) -> None:
    import torch

    from kd.core.io import write_json

    if threads:
        torch.set_num_threads(threads)
    root = Path.cwd()
    real = models_dir or root / "models"
    dtype = dtype or default_dtype(root)
    if only_dtypes:
        from kd.tools.bench.dtypes import bench_dtypes
        from kd.tools.bench.table import dtypes_table

        result = bench_dtypes(real)
        write_json(out, result)
        echo(dtypes_table(result))
        echo(f"wrote {out}")
        return
    if size is None:
        size = "real" if (real / "teacher" / "config.json").exists() and (real / "student").exists() else "tiny"
    with tempfile.TemporaryDirectory(prefix="kd-bench-") as tmp:
        if size == "tiny" and models_dir is None:
            from kd.models.tiny import save_tiny

            real = Path(tmp)
            for role in ("teacher", "student"):
                save_tiny(f"tiny-{role}", real / role)
        elif not (real / "teacher" / "config.json").exists():
            raise KdError(f"{real}/teacher: no model folder (run `dvc repro model@teacher` or pass --profile tiny)")
        if only_invariance:
            from kd.tools.bench.invariance import run_invariance

            result = run_invariance(real, size, dtype, out, log=lambda m: echo(m, err=True))
            echo(json.dumps(result, indent=1))
            echo(f"wrote {out}")
            return
        from kd.tools.bench.speed import run_bench
        from kd.tools.bench.table import table

        result = run_bench(real, size, dtype, root, out, train=train, growth=growth, log=lambda m: echo(m, err=True))
    echo(table(result))
    echo(f"wrote {out}")

"""`compute.portable: true`: the same bits on any x86-64 CPU with AVX2, at a measured cost (docs/reproducibility.md).

bf16 matmuls go through oneDNN, which picks its kernel by ISA (AMX, AVX512-BF16, AVX-512, AVX2), and each kernel
rounds differently; ATen's own vector kernels (softmax, norms, reductions) differ between AVX2 and AVX-512 widths;
MKL picks its float32 GEMM by CPU. Portable mode computes in float32 (the params' dtypes must say so) with every
library capped at AVX2 and MKL in conditional-numerical-reproducibility mode. The caps are read once, when each
library initialises, so `apply()` runs at the top of a stage script, before anything imports torch."""

from __future__ import annotations

import os
import sys

# Every x86-64 CPU of the last decade has AVX2; the caps make wider ones compute like it.
PORTABLE_ENV = {"ONEDNN_MAX_CPU_ISA": "AVX2", "ATEN_CPU_CAPABILITY": "avx2", "MKL_CBWR": "AVX2,STRICT"}


def enabled(params_path: str = "params.yaml") -> bool:
    import yaml

    try:
        with open(params_path, encoding="utf-8") as f:
            data = yaml.safe_load(f) or {}
    except OSError:
        return False  # no params: the stage's own validation says so
    compute = data.get("compute") if isinstance(data, dict) else None
    return bool(isinstance(compute, dict) and compute.get("portable") is True)


def apply(params_path: str = "params.yaml") -> bool:
    """Set the ISA caps when params say `compute.portable: true`. Must run before torch is imported."""
    if not enabled(params_path):
        return False
    if "torch" in sys.modules:
        raise RuntimeError("kd.core.portable.apply() ran after torch was imported: the ISA caps would not take effect")
    os.environ.update(PORTABLE_ENV)
    return True

"""The weight dtypes kd-prime accepts, by name: one table for params validation, loading and conversion."""

from __future__ import annotations

NAMES = ("bfloat16", "float16", "float32")


def torch_dtype(name: str):
    import torch  # here, not at import time: params validation uses NAMES without loading torch

    return {"bfloat16": torch.bfloat16, "float16": torch.float16, "float32": torch.float32}[name]

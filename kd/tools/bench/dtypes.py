"""`kd bench` item 8: bfloat16 against float32, the matmuls of the pipeline at the models' own shapes, side by side.

Why it is an item: bf16 is fast on a CPU only where the CPU has bf16 instructions (AMX, AVX512-BF16); elsewhere the
math libraries convert, and the backward's grad-input product (grad @ W, the weight not transposed) can fall to a
slow path. On the 2-core AVX2-only AMD EPYC of the 2026-12 sessions, bf16 ran the forward at ~0.35x float32's speed
and the grad-input product at ~0.01x (docs/results.md), which is why the cpu profile computes in float32. Run it on
your machine before choosing `teacher.dtype` / `student.dtype`.

Each pair (bf16, float32) runs alternately, `repeats` times, best time kept; the figure is bf16's speed over
float32's (> 1: bf16 is faster here). The shapes are an MLP's up projection, the largest matmul of a layer:
rows = tokens in one call (a decode step's batch, or a training sequence).
"""

from __future__ import annotations

import json
from pathlib import Path

import torch
import torch.nn.functional as F

from kd.tools.bench.speed import _best, machine

# the cpu profile's pair (Qwen2.5-Coder-1.5B / 0.5B): hidden and intermediate sizes, used without model folders
DEFAULT_SHAPES = {"teacher": (1536, 8960), "student": (896, 4864)}


def mlp_shapes(models_dir: Path | None) -> dict[str, tuple[int, int]]:
    """(hidden_size, intermediate_size) per role, from the model folders' config.json when they exist."""
    from kd.models.vocab import config_value

    shapes = dict(DEFAULT_SHAPES)
    for role in shapes:
        cfg_path = models_dir / role / "config.json" if models_dir else None
        if cfg_path and cfg_path.is_file():
            cfg = json.loads(cfg_path.read_text(encoding="utf-8"))
            hidden, inter = config_value(cfg, "hidden_size"), config_value(cfg, "intermediate_size")
            if isinstance(hidden, int) and isinstance(inter, int):
                shapes[role] = (hidden, inter)
    return shapes


def _pair(op: str, rows: int, hidden: int, inter: int, repeats: int) -> dict:
    gen = torch.Generator().manual_seed(0)
    x32 = torch.randn(rows, hidden, generator=gen)
    g32 = torch.randn(rows, inter, generator=gen)
    w32 = torch.randn(inter, hidden, generator=gen) / hidden ** 0.5
    args = {torch.float32: (x32, g32, w32), torch.bfloat16: tuple(t.bfloat16() for t in (x32, g32, w32))}

    flop = 2 * rows * hidden * inter
    calls = max(1, min(100, round(2e9 / flop)))  # ~2 GFLOP a timing: one small product is too short to time

    def call(dt):
        x, g, w = args[dt]
        one = (lambda: F.linear(x, w)) if op == "forward" else (lambda: g @ w)  # grad-input: dL/dx = g @ W
        return lambda: [one() for _ in range(calls)]

    for dt in args:  # warm-up: first calls pick and pack kernels
        call(dt)()
    times, _ = _best({"bfloat16": call(torch.bfloat16), "float32": call(torch.float32)}, repeats)
    gflops = {k: calls * flop / t / 1e9 for k, t in times.items()}
    return {"op": op, "rows": rows, "shape": [hidden, inter], "gflops": gflops,
            "bf16_over_float32": gflops["bfloat16"] / gflops["float32"]}


def bench_dtypes(models_dir: Path | None, *, decode_rows: int = 16, train_rows: int = 256, repeats: int = 3) -> dict:
    """Forward at a decode step's rows and at a training sequence's, for both models; the grad-input product at a
    training sequence's rows for the student (the only model that trains)."""
    shapes = mlp_shapes(models_dir)
    items = []
    for role, (hidden, inter) in shapes.items():
        for rows in (decode_rows, train_rows):
            items.append({"role": role, **_pair("forward", rows, hidden, inter, repeats)})
    hidden, inter = shapes["student"]
    items.append({"role": "student", **_pair("grad_input", train_rows, hidden, inter, repeats)})
    return {"machine": machine(), "8_dtypes": items}

"""Cost of `compute.portable` (float32, ISA capped at AVX2) against the default (bf16, native kernels).

    python scripts/bench_portable.py [--reps 3]
Each measurement is a child process (the caps are read when the libraries start); the two settings alternate so a
busy machine slows both alike. Workload: greedy generation (batch 4, 64-token prompts, 32 new tokens) with a model
of Qwen2.5-0.5B's width and vocabulary (4 of its 24 layers, random weights), i.e. what teacher@ and eval@ do.
Prints seconds per setting and the ratio; also whether the generated tokens agree between the two."""

from __future__ import annotations

import json
import os
import statistics
import subprocess
import sys
import time

SETTINGS = {"default (bf16, native ISA)": ("bfloat16", {}),
            "portable (float32, AVX2 caps)": ("float32", None)}


def child(dtype_name: str) -> dict:
    import hashlib

    import torch
    from transformers import Qwen2Config, Qwen2ForCausalLM

    torch.manual_seed(0)
    cfg = Qwen2Config(vocab_size=151936, hidden_size=896, intermediate_size=4864, num_hidden_layers=4,
                      num_attention_heads=14, num_key_value_heads=2, max_position_embeddings=1024,
                      tie_word_embeddings=True)
    model = Qwen2ForCausalLM(cfg).to(getattr(torch, dtype_name)).eval()
    ids = torch.randint(0, 151936, (4, 64), generator=torch.Generator().manual_seed(1))
    with torch.no_grad():
        model.generate(ids[:, :8], max_new_tokens=2, do_sample=False, pad_token_id=0)  # warm-up
        t0 = time.perf_counter()
        out = model.generate(ids, attention_mask=torch.ones_like(ids), max_new_tokens=32, min_new_tokens=32,
                             do_sample=False, pad_token_id=0)
        dt = time.perf_counter() - t0
    return {"seconds": dt, "tokens": hashlib.sha256(out.numpy().tobytes()).hexdigest()[:12]}


def main(reps: int) -> None:
    sys.path.insert(0, os.path.dirname(os.path.dirname(os.path.abspath(__file__))))
    from kd.core.portable import PORTABLE_ENV

    times: dict[str, list[float]] = {k: [] for k in SETTINGS}
    hashes: dict[str, set] = {k: set() for k in SETTINGS}
    for _ in range(reps):
        for name, (dtype, env) in SETTINGS.items():
            e = {k: v for k, v in os.environ.items() if k not in PORTABLE_ENV}
            e.update(PORTABLE_ENV if env is None else env)
            r = subprocess.run([sys.executable, __file__, "--child", dtype], env=e, capture_output=True, text=True,
                               check=True)
            res = json.loads(r.stdout.splitlines()[-1])
            times[name].append(res["seconds"])
            hashes[name].add(res["tokens"])
    med = {k: statistics.median(v) for k, v in times.items()}
    for k in SETTINGS:
        print(f"{k:<32} median {med[k]:.2f} s  (runs: {', '.join(f'{t:.2f}' for t in times[k])})  tokens {hashes[k]}")
    a, b = list(SETTINGS)
    print(f"ratio portable / default: {med[b] / med[a]:.2f}x  (torch threads {os.environ.get('OMP_NUM_THREADS', 'default')})")


if __name__ == "__main__":
    if "--child" in sys.argv:
        print(json.dumps(child(sys.argv[sys.argv.index("--child") + 1])))
    else:
        main(int(sys.argv[sys.argv.index("--reps") + 1]) if "--reps" in sys.argv else 3)

"""Which CPU settings change the bits of kd-prime's computations? (docs/reproducibility.md, "Finding the cause")

Run as a child process per setting (oneDNN, MKL and ATen read their ISA caps once, at start-up):
    python scripts/isa_probe.py --matrix          # every setting below, prints a table
    python scripts/isa_probe.py                   # one probe in this process's environment (JSON)
Hashes outputs of: a bf16/fp32 matmul of a real shape (24 tokens x Qwen2.5-1.5B's MLP up-projection), its
1-token (decode) form, and the forward logits of a Qwen2 model with Qwen2.5-0.5B's layer sizes (2 layers,
random weights, seeded) and of the tiny teacher."""

from __future__ import annotations

import hashlib
import json
import os
import subprocess
import sys
import time


def _h(t) -> str:
    import torch
    return hashlib.sha256(t.detach().contiguous().view(torch.uint8).numpy().tobytes()).hexdigest()[:12]


def probe(dtype_name: str) -> dict:
    import torch
    from transformers import Qwen2Config, Qwen2ForCausalLM

    dtype = {"bfloat16": torch.bfloat16, "float32": torch.float32}[dtype_name]
    g = torch.Generator().manual_seed(0)
    a = torch.randn(24, 1536, generator=g).to(dtype)
    b = torch.randn(1536, 8960, generator=g).to(dtype) * 0.02
    out = {"cpu_capability": torch.backends.cpu.get_cpu_capability(), "threads": torch.get_num_threads()}
    out["mm_24x1536x8960"] = _h(a @ b)
    out["mm_1x1536x8960"] = _h(a[:1] @ b)
    t0 = time.perf_counter()
    for _ in range(20):
        a @ b
    out["mm_ms"] = round((time.perf_counter() - t0) / 20 * 1000, 2)
    torch.manual_seed(0)
    cfg = Qwen2Config(vocab_size=4096, hidden_size=896, intermediate_size=4864, num_hidden_layers=2,
                      num_attention_heads=14, num_key_value_heads=2, max_position_embeddings=512,
                      tie_word_embeddings=True)
    m = Qwen2ForCausalLM(cfg).to(dtype).eval()
    ids = torch.randint(0, 4096, (2, 48), generator=g)
    with torch.no_grad():
        out["qwen05_shape_forward"] = _h(m(ids).logits)
        t0 = time.perf_counter()
        for _ in range(3):
            m(ids)
        out["forward_ms"] = round((time.perf_counter() - t0) / 3 * 1000, 1)
    sys.path.insert(0, os.path.dirname(os.path.dirname(os.path.abspath(__file__))))
    from kd.models.tiny import build_model, build_tokenizer
    tok = build_tokenizer()
    tm = build_model("tiny-teacher", len(tok), tok.eos_token_id, tok.pad_token_id).to(dtype).eval()
    with torch.no_grad():
        out["tiny_teacher_forward"] = _h(tm(ids % 256).logits)
    return out


SETTINGS = [
    ("default", {}),
    ("oneDNN AVX512_CORE_AMX", {"ONEDNN_MAX_CPU_ISA": "AVX512_CORE_AMX"}),
    ("oneDNN AVX512_CORE_BF16", {"ONEDNN_MAX_CPU_ISA": "AVX512_CORE_BF16"}),
    ("oneDNN AVX512_CORE", {"ONEDNN_MAX_CPU_ISA": "AVX512_CORE"}),
    ("oneDNN AVX2", {"ONEDNN_MAX_CPU_ISA": "AVX2"}),
    ("ATen avx2", {"ATEN_CPU_CAPABILITY": "avx2"}),
    ("MKL_CBWR AVX2", {"MKL_CBWR": "AVX2"}),
    ("all capped AVX2 (portable)", {"ONEDNN_MAX_CPU_ISA": "AVX2", "ATEN_CPU_CAPABILITY": "avx2",
                                    "MKL_CBWR": "AVX2,STRICT"}),
    ("all capped AVX512_CORE", {"ONEDNN_MAX_CPU_ISA": "AVX512_CORE", "ATEN_CPU_CAPABILITY": "avx512",
                                "MKL_CBWR": "AVX512,STRICT"}),
]


def matrix() -> list[dict]:
    rows = []
    for dtype in ("bfloat16", "float32"):
        for threads in ("1", "2"):
            for name, env in SETTINGS:
                e = {k: v for k, v in os.environ.items()
                     if k not in ("ONEDNN_MAX_CPU_ISA", "ATEN_CPU_CAPABILITY", "MKL_CBWR")}
                e.update(env, OMP_NUM_THREADS=threads, MKL_NUM_THREADS=threads)
                r = subprocess.run([sys.executable, __file__, "--dtype", dtype], env=e, capture_output=True,
                                   text=True, check=True)
                row = {"dtype": dtype, "threads": threads, "setting": name, **json.loads(r.stdout.splitlines()[-1])}
                print(json.dumps(row), flush=True)
                rows.append(row)
    return rows


if __name__ == "__main__":
    if "--matrix" in sys.argv:
        matrix()
    else:
        d = sys.argv[sys.argv.index("--dtype") + 1] if "--dtype" in sys.argv else "bfloat16"
        print(json.dumps(probe(d)))

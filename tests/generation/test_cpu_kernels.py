"""kd/generation/cpu_kernels.py: the decoding-only kernels equal what they replace, and are undone afterwards."""

import numpy as np
import pytest
import torch
from transformers import AutoModelForCausalLM

from kd.generation import cpu_kernels
from kd.generation.cpu_kernels import GQA, decoding_kernels, grouped_query_attention, row_invariant_linears
from kd.generation.decode import greedy_decode


def _load(path, dtype):
    return AutoModelForCausalLM.from_pretrained(str(path), dtype=dtype).eval()


def test_row_invariant_linears_are_undone_and_close(tiny_models):
    model = _load(tiny_models / "teacher", torch.bfloat16)
    ids = torch.randint(0, 256, (5, 17), generator=torch.Generator().manual_seed(0))
    with torch.no_grad():
        plain = model(input_ids=ids).logits
        with row_invariant_linears(model):
            patched = [m for m in model.modules() if "forward" in vars(m)]
            packed = model(input_ids=ids).logits
        after = model(input_ids=ids).logits
    assert len(patched) == sum(isinstance(m, torch.nn.Linear) for m in model.modules())
    torch.testing.assert_close(packed.float(), plain.float(), rtol=2 ** -6, atol=2 ** -6)
    assert torch.equal(plain, after)
    assert not any("forward" in vars(m) for m in model.modules())


def _shapes(path):
    """(out, in) of every Linear of a model folder, from its config (the 0.5B student's when kd bench runs)."""
    model = _load(path, torch.bfloat16)
    return sorted({tuple(m.weight.shape) for m in model.modules() if isinstance(m, torch.nn.Linear)})


@pytest.mark.parametrize("onednn", [True, False], ids=["onednn-packed", "no-onednn-bf16"])
@pytest.mark.parametrize("dtype", [torch.bfloat16, torch.float32])
def test_a_rows_bits_do_not_depend_on_its_batch(tiny_models, dtype, onednn, monkeypatch):
    """What batch-invariant decoding rests on, for every Linear shape of both tiny models plus LoRA-sized and
    real-model-sized ones: under row_invariant_linears a decode step's row gets the same bits whatever the row count
    (1 to 40), the other rows' values and its position (bf16: blocks of exactly ROWS rows on a weight packed for
    them, or F.linear on such blocks; small float32: one multiply and a sum per row). Without the blocks, bf16
    (1536, 8960) differs at 16 rows and (896, 4864) from 33; float32 (MKL) at 1-3 rows against 4 or more.
    no-onednn-bf16: a CPU without oneDNN's bf16 (AVX2 only, e.g. AMD EPYC), where packing
    raises: the same fixed blocks through F.linear."""
    if onednn and not cpu_kernels._packable():
        pytest.skip("oneDNN bf16 packing needs AVX512-BW/VL/DQ or AVX-NE-CONVERT; this CPU has neither")
    if not onednn:
        monkeypatch.setattr(cpu_kernels, "_packable", lambda: False)
    shapes = set(_shapes(tiny_models / "teacher")) | set(_shapes(tiny_models / "student"))
    shapes |= {(4, 896), (896, 4), (896, 896), (4864, 896), (896, 4864), (1536, 8960)}  # LoRA, 0.5B, 1.5B
    g = torch.Generator().manual_seed(0)
    for out_f, in_f in sorted(shapes):
        lin = torch.nn.Linear(in_f, out_f, bias=True).to(dtype)
        x = torch.randn(1, 1, in_f, generator=g).to(dtype)
        with row_invariant_linears(lin), torch.no_grad():
            ref = lin(x)[0, 0]
            for rows in (2, 3, 8, 17, 24, 40):
                batch = torch.randn(rows, 1, in_f, generator=g).to(dtype)
                at = int(torch.randint(0, rows, (1,), generator=g))
                batch[at] = x[0]
                assert torch.equal(lin(batch)[at, 0], ref), (out_f, in_f, rows)


@pytest.mark.parametrize("q", [1, 6])
def test_grouped_query_attention_matches_float64_reference(q):
    """Each key/value head serves its group of query heads (repeat_kv's order), masked columns take no part."""
    g = torch.Generator().manual_seed(1)
    b, h, kvh, length, d = 3, 6, 2, 9, 8
    query = torch.randn(b, h, q, d, generator=g)
    key, value = torch.randn(b, kvh, length, d, generator=g), torch.randn(b, kvh, length, d, generator=g)
    allowed = torch.ones(b, 1, q, length, dtype=torch.bool)
    allowed[0, :, :, :3] = False  # a left-padded row
    allowed[:, :, :, -q:] &= torch.ones(q, q, dtype=torch.bool).tril()  # causal within the new rows
    mask = torch.zeros(b, 1, q, length).masked_fill(~allowed, torch.finfo(torch.float32).min)
    module = torch.nn.Module()
    module.training, module.is_causal, module.num_key_value_groups = False, True, h // kvh
    out, _ = grouped_query_attention(module, query, key, value, mask, scaling=d ** -0.5)
    qn, kn, vn = (x.double().numpy() for x in (query, key, value))
    ref = np.zeros((b, q, h, d))
    for i in range(b):
        for j in range(h):
            s = qn[i, j] @ kn[i, j // (h // kvh)].T * d ** -0.5
            s = np.where(allowed[i, 0].numpy(), s, -np.inf)
            p = np.exp(s - s.max(-1, keepdims=True))
            ref[i, :, j] = (p / p.sum(-1, keepdims=True)) @ vn[i, j // (h // kvh)]
    np.testing.assert_allclose(out.double().numpy(), ref, rtol=1e-5, atol=1e-6)


def test_decoding_kernels_switch_attention_back_and_keep_tokens(tiny_models):
    """Decoding with the kernels gives the tokens of decoding without them (float32 tiny weights: the row-by-row
    path, the grouped attention), and the model's attention implementation is restored afterwards."""
    model = _load(tiny_models / "student", torch.float32)
    before = model.config._attn_implementation
    prompts = [torch.randint(0, 256, (k,), generator=torch.Generator().manual_seed(k)).tolist() for k in (5, 19, 11)]
    with decoding_kernels(model, 3):
        assert model.config._attn_implementation == GQA
    assert model.config._attn_implementation == before
    ours = greedy_decode(model, prompts, max_new_tokens=12, stop_ids=[], pad_id=0, batch_size=3)
    assert model.config._attn_implementation == before
    plain = [model.generate(input_ids=torch.tensor([p]), max_new_tokens=12, do_sample=False, pad_token_id=0)[0, len(p):]
             .tolist() for p in prompts]
    assert ours == plain

"""Faster kernels for batched greedy decoding on the CPU, switched on only while `kd.decode` decodes.

Profiled on this project's 2-core Zen 4 machine (torch 2.13, bf16, the 0.5B student, batch 24, one decode step):
a third of the step was `scaled_dot_product_attention` (its CPU flash kernel spends ~6 ms a layer on a single query
row), and the bf16 matmuls of a 24-row batch ran at ~130 GFLOP/s against ~180 for a long prefill, because oneDNN
re-packs every weight matrix into its blocked layout on each call. Two changes fix that:

- `prepacked_linears`: every bf16 `nn.Linear` (peft's LoRA base layers and the output head included) uses a weight
  packed once by oneDNN (`torch.ops.mkldnn._reorder_linear_weight` / `_linear_pointwise`, what inductor's freezing
  pass uses on the CPU). Same kernel, same blocking of the sum: the logits are bit-identical to `F.linear`
  (tests/test_cpu_kernels.py); measured 130 -> 209 GFLOP/s at 24 rows.
- `grouped_query_attention`, registered as attention implementation "kd_gqa": the eager attention, but each
  key/value head serves its group of query heads as one matrix (no `repeat_kv` copy, 7x fewer, larger matmuls),
  in float32 (what SDPA accumulates in) and cast back. Prefills (several query rows) still go to SDPA.

Both are undone when decoding ends (training and the teacher-signal forward never see them). Off the CPU, for
other dtypes, or where the oneDNN ops are missing, the model is left as it is."""

from __future__ import annotations

from contextlib import contextmanager

import torch
from torch import nn

GQA = "kd_gqa"


def grouped_query_attention(module, query, key, value, attention_mask, scaling, dropout=0.0, **kwargs):
    """query [B, H, Q, D], key/value [B, KVH, L, D], attention_mask additive [B, 1, Q, L] (or None);
    returns ([B, Q, H, D], None) like transformers' eager attention. A prefill (Q > 1) goes to SDPA, which is
    efficient there."""
    b, h, q, d = query.shape
    if q > 1:
        from transformers.integrations.sdpa_attention import sdpa_attention_forward

        return sdpa_attention_forward(module, query, key, value, attention_mask, dropout=dropout, scaling=scaling,
                                      **kwargs)
    kvh = key.shape[1]
    g = h // kvh  # query head i uses key/value head i // g (repeat_kv's order)
    qg = query.reshape(b, kvh, g * q, d).float()
    scores = torch.matmul(qg, key.float().transpose(2, 3)) * scaling  # [B, KVH, G*Q, L]
    if attention_mask is not None:
        mask = attention_mask[:, :, :, : key.shape[-2]].float()  # [B, 1, Q, L]
        scores = (scores.view(b, kvh, g, q, -1) + mask[:, :, None]).view(b, kvh, g * q, -1)
    out = torch.matmul(scores.softmax(dim=-1), value.float())  # [B, KVH, G*Q, D]
    return out.view(b, h, q, d).transpose(1, 2).contiguous().to(query.dtype), None


def _register() -> None:
    from transformers import AttentionInterface
    from transformers.masking_utils import AttentionMaskInterface, eager_mask

    AttentionInterface.register(GQA, grouped_query_attention)
    AttentionMaskInterface.register(GQA, eager_mask)  # an additive float mask, as the eager path takes


def _packable() -> bool:
    return torch.backends.mkldnn.is_available() and hasattr(torch.ops.mkldnn, "_reorder_linear_weight")


@contextmanager
def prepacked_linears(model: nn.Module, rows: int):
    """Every bf16 CPU nn.Linear of `model` runs on a weight packed once (for about `rows` input rows)."""
    patched = []
    if _packable():
        with torch.no_grad():
            for mod in model.modules():
                w = getattr(mod, "weight", None)
                if type(mod) is not nn.Linear or w is None or w.dtype != torch.bfloat16 or w.device.type != "cpu":
                    continue
                packed = torch.ops.mkldnn._reorder_linear_weight(w.detach(), rows)

                def forward(x, packed=packed, bias=mod.bias):
                    return torch.ops.mkldnn._linear_pointwise(x, packed, bias, "none", [], "")

                mod.forward = forward  # an instance attribute: deleting it restores nn.Linear.forward
                patched.append(mod)
    try:
        yield
    finally:
        for mod in patched:
            del mod.forward


@contextmanager
def decoding_kernels(model: nn.Module, rows: int):
    """The kernels above for the duration of a decoding run, on the CPU only."""
    base = model.get_base_model() if hasattr(model, "get_base_model") else model
    before = base.config._attn_implementation
    switch = next(model.parameters()).device.type == "cpu" and before in ("sdpa", "eager")
    if switch:
        _register()
        base.set_attn_implementation(GQA)
    try:
        with prepacked_linears(model, rows):  # packs CPU weights only
            yield
    finally:
        if switch:
            base.set_attn_implementation(before)

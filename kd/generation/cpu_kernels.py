"""Kernels for batched greedy decoding on the CPU, switched on only while `kd.generation.decode` decodes: faster, and
batch-invariant (a row's bits do not depend on which other rows share its batch, how many there are, or where it
sits in the batch).

Why: in bf16 a padded, batched forward rounded a row's last bits differently with different company, and a
near-tied greedy argmax then flipped, so a question's answer depended on its batch and on `eval.limit`. Every
op of a decode step is per row except three, each made invariant here (with kd/generation/decode.py prefilling each prompt
on its own, so a prefill's shapes are the prompt's own):

- Linear layers (`row_invariant_linears`): a matmul's per-row result depends on how many rows it has (MKL's
  float32 matmul takes another path at 1 row than at 2; oneDNN's bf16 kernel blocks the sum differently past
  some row counts: measured on the 1.5B teacher's down projection at 16 and at 28-48 rows, on the 0.5B student's
  from 33), never, measured, on the other rows' values or on the row's position. So a decode step runs every bf16
  nn.Linear on blocks of exactly ROWS rows, zero-padded, on a weight packed once by oneDNN for that row count
  (`torch.ops.mkldnn._reorder_linear_weight` / `_linear_pointwise`, what inductor's freezing uses; it also saves
  oneDNN's re-packing of every weight on every call; on a CPU without oneDNN's bf16 support, e.g. AVX2 only, the
  same fixed blocks go through F.linear). The padding costs compute: a step of 16 rows does the
  work of 32 (`kd bench` item 7 gives the net cost against the previous decoder). Large float32 weights (the cpu
  profile's dtype) run F.linear on the same fixed blocks: MKL's float32 product of a row changes with the row count
  too (measured on the 1.5B teacher's projections, 2-core AVX2 AMD EPYC: at 1-3, 5-7 and 9-11 rows against 32;
  at 1-3 under compute.portable's caps), and within a block of 32, measured, not with the row's position or the
  other rows' values. peft's float32 LoRA layers are small: each row is one multiply and a sum.
- Attention (`grouped_query_attention`, registered as "kd_gqa"): a decode step attends over a left-padded cache
  whose width depends on the other rows. Here each row attends over exactly its own keys (its mask's valid
  columns, a contiguous suffix), in float32 (what SDPA accumulates in), each key/value head serving its group of
  query heads as one matrix (no `repeat_kv` copy). Prefills (one prompt, no padding) go to SDPA.

Both are undone when decoding ends (training and the teacher-signal forward never see them). Off the CPU the model
is left as it is (and batched decoding there is not batch-invariant).

`kd bench` item 7 measures, on the real pair, the tokens at batch 1 against the stage's batch and the cost against
the previous decoder."""

from __future__ import annotations

from contextlib import contextmanager

import torch
import torch.nn.functional as F
from torch import nn

GQA = "kd_gqa"
ROWS = 32  # a decode step's bf16 matmuls run on blocks of exactly this many rows (row_invariant_linears)
SMALL = 64  # a weight with a side this small (LoRA A/B) is computed row by row (row_invariant_linears)
_MODE = {"invariant": True}  # set by decoding_kernels for the attention function (registered once, globally)


def grouped_query_attention(module, query, key, value, attention_mask, scaling, dropout=0.0, **kwargs):
    """query [B, H, Q, D], key/value [B, KVH, L, D], attention_mask additive [B, 1, Q, L] (or None);
    returns ([B, Q, H, D], None) like transformers' eager attention. A prefill (Q > 1) goes to SDPA."""
    b, h, q, d = query.shape
    if q > 1:
        from transformers.integrations.sdpa_attention import sdpa_attention_forward

        return sdpa_attention_forward(module, query, key, value, attention_mask, dropout=dropout, scaling=scaling,
                                      **kwargs)
    kvh, width = key.shape[1], key.shape[-2]
    g = h // kvh  # query head i uses key/value head i // g (repeat_kv's order)
    if not _MODE["invariant"]:  # compute.decode: batched: every row over the whole padded width, at once
        qg = query.reshape(b, kvh, g * q, d).float()
        scores = torch.matmul(qg, key.float().transpose(2, 3)) * scaling  # [B, KVH, G*Q, L]
        if attention_mask is not None:
            mask = attention_mask[:, :, :, :width].float()  # [B, 1, Q, L]
            scores = (scores.view(b, kvh, g, q, -1) + mask[:, :, None]).view(b, kvh, g * q, -1)
        out = torch.matmul(scores.softmax(dim=-1), value.float())  # [B, KVH, G*Q, D]
        return out.view(b, h, q, d).transpose(1, 2).contiguous().to(query.dtype), None
    if attention_mask is None:
        valid = [width] * b
    else:
        allowed = attention_mask[:, 0, 0, :width] == 0  # additive mask: 0 where a key is attended
        valid = allowed.sum(-1).tolist()
        if any(not bool(allowed[r, width - n:].all()) for r, n in enumerate(valid)):
            raise RuntimeError("kd_gqa: a row's attended keys are not a contiguous suffix of the cache")
    out = query.new_empty((b, kvh, g * q, d), dtype=torch.float32)
    for r, n in enumerate(valid):  # each row over its own keys: shapes that depend on the row alone
        qg = query[r].reshape(kvh, g * q, d).float()
        k, v = key[r, :, width - n:].float(), value[r, :, width - n:].float()
        out[r] = torch.matmul((torch.matmul(qg, k.transpose(1, 2)) * scaling).softmax(dim=-1), v)
    return out.view(b, h, q, d).transpose(1, 2).contiguous().to(query.dtype), None


def _register() -> None:
    from transformers import AttentionInterface
    from transformers.masking_utils import AttentionMaskInterface, eager_mask

    AttentionInterface.register(GQA, grouped_query_attention)
    AttentionMaskInterface.register(GQA, eager_mask)  # an additive float mask, as the eager path takes


def _packable() -> bool:
    """oneDNN can pack a bf16 weight here: it needs the CPU's bf16 support (AVX512-BW/VL/DQ or AVX-NE-CONVERT);
    on an AVX2-only CPU (seen: AMD EPYC) `_reorder_linear_weight` raises, so F.linear on fixed blocks is used."""
    return (torch.backends.mkldnn.is_available() and hasattr(torch.ops.mkldnn, "_reorder_linear_weight")
            and torch.ops.mkldnn._is_mkldnn_bf16_supported())


def _row_blocks(x: torch.Tensor, fn) -> torch.Tensor:
    """fn over the rows of x ([n, in]) in blocks of exactly ROWS rows, the last one zero-padded."""
    n = x.shape[0]
    pad = -n % ROWS
    if pad:
        x = torch.cat([x, x.new_zeros((pad, x.shape[1]))])
    return torch.cat([fn(x[i:i + ROWS]) for i in range(0, x.shape[0], ROWS)])[:n]


def _rowwise(x: torch.Tensor, w: torch.Tensor, bias: torch.Tensor | None) -> torch.Tensor:
    """x @ w.T as one multiply and a sum over the last dim per (row, output): the same bits whatever the row count
    (a small weight only: it materialises rows x out x in)."""
    y = (x[..., None, :] * w).sum(-1)
    return y if bias is None else y + bias


@contextmanager
def _patched_linears(model: nn.Module, make_forward):
    """Every CPU nn.Linear of `model` for which `make_forward(mod)` gives a forward runs on it (an instance
    attribute, deleted afterwards: nn.Linear.forward comes back)."""
    patched = []
    with torch.no_grad():
        for mod in model.modules():
            w = getattr(mod, "weight", None)
            if type(mod) is not nn.Linear or w is None or w.device.type != "cpu" or not w.is_floating_point():
                continue
            forward = make_forward(mod)
            if forward is not None:
                mod.forward = forward
                patched.append(mod)
    try:
        yield
    finally:
        for mod in patched:
            del mod.forward


def batched_linears(model: nn.Module, rows: int):
    """compute.decode: batched (the decoder before issue 19): every bf16 CPU nn.Linear on a weight packed once for
    about `rows` rows, called at whatever row count comes (faster; a row's last bits then depend on the count)."""
    def make(mod):
        if not _packable() or mod.weight.dtype != torch.bfloat16:
            return None
        packed = torch.ops.mkldnn._reorder_linear_weight(mod.weight.detach(), rows)
        return lambda x, packed=packed, bias=mod.bias: torch.ops.mkldnn._linear_pointwise(
            x, packed, bias, "none", [], "")
    return _patched_linears(model, make)


def row_invariant_linears(model: nn.Module):
    """Every CPU nn.Linear of `model` whose per-row result can be made independent of the row count: in a decode
    step ([B, 1, in]) a bf16 weight, packed once by oneDNN for ROWS rows, runs on blocks of exactly ROWS rows
    (zero-padded); a small weight (a LoRA A or B: a side of at most SMALL) computes each row as one multiply and a
    sum; a large float32 weight runs F.linear on the same blocks of ROWS rows. Other inputs (a prefill: one prompt's
    own rows) run as they are."""
    def make(mod):
        w, bias = mod.weight, mod.bias
        if w.dtype == torch.bfloat16 and _packable():
            packed = torch.ops.mkldnn._reorder_linear_weight(w.detach(), ROWS)

            def mm(a):
                return torch.ops.mkldnn._linear_pointwise(a, packed, bias, "none", [], "")
        elif w.dtype in (torch.bfloat16, torch.float32) and min(w.shape) > SMALL:
            # bf16 without oneDNN's bf16 support (AVX2), or float32 (MKL): F.linear on the same fixed blocks
            def mm(a):
                return F.linear(a, w, bias)
        elif min(w.shape) <= SMALL:
            return lambda x: _rowwise(x, w, bias) if x.dim() == 3 and x.shape[1] == 1 else F.linear(x, w, bias)
        else:
            return None
        return lambda x: _row_blocks(x[:, 0], mm)[:, None] if x.dim() == 3 and x.shape[1] == 1 else mm(x)
    return _patched_linears(model, make)


@contextmanager
def decoding_kernels(model: nn.Module, rows: int, invariant: bool = True):
    """The kernels above for the duration of a decoding run, on the CPU only: batch-invariant (`compute.decode:
    invariant`, the default), or the faster batched ones for about `rows` rows (`compute.decode: batched`)."""
    base = model.get_base_model() if hasattr(model, "get_base_model") else model
    before = base.config._attn_implementation
    switch = next(model.parameters()).device.type == "cpu" and before in ("sdpa", "eager")
    if switch:
        _register()
        base.set_attn_implementation(GQA)
    _MODE["invariant"] = invariant
    try:
        with row_invariant_linears(model) if invariant else batched_linears(model, rows):  # CPU weights only
            yield
    finally:
        _MODE["invariant"] = True
        if switch:
            base.set_attn_implementation(before)

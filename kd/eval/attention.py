"""Attention-map summaries of causal LMs: entropy, self-focus, density, concentration, cross-layer similarity.

What the original measured (one prompt, per layer, heads averaged) and what is done differently here:

- Every statistic is taken over the *allowed* (causally visible) keys only. The original's "sparsity" was the
  fraction of all q×k entries above 0.1, so the ~half of the map that the causal mask forces to zero was
  counted as "sparse" and the number mostly measured sequence length.
- The first query row (one allowed key, weight 1 on itself by construction) carries no information and is left
  out of every statistic ("informative rows" = rows with at least two allowed keys).
- Entropy is also reported normalised by log(number of allowed keys), so a row over 300 keys and a row over
  3 keys are on the same 0..1 scale (1 = uniform over what the query may see, 0 = one-hot).
- Rows are renormalised over the allowed keys in float64 (half-precision weights do not sum to exactly 1);
  any mass on masked keys beyond rounding is an error, not silently ignored.
- Statistics are computed per head and per prompt, then averaged over heads and prompts (each head of each
  prompt weighs the same), for several prompts rather than one.

Per layer (all in float64):
  entropy       mean over informative rows of  -sum_j a_ij log a_ij           (nats; 0 log 0 = 0)
  entropy_norm  mean over informative rows of  H_i / log(n_i),  n_i = allowed keys of row i
  self_focus    mean over informative rows of  a_ii
  density       fraction of allowed entries (informative rows) with a_ij > DENSITY_THRESHOLD
  top5_mass     mean over rows with more than TOP_K allowed keys of the mass in the TOP_K largest weights
  similarity    cosine similarity of the same head's map in layer l-1 and layer l, over the allowed entries of
                informative rows (None for layer 0)
"""

from __future__ import annotations

from pathlib import Path
from typing import Iterable, Sequence

import numpy as np

from kd.core.errors import KdError

DENSITY_THRESHOLD = 0.1
TOP_K = 5
STATS = ("entropy", "entropy_norm", "self_focus", "density", "top5_mass", "similarity")
MASKED_MASS_TOL = 1e-2  # per row; bf16 rounding leaves ~1e-3 at most, a leaking mask leaves far more


def causal_mask(q: int, k: int | None = None) -> np.ndarray:
    """Allowed[i, j] = key j is visible to query i (query i sits at key position i + (k - q))."""
    k = q if k is None else k
    return np.tril(np.ones((q, k), dtype=bool), k=k - q)


def _prepare(attn, allowed):
    a = np.asarray(attn, dtype=np.float64)
    if a.ndim == 2:
        a = a[None]
    if a.ndim != 3:
        raise ValueError(f"attention must be (heads, queries, keys), got shape {a.shape}")
    _, q, k = a.shape
    if k < q:
        raise ValueError(f"more queries than keys: {a.shape}")
    allowed = causal_mask(q, k) if allowed is None else np.asarray(allowed, dtype=bool)
    if allowed.shape != (q, k):
        raise ValueError(f"allowed mask shape {allowed.shape} does not match attention {a.shape}")
    if not np.isfinite(a).all():
        raise KdError("attention weights contain NaN/inf")
    masked_mass = np.where(allowed, 0.0, np.abs(a)).sum(-1)
    if masked_mass.max(initial=0.0) > MASKED_MASS_TOL:
        raise KdError(f"attention puts {masked_mass.max():.3g} of a row's mass on masked keys: "
                      "the mask passed does not match the model's (is the model causal?)")
    a = np.where(allowed, a, 0.0)
    total = a.sum(-1, keepdims=True)
    a = np.divide(a, total, out=np.zeros_like(a), where=total > 0)
    return a, allowed


def head_stats(attn, allowed=None, threshold: float = DENSITY_THRESHOLD, top_k: int = TOP_K) -> dict:
    """Statistics of one layer's maps, per head: attn (heads, q, k) or (q, k); allowed (q, k) bool, default
    causal. Returns {stat: array (heads,)} for every stat but similarity (NaN where undefined)."""
    a, allowed = _prepare(attn, allowed)
    q = a.shape[1]
    n_allowed = allowed.sum(-1)  # (q,)
    rows = n_allowed >= 2  # informative rows
    # query i's own key sits at position i + (k - q) (a cache offset; 0 for a plain forward pass)
    diag = np.zeros(allowed.shape, dtype=bool)
    diag[np.arange(q), np.arange(q) + allowed.shape[1] - q] = True
    diag &= allowed

    nan = np.full(a.shape[0], np.nan)
    out = {}
    if rows.any():
        plogp = np.where(a > 0, a * np.log(np.where(a > 0, a, 1.0)), 0.0)
        h = -plogp.sum(-1)  # (heads, q)
        out["entropy"] = h[:, rows].mean(-1)
        out["entropy_norm"] = (h[:, rows] / np.log(n_allowed[rows])).mean(-1)
        out["self_focus"] = np.where(diag, a, 0.0).sum(-1)[:, rows].mean(-1)
        cells = allowed & rows[:, None]
        out["density"] = ((a > threshold) & cells).sum((-1, -2)) / cells.sum()
    else:
        out.update(entropy=nan, entropy_norm=nan, self_focus=nan, density=nan)
    long_rows = n_allowed > top_k
    if long_rows.any():
        top = -np.partition(-a[:, long_rows, :], top_k - 1, axis=-1)[..., :top_k]
        out["top5_mass"] = top.sum(-1).mean(-1)
    else:
        out["top5_mass"] = nan
    return out


def layer_similarity(prev, cur, allowed=None) -> np.ndarray:
    """Cosine similarity, per head, of two layers' maps over the allowed entries of informative rows."""
    a, allowed = _prepare(prev, allowed)
    b, _ = _prepare(cur, allowed)
    cells = allowed & (allowed.sum(-1) >= 2)[:, None]
    x, y = a[:, cells], b[:, cells]
    den = np.linalg.norm(x, axis=-1) * np.linalg.norm(y, axis=-1)
    return np.divide((x * y).sum(-1), den, out=np.full(den.shape, np.nan), where=den > 0)


def summarise(prompts_layers: Iterable[Sequence]) -> list[dict]:
    """prompts_layers: per prompt, a sequence of per-layer attention arrays (heads, q, q).
    Returns one dict per layer {layer, <stat>: float | None}, averaged over heads and prompts."""
    per_layer: list[dict[str, list[np.ndarray]]] = []
    for layers in prompts_layers:
        prev = None
        for li, attn in enumerate(layers):
            a = np.asarray(attn, dtype=np.float64)
            if a.ndim == 4:  # (batch=1, heads, q, k) as returned by HF
                if a.shape[0] != 1:
                    raise ValueError("pass one prompt at a time (batch size 1, no padding)")
                a = a[0]
            while len(per_layer) <= li:
                per_layer.append({s: [] for s in STATS})
            for s, v in head_stats(a).items():
                per_layer[li][s].append(v)
            if prev is not None:
                per_layer[li]["similarity"].append(layer_similarity(prev, a))
            prev = a
    result = []
    for li, acc in enumerate(per_layer):
        row = {"layer": li}
        for s in STATS:
            vals = np.concatenate(acc[s]) if acc[s] else np.array([])
            vals = vals[np.isfinite(vals)]
            row[s] = float(vals.mean()) if vals.size else None
        result.append(row)
    return result


# ---------------------------------------------------------------------------------------------- models


def render_prompt(tokenizer, question: str, instruction: str) -> list[int]:
    """Token ids of an eval prompt, built exactly as eval builds them (kd.data.prompting): question + "\\n" +
    instruction as the one user turn, chat template, generation prompt appended."""
    from kd.data.prompting import chat_ids, render_question

    return chat_ids(tokenizer, render_question(question, instruction))


def model_attention(model, sequences: Sequence[Sequence[int]]) -> list[dict]:
    """Per-layer summary (see module doc) of `model`'s attention over each token sequence, one at a time."""
    import torch

    if not sequences:
        raise KdError("no prompts for the attention summary (report.attention_prompts must be >= 1)")
    device = next(model.parameters()).device

    def maps():
        for ids in sequences:
            with torch.no_grad():
                out = model(input_ids=torch.tensor([list(ids)], device=device), output_attentions=True,
                            use_cache=False)
            att = out.attentions
            if not att or any(x is None for x in att):
                raise KdError("the model returned no attention weights: load it with "
                              "attn_implementation='eager' (sdpa/flash attention do not return them)")
            yield [x[0].float().cpu().numpy() for x in att]

    return summarise(maps())


def load_for_attention(name: str, models_dir: str | Path = "models", dtype: str = "bfloat16",
                       trust_remote_code: bool = False, device: str | None = None, strategies: Sequence[str] = ()):
    """A student arm exactly as evaluated (adapter unmerged, kd.models.loading.load_adapted), with eager attention so
    the weights are returned."""
    from kd.config.arms import resolve, student_arms
    from kd.models.loading import load_adapted

    if name not in student_arms(strategies):
        raise KdError(f"attention summary is for the student arms ({', '.join(student_arms(strategies))}), "
                      f"not {name!r}")
    arm = resolve(name, strategies, models_dir)
    return load_adapted(arm.model_dir, arm.adapter_dir, dtype=dtype, trust_remote_code=trust_remote_code,
                        attn_implementation="eager", device=device)


def eval_prompts(n: int, instruction: str, tokenizer, root: str | Path = ".") -> list[list[int]]:
    """Token ids of the first `n` eval questions (data/prepared/eval.jsonl), rendered as eval renders them."""
    from kd.core.io import read_jsonl

    questions = [r["question"] for r in read_jsonl(Path(root) / "data/prepared/eval.jsonl")[:n]]
    if len(questions) < n:
        raise KdError(f"report.attention_prompts = {n} but data/prepared/eval.jsonl has {len(questions)} rows")
    return [render_prompt(tokenizer, q, instruction) for q in questions]


def arm_attention(arm: str, strategies: Sequence[str], n_prompts: int, instruction: str, dtype: str = "bfloat16",
                  trust_remote_code: bool = False, root: str | Path = ".") -> list[dict]:
    """Per-layer rows {layer, <stats>} of one student arm (kd.config.arms.student_arms) over the first `n_prompts` eval
    questions, rendered as eval renders them; [] for n_prompts = 0."""
    from kd.models.loading import load_tokenizer

    root = Path(root)
    if n_prompts <= 0:
        return []
    tok = load_tokenizer(root / "models/student", trust_remote_code=trust_remote_code)
    seqs = eval_prompts(n_prompts, instruction, tok, root)
    model = load_for_attention(arm, root / "models", dtype=dtype, trust_remote_code=trust_remote_code,
                               strategies=strategies)
    return model_attention(model, seqs)

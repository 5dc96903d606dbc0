"""Greedy decoding with continuous batching: the one decoder of the teacher stage and of eval.

A fixed-batch `generate` runs every batch to its longest row: with answers of ~67 of 160 tokens most rows
sit idle. Here the batch stays full instead: a row leaves as soon as it emits a stop token (or a stop string,
or reaches `max_new_tokens`) and the next waiting prompt joins. Prompts are admitted longest first (ties by
their index), so the schedule -- and with it every output -- is a pure function of the inputs.

Mechanics, over the plain HF forward (so a peft PeftModel with an *unmerged* LoRA adapter works as is): one
left-padded DynamicCache for the running rows, an explicit attention mask over its columns and explicit
position ids (a row's position = its real tokens so far, padding excluded, as HF `generate` computes them).
Finished rows leave by `index_select` on the batch dimension; each new prompt is prefilled on its own (its shapes,
and so its bits, are its own) and its cache is left-padded to the running width (or the running cache to its) and
concatenated. Columns that every row masks are trimmed, so the width stays the longest live row. While it decodes,
the model runs on kd/generation/cpu_kernels.py's kernels (on the CPU), undone afterwards.

Why not transformers' own continuous batching (`model.generate_batch`, paged cache, 5.23)? Measured on this
project's 2-core CPU, tiny float32 teacher, 16 prompts x 40 new tokens: 9.2-13.1 s against 7.8 s for plain
`generate` one prompt at a time (slower, its scheduler and paged attention are built for CUDA), and only 13
of the 16 rows matched `generate` greedy token for token. It also accepts only its own attention kernels
("paged|sdpa"...), not a peft-wrapped model's forward as is.

Exactness (issue 19): on the CPU the decoder is batch-invariant: a row's tokens do not depend on which rows share its
batch, on the batch size or on how many prompts are decoded (per-prompt prefills, kd/generation/cpu_kernels.py's row-invariant
matmuls and per-row attention). tests/generation/test_decode.py checks it in bf16 on a model wide enough to show the effect
(the decoder before this one changed 3 of 12 rows between batch 1 and 4 there), with and without an unmerged LoRA;
`kd bench` item 7 checks it on the real pair, with its cost. Against HF `generate` at batch 1 a row is equal up to
floating-point arithmetic (its kernels differ from ours): in float32 on the tiny models every token is equal
(tests/generation/test_decode.py). Outputs are byte-identical run to run: the schedule is deterministic and CPU kernels are.

On tiny models a decode step costs the same ~15 ms of per-layer Python overhead whatever the batch, so
`kd bench` there measures scheduling (fewer steps), not arithmetic; the decode/forward ceiling ratio is
meaningful on the real pair only.
"""

from __future__ import annotations

from collections import deque
from typing import Callable, Iterable, Sequence

import torch
import torch.nn.functional as F
from transformers import DynamicCache

from kd.generation.cpu_kernels import decoding_kernels


def _config(model):
    base = model.get_base_model() if hasattr(model, "get_base_model") else model
    return base.config


def _pad_left(t: torch.Tensor, width: int, dim: int) -> torch.Tensor:
    extra = width - t.shape[dim]
    if extra == 0:
        return t
    shape = list(t.shape)
    shape[dim] = extra
    return torch.cat([t.new_zeros(shape), t], dim=dim)


class _Batch:
    """The running rows: their cache, mask, positions, generated tokens."""

    def __init__(self):
        self.rows: list[int] = []          # prompt index per batch row
        self.gen: list[list[int]] = []     # tokens generated so far per row
        self.cache: DynamicCache | None = None
        self.mask = torch.zeros((0, 0), dtype=torch.long)  # (rows, cache width)
        self.pos = torch.zeros((0,), dtype=torch.long)      # next position id per row

    def keep(self, idx: list[int]) -> None:
        sel = torch.tensor(idx, dtype=torch.long, device=self.mask.device)
        self.rows = [self.rows[i] for i in idx]
        self.gen = [self.gen[i] for i in idx]
        self.mask, self.pos = self.mask[sel], self.pos[sel]
        if not idx:
            self.cache = None
            self.mask = self.mask[:, :0]
            return
        self.cache.batch_select_indices(sel)
        # drop leading columns no remaining row attends to (a long row left)
        used = self.mask.any(dim=0).nonzero()
        start = int(used[0]) if len(used) else self.mask.shape[1]
        if start:
            self.mask = self.mask[:, start:]
            for layer in self.cache.layers:
                layer.keys, layer.values = layer.keys[:, :, start:], layer.values[:, :, start:]

    def join(self, other: "_Batch", config) -> None:
        if self.cache is None:
            self.rows, self.gen, self.cache, self.mask, self.pos = (other.rows, other.gen, other.cache,
                                                                    other.mask, other.pos)
            return
        width = max(self.mask.shape[1], other.mask.shape[1])
        kv = []
        for a, b in zip(self.cache.layers, other.cache.layers):
            kv.append((torch.cat([_pad_left(a.keys, width, 2), _pad_left(b.keys, width, 2)]),
                       torch.cat([_pad_left(a.values, width, 2), _pad_left(b.values, width, 2)])))
        self.cache = DynamicCache(kv, config=config)
        self.mask = torch.cat([_pad_left(self.mask, width, 1), _pad_left(other.mask, width, 1)])
        self.pos = torch.cat([self.pos, other.pos])
        self.rows += other.rows
        self.gen += other.gen


@torch.no_grad()
def greedy_decode(model, prompts: Sequence[Sequence[int]], *, max_new_tokens: int, stop_ids: Sequence[int],
                  pad_id: int, batch_size: int, stop_fn: Callable[[list[int]], bool] | None = None,
                  on_finish: Callable[[int, list[int]], None] | None = None,
                  invariant: bool = True) -> list[list[int]]:
    """Greedy continuation of every prompt (token ids); returns the generated ids per prompt, in input order.

    A row ends after emitting a token in `stop_ids` (kept, as `generate` keeps its eos), when `stop_fn(tokens)`
    says so (e.g. a stop string appeared), or at `max_new_tokens`. `on_finish(index, tokens)` is called as
    each row ends (in a deterministic order). At most `batch_size` rows run at once. `invariant` (compute.decode:
    invariant, the default): a row's tokens do not depend on its batch; False (batched): the decoder before issue
    19, prompts admitted together prefilled in one padded batch, faster kernels whose last bits depend on the batch."""
    if batch_size < 1 or max_new_tokens < 0:
        raise ValueError(f"batch_size must be >= 1 and max_new_tokens >= 0, got {batch_size}, {max_new_tokens}")
    config = _config(model)
    device = next(model.parameters()).device
    stops = set(int(t) for t in stop_ids)
    out: list[list[int] | None] = [None] * len(prompts)
    waiting = deque(sorted(range(len(prompts)), key=lambda i: (-len(prompts[i]), i)))
    run = _Batch()
    run.mask = run.mask.to(device)
    run.pos = run.pos.to(device)

    def finish(i: int, toks: list[int]) -> None:
        out[i] = toks
        if on_finish:
            on_finish(i, toks)

    if max_new_tokens == 0:
        for i in list(waiting):
            finish(i, [])
        return out

    def done(toks: list[int]) -> bool:
        return toks[-1] in stops or len(toks) >= max_new_tokens or bool(stop_fn and stop_fn(toks))

    def forward(ids, mask, pos, cache):
        res = model(input_ids=ids, attention_mask=mask, position_ids=pos, past_key_values=cache, use_cache=True,
                    logits_to_keep=1)
        return res.logits[:, -1, :].float().argmax(dim=-1).tolist(), res.past_key_values

    with decoding_kernels(model, batch_size, invariant):  # on the CPU (kd/generation/cpu_kernels.py)
        while waiting or run.rows:
            free = batch_size - len(run.rows)
            if waiting and free and not invariant:  # compute.decode: batched: one padded prefill for all of them
                new = _Batch()
                new.rows = [waiting.popleft() for _ in range(min(free, len(waiting)))]
                width = len(prompts[new.rows[0]])  # longest first: the first is the widest
                ids = torch.full((len(new.rows), width), pad_id, dtype=torch.long)
                new.mask = torch.zeros((len(new.rows), width), dtype=torch.long)
                for r, i in enumerate(new.rows):
                    n = len(prompts[i])
                    ids[r, width - n:] = torch.tensor(list(prompts[i]), dtype=torch.long)
                    new.mask[r, width - n:] = 1
                ids, new.mask = ids.to(device), new.mask.to(device)
                pos = (new.mask.cumsum(-1) - 1).clamp(min=0)
                first, new.cache = forward(ids, new.mask, pos, DynamicCache(config=config))
                new.pos = new.mask.sum(-1)
                new.gen = [[t] for t in first]
                run.join(new, config)
            elif waiting and free:
                for _ in range(min(free, len(waiting))):
                    # each prompt is prefilled on its own: its shapes, and so its bits, are its own
                    new = _Batch()
                    new.rows = [waiting.popleft()]
                    n = len(prompts[new.rows[0]])
                    ids = torch.tensor([list(prompts[new.rows[0]])], dtype=torch.long, device=device)
                    new.mask = torch.ones((1, n), dtype=torch.long, device=device)
                    pos = torch.arange(n, device=device)[None]
                    first, new.cache = forward(ids, new.mask, pos, DynamicCache(config=config))
                    new.pos = torch.tensor([n], dtype=torch.long, device=device)
                    new.gen = [[t] for t in first]
                    run.join(new, config)
            else:
                ids = torch.tensor([[g[-1]] for g in run.gen], dtype=torch.long, device=device)
                run.mask = F.pad(run.mask, (0, 1), value=1)
                nxt, run.cache = forward(ids, run.mask, run.pos[:, None], run.cache)
                run.pos = run.pos + 1
                for g, t in zip(run.gen, nxt):
                    g.append(t)
            ended = [r for r, g in enumerate(run.gen) if done(g)]
            if ended:
                for r in ended:
                    finish(run.rows[r], run.gen[r])
                run.keep([r for r in range(len(run.rows)) if r not in set(ended)])
    return out


def response_length(tokens: Sequence[int], stop_ids: Iterable[int]) -> tuple[int, bool]:
    """(tokens before the first stop token, whether there was one): a response's length as the eval reports it."""
    stops = set(stop_ids)
    return next(((j, True) for j, tok in enumerate(tokens) if tok in stops), (len(tokens), False))


def lm_eval_generate_until(lm, requests, disable_tqdm: bool = False) -> list[str]:
    """lm-eval's HFLM.generate_until, with the batch decoding done by `greedy_decode` over all requests at once.

    Kept from HFLM, so lm-eval's scoring sees what HF `generate` at batch size 1 would give: the context
    encoding (`tok_batch_encode`, left truncation to max_length - max_gen_toks), its stop strings (the eot token
    appended, checked per row on the decoded last len(stop)+2 tokens, as its MultiTokenEOSCriteria does), the
    response decoded with `lm.tok_decode` and cut by `postprocess_generated_text`, and the cache hook call per
    response. Where `lm` has `token_counts` (kd's HFLM, kd.eval.evaluate), each response's length before its stop
    token is recorded there, by context. Greedy only: anything else is refused."""
    import json

    from lm_eval.models.utils import handle_stop_sequences, normalize_gen_kwargs, postprocess_generated_text
    from tqdm import tqdm

    from kd.core.errors import KdError

    args = [req.args for req in requests]
    groups: dict[str, list[int]] = {}
    for i, (_, gen_kwargs) in enumerate(args):
        groups.setdefault(json.dumps(gen_kwargs, sort_keys=True, default=str), []).append(i)
    eot = lm.tok_decode(lm.eot_token_id, skip_special_tokens=False)
    base = lm.model.get_base_model() if hasattr(lm.model, "get_base_model") else lm.model
    eos = base.generation_config.eos_token_id
    stop_ids = sorted(set(([] if eos is None else [eos] if isinstance(eos, int) else list(eos))
                          + list(getattr(lm, "stop_ids", ()))))
    res: list[str | None] = [None] * len(args)
    counts = getattr(lm, "token_counts", None)  # kd's HFLM: context -> (tokens before the stop token, stopped?)
    pbar = tqdm(total=len(args), disable=disable_tqdm or lm.rank != 0, desc="Running generate_until requests")
    for idxs in groups.values():
        gen_kwargs = args[idxs[0]][1]
        kwargs = normalize_gen_kwargs(gen_kwargs, lm.max_gen_toks)
        until = handle_stop_sequences(kwargs.pop("until", None), eos=eot)
        max_gen = int(kwargs.pop("max_gen_toks"))
        if kwargs.pop("do_sample", False) or kwargs.pop("temperature", 0.0) or kwargs:
            raise KdError(f"eval decodes greedily only; the task asks for generation kwargs {gen_kwargs!r}")
        prompts = [lm.tok_batch_encode([args[i][0]], left_truncate_len=lm.max_length - max_gen,
                                       truncation=lm.truncation)[0][0].tolist() for i in idxs]
        lookback = [(s, len(lm.tokenizer.encode(s, add_special_tokens=False)) + 2) for s in until]

        def stop_fn(toks: list[int]) -> bool:
            return any(s in lm.tokenizer.decode(toks[-n:]) for s, n in lookback)

        outs = greedy_decode(lm.model, prompts, max_new_tokens=max_gen, stop_ids=stop_ids,
                             pad_id=lm.tokenizer.pad_token_id, batch_size=int(lm.batch_size), stop_fn=stop_fn,
                             on_finish=lambda *_: pbar.update(1), invariant=getattr(lm, "kd_invariant", True))
        for i, toks in zip(idxs, outs):
            think = lm.think_end_token
            if isinstance(think, int) and think in toks:
                toks = toks[len(toks) - toks[::-1].index(think):]
            s = lm.tok_decode(toks)
            if isinstance(think, int):
                s = s.lstrip()
            s = postprocess_generated_text(generation=s, stop=until,
                                           think_end_token=think if isinstance(think, str) else None)
            res[i] = s
            lm.cache_hook.add_partial("generate_until", args[i], s)
            if counts is not None:  # the eval's response length: tokens before the first stop token
                counts[args[i][0]] = response_length(toks, lm.stop_ids)
    pbar.close()
    return res

"""`kd bench` item 7 (issue 19): is decoding batch-invariant, and what does it cost? The decoder's tokens at the
stage's batch against batch 1 and against fewer prompts (`eval.limit`), for `compute.decode: invariant` (the default)
and `batched` (the decoder before it), and the invariant one's tokens/s over the batched one's (same prompts,
alternately). `kd bench --only-invariance` runs this item alone."""

from __future__ import annotations

from pathlib import Path
from typing import Callable

from kd.generation.decode import greedy_decode
from kd.tools.bench.speed import SIZES, _best, _stops, machine, prompts_for


def bench_invariance(model, tokenizer, *, n: int, batch: int, max_new: int, b1_rows: int, repeats: int) -> dict:
    """7: does a row's output depend on its batch? invariant vs batched decoding of the same prompts."""
    pad = tokenizer.pad_token_id
    prompts = prompts_for(tokenizer, n)
    stops = _stops(model, tokenizer, prompts, max_new)

    def run(invariant: bool, rows, b):
        return greedy_decode(model, rows, max_new_tokens=max_new, stop_ids=stops, pad_id=pad, batch_size=b,
                             invariant=invariant)

    times, res = _best({"invariant": lambda: run(True, prompts, batch),
                        "batched": lambda: run(False, prompts, batch)}, repeats)
    tps = {k: sum(map(len, res[k])) / times[k] for k in times}
    out = {"prompts": n, "batch": batch, "max_new_tokens": max_new, "batch1_rows": b1_rows, "limit_rows": n // 2,
           "seconds": times, "tokens_per_s": tps, "invariant_over_batched_speed": tps["invariant"] / tps["batched"]}
    for mode, inv in (("invariant", True), ("batched", False)):
        alone = [run(inv, [q], 1)[0] for q in prompts[:b1_rows]]
        fewer = run(inv, prompts[:n // 2], batch)
        out[mode] = {"rows_equal_to_batch1": sum(a == b for a, b in zip(res[mode][:b1_rows], alone)),
                     "rows_equal_with_fewer_prompts": sum(a == b for a, b in zip(res[mode][:n // 2], fewer))}
    return out


def run_invariance(models_dir: Path, size: str, dtype: str, out: Path, log: Callable[[str], None] = print) -> dict:
    """Item 7 alone (`kd bench --only-invariance`), for both models."""
    from kd.core.io import write_json
    from kd.core.seeding import seed_everything
    from kd.models.loading import load_model, load_tokenizer

    cfg = SIZES[size]
    result = {"machine": machine(), "size": size, "dtype": dtype, "models": {}}
    for role in ("teacher", "student"):
        seed_everything(0)
        log(f"bench: batch invariance, {role}")
        result["models"][role] = {"7_invariance": bench_invariance(
            load_model(models_dir / role, dtype, device="cpu"), load_tokenizer(models_dir / role), n=cfg["n"],
            batch=cfg["batch"], max_new=cfg["max_new"], b1_rows=cfg["b1_rows"], repeats=cfg["repeats"])}
    write_json(out, result)
    return result

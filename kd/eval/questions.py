"""results/eval/<arm>.jsonl: one git-tracked row per evaluated question, the format's writer side (the eval stage,
kd.eval.evaluate) and reader side (kd pr-report, at any commit) in one place.

A row, sorted by id, sorted keys: id, gold, strict and flexible (the extracted answers, null when none),
correct_strict and correct_flexible (bools), tokens (response tokens), truncated (cut off at eval.max_new_tokens)."""

from __future__ import annotations

from typing import Iterable, Sequence

from kd.core.errors import ArtefactError

QUESTION_KEYS = ("id", "gold", "strict", "flexible", "correct_strict", "correct_flexible", "tokens", "truncated")
BOOLS = ("correct_strict", "correct_flexible")


def question_rows(rows: Sequence[dict]) -> list[dict]:
    """The per-question rows, derived from the eval stage's samples.jsonl rows (kd.eval.lm_harness.rows_from_samples
    plus response_tokens / truncated): the same rows, without prompt and response."""
    return [{"id": r["id"], "gold": r["gold"], "strict": r["pred_strict"], "flexible": r["pred_flexible"],
             "correct_strict": bool(r["correct_strict"]), "correct_flexible": bool(r["correct_flexible"]),
             "tokens": int(r["response_tokens"]), "truncated": bool(r["truncated"])}
            for r in sorted(rows, key=lambda r: r["id"])]


def read_question_rows(lines: Iterable[str], where: str) -> dict[int, dict]:
    """Rows by id, validated (int ids, unique; bool correctness); ArtefactError naming `where:line` otherwise."""
    from kd.core.io import iter_jsonl

    rows: dict[int, dict] = {}
    for n, r in iter_jsonl(lines, where):
        i = r.get("id")
        if not isinstance(i, int) or isinstance(i, bool):
            raise ArtefactError(f"{where}:{n}: `id` must be an integer, got {i!r}")
        if i in rows:
            raise ArtefactError(f"{where}:{n}: duplicate id {i}")
        for k in BOOLS:
            if not isinstance(r.get(k), bool):
                raise ArtefactError(f"{where}:{n}: `{k}` must be true or false, got {r.get(k)!r}")
        rows[i] = r
    if not rows:
        raise ArtefactError(f"{where}: no rows (re-run its eval stage and commit)")
    return rows

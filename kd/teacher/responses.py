"""Teacher generation: greedy, batched, through the chat template; one response per transfer question.

Responses are kept as token ids (not just text): the logits and distill stages reuse exactly these ids, so
teacher and student are compared on the same tokens — re-tokenising text could split them differently."""

from __future__ import annotations

import hashlib
import json
import sys
from dataclasses import dataclass
from pathlib import Path
from typing import TYPE_CHECKING, Callable

from kd.core.errors import ArtefactError
from kd.core.io import read_json, sha256_file, write_json
from kd.core.launch import barrier
from kd.data.answers import score
from kd.data.prompting import chat_ids, teacher_text

if TYPE_CHECKING:
    from kd.config.params import Params


def build_prompts(rows: list[dict], template: str, instruction: str, tokenizer) -> list[dict]:
    return [{"id": r["id"], "prompt_ids": chat_ids(tokenizer, teacher_text(template, r, instruction))}
            for r in rows]


# Rows per resumable unit, in batches: a chunk is decoded with continuous batching and persisted whole, so a
# killed run resumes at a chunk boundary and recomputes exactly what it would have (a row's last bits may depend
# on which rows shared its batch). Larger chunks waste less on draining the batch at each chunk's end.
CHUNK_BATCHES = 4


def chunks(prompts: list[dict], batch_size: int) -> list[list[dict]]:
    """Longest prompts first (less padding, early OOM); ties broken by id — a fixed order on every run."""
    order = sorted(prompts, key=lambda p: (-len(p["prompt_ids"]), p["id"]))
    size = batch_size * CHUNK_BATCHES
    return [order[i:i + size] for i in range(0, len(order), size)]


def generate_chunk(model, tokenizer, chunk: list[dict], max_new_tokens: int, batch_size: int,
                   on_answer: Callable[[int], None] | None = None, invariant: bool = True) -> list[list[int]]:
    """Greedy responses (eos kept: the student learns to stop) through the continuous-batching decoder;
    `on_answer(tokens)` as each answer finishes."""
    from kd.generation.decode import greedy_decode

    return greedy_decode(model, [p["prompt_ids"] for p in chunk], max_new_tokens=max_new_tokens,
                         stop_ids=_eos_ids(model, tokenizer), pad_id=tokenizer.pad_token_id, batch_size=batch_size,
                         on_finish=(lambda i, toks: on_answer(len(toks))) if on_answer else None,
                         invariant=invariant)


def _eos_ids(model, tokenizer) -> list[int]:
    eos = model.generation_config.eos_token_id
    eos = [eos] if isinstance(eos, int) else list(eos or [])
    if tokenizer.eos_token_id is not None and tokenizer.eos_token_id not in eos:
        eos.append(tokenizer.eos_token_id)
    return eos


@dataclass(frozen=True)
class Generation:
    """One teacher generation run: what is asked (template, instruction), how it is decoded (kd.generation.decode:
    budget, batch, compute.decode's `invariant`), and where finished chunks are kept for a resume (`work`), under a
    `fingerprint` of everything the responses depend on: a chunk from other settings is never reused."""
    template: str
    instruction: str
    max_new_tokens: int
    batch_size: int
    work: Path
    fingerprint: str
    invariant: bool = True

    @classmethod
    def of(cls, c: Params, template: str, work: Path, model_dir: str | Path = "models/teacher") -> Generation:
        """The teacher stage's run from its typed params."""
        t = c.teacher
        fp = fingerprint(template, c.prompting.instruction, {**t.model_dump(), "decode": c.compute.decode}, c.seed,
                         model_dir)
        return cls(template, c.prompting.instruction, t.max_new_tokens, t.batch_size, Path(work), fp,
                   c.compute.decode == "invariant")


def run_generation(model, tokenizer, rows: list[dict], gen: Generation,
                   progress: Callable[[int, int], None] | None = None, shard: tuple[int, int] = (0, 1)) -> list[dict]:
    """Generate for every row; finished chunks are kept in `gen.work` so a killed run resumes where it was.
    `progress(answers, tokens)` is called as answers finish (a reused chunk: all of its answers at once).

    shard=(rank, N) under compute.processes (kd/core/launch.py): this process decodes chunks rank, rank+N, ... of the
    fixed chunk order, waits for every process's chunks (kd.core.launch.barrier), and rank 0 merges them all in id
    order (the others return []). Whole chunks, not rows, are shared out: a row's bits may depend on which rows shared
    its batch, so this keeps every response byte-identical to one process's."""
    work_dir, fp = gen.work, gen.fingerprint
    prompts = build_prompts(rows, gen.template, gen.instruction, tokenizer)
    done: dict[int, list[int]] = {}
    order = chunks(prompts, gen.batch_size)
    rank, size = shard
    reused = 0
    for n, batch in enumerate(order):
        if n % size != rank:
            continue  # another process's chunk (merged below)
        part = work_dir / f"chunk-{n:05d}.json"
        try:
            cached = read_json(part) if part.exists() else None
        except ArtefactError:  # unreadable (e.g. written while the disk was full): generate it again
            cached = None
        if cached and cached.get("fingerprint") == fp and cached["ids"] == [p["id"] for p in batch]:
            responses = cached["responses"]
            reused += 1
            if progress:
                progress(len(responses), sum(map(len, responses)))
        else:
            responses = generate_chunk(model, tokenizer, batch, gen.max_new_tokens, gen.batch_size,
                                       (lambda n: progress(1, n)) if progress else None, gen.invariant)
            write_json(part, {"fingerprint": fp, "ids": [p["id"] for p in batch], "responses": responses})
        for p, r in zip(batch, responses):
            done[p["id"]] = r
    if reused:
        print(f"teacher: reused {reused} of {len(order)} finished chunks from {work_dir} "
              "(an earlier run was interrupted)", file=sys.stderr)
    if size > 1:
        print(f"teacher: process {rank} of {size} decoded chunks {list(range(rank, len(order), size))} of "
              f"{len(order)}", file=sys.stderr, flush=True)
        barrier()  # every process has written its chunks
        if rank != 0:
            return []
        for n, batch in enumerate(order):
            if n % size:
                cached = read_json(work_dir / f"chunk-{n:05d}.json")
                if cached.get("fingerprint") != fp or cached["ids"] != [p["id"] for p in batch]:
                    raise ArtefactError(f"{work_dir}/chunk-{n:05d}.json: not the chunk process {n % size} should "
                                        "have written for this run")
                done.update(zip(cached["ids"], cached["responses"]))
    by_id = {r["id"]: r for r in rows}
    out = []
    for p in sorted(prompts, key=lambda p: p["id"]):
        resp = done[p["id"]]
        text = tokenizer.decode(resp, skip_special_tokens=True)
        row = by_id[p["id"]]
        out.append({"id": p["id"], "prompt_ids": p["prompt_ids"], "response_ids": resp, "response": text,
                    "finished": bool(resp) and resp[-1] in set(_eos_ids(model, tokenizer)),
                    "gold": row["gold"], **score(text, row["gold"])})
    return out


def fingerprint(template: str, instruction: str, teacher: dict, seed: int, model_dir: str | Path) -> str:
    """Everything the responses depend on (the template, the instruction, the teacher's params, the seed, the
    weights): a finished chunk from other settings is never reused."""
    model_dir = Path(model_dir)
    return hashlib.sha256(json.dumps(
        [template, instruction, teacher, seed, sha256_file(model_dir / "config.json"),
         sorted(sha256_file(f) for f in model_dir.glob("*.safetensors"))]).encode()).hexdigest()


def summarize(out: list[dict]) -> dict:
    """metrics/teacher/<s>.json: the teacher's accuracy, length and finished share on the transfer questions."""
    n = len(out)
    return {"n": n, "accuracy_strict": sum(r["correct_strict"] for r in out) / n,
            "accuracy_flexible": sum(r["correct_flexible"] for r in out) / n,
            "mean_response_tokens": sum(len(r["response_ids"]) for r in out) / n,
            "finished_fraction": sum(r["finished"] for r in out) / n}

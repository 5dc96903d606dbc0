"""eval@<model>: zero-shot GSM8K accuracy of one model (an arm of kd/config/arms.py) through lm-evaluation-harness.

Which model (its folders and loading options, a peft adapter for the trained arms, unmerged), which rows (the
prepared eval split, checked), and the outputs; the lm-eval run itself (task YAML, HFLM with kd's decoder, the
per-sample log turned into rows and cross-checked against lm-eval's aggregate) is kd/eval/lm_harness.py.

Outputs (atomic, byte-stable): results/eval/<model>.json (flat keys, for `dvc metrics diff`),
reports/eval/<model>/samples.jsonl (one row per question, sorted by id) and results/eval/<model>.jsonl (kd.eval.questions).
"""

from __future__ import annotations

import time
from dataclasses import dataclass
from pathlib import Path
from typing import TYPE_CHECKING, Any, Sequence

from kd.core.errors import ArtefactError
from kd.core.io import read_jsonl, write_json, write_jsonl
from kd.eval.lm_harness import (
    FILTERS,
    TASK_NAME,
    build_docs,
    check_against_lm_eval,
    make_lm,
    response_token_counts,
    rows_from_samples,
    run_lm_eval,
)

if TYPE_CHECKING:
    from kd.config.params import Params

EVAL_DATA = Path("data/prepared/eval.jsonl")
MODELS_DIR = Path("models")
RESULTS_DIR = Path("results/eval")  # results/eval/<arm>.json: the full scores (the headline is in metrics/)
REPORTS_DIR = Path("reports/eval")

# ----------------------------------------------------------------------------------------------- models


@dataclass(frozen=True)
class ModelSpec:
    name: str               # an arm (kd.config.arms): teacher | student | student_cot | finetune | kd-<strategy>
    pretrained: Path        # full HF folder
    peft: Path | None       # LoRA adapter folder over `pretrained` (finetune, kd-*), loaded unmerged
    dtype: str
    trust_remote_code: bool
    prompt: str = "task"    # task | cot (kd.data.prompting.eval_prompt)
    quantization: str | None = None  # student.quantization: a QLoRA arm is evaluated on its quantized base


def resolve_model(name: str, params: Params, models_dir: str | Path = MODELS_DIR) -> ModelSpec:
    """Map an arm name to its folders and loading options. Validates only; touches no files."""
    from kd.config.arms import resolve

    arm = resolve(name, params.prompting.strategies, models_dir)
    sect = getattr(params, arm.role)
    return ModelSpec(name, arm.model_dir, arm.adapter_dir, sect.dtype, sect.trust_remote_code, arm.prompt,
                     sect.quantization if arm.role == "student" else None)


def check_model_files(spec: ModelSpec) -> None:
    """Fail with a KdError (naming the stage to run) before lm-eval gets to see a half-made folder."""
    from kd.config.arms import trained_by
    from kd.models.loading import _check_dir, check_adapter

    _check_dir(spec.pretrained)
    if spec.peft is not None:
        check_adapter(spec.peft, spec.pretrained, f"run `dvc repro {trained_by(spec.name)}` first")


# ------------------------------------------------------------------------------------------------- data


def load_eval_rows(path: str | Path) -> list[dict]:
    """The prepared eval split, validated: unique int ids, str question and gold."""
    rows = read_jsonl(path)
    if not rows:
        raise ArtefactError(f"{path}: no rows (re-run `dvc repro prepare`)")
    seen: set[int] = set()
    for n, r in enumerate(rows, 1):
        i = r.get("id")
        if not isinstance(i, int) or isinstance(i, bool):
            raise ArtefactError(f"{path}:{n}: `id` must be an integer, got {i!r}")
        if i in seen:
            raise ArtefactError(f"{path}:{n}: duplicate id {i}")
        seen.add(i)
        for key in ("question", "gold"):
            if not isinstance(r.get(key), str) or not r[key].strip():
                raise ArtefactError(f"{path}:{n}: `{key}` must be a non-empty string")
    return rows


def summarise(rows: Sequence[dict]) -> dict:
    """The flat metrics dict written to results/eval/<model>.json."""
    from kd.eval.stats import wilson_interval

    n = len(rows)
    out: dict[str, Any] = {"n": n}
    for suffix in FILTERS:
        k = sum(bool(r[f"correct_{suffix}"]) for r in rows)
        lo, hi = wilson_interval(k, n)
        out[f"correct_{suffix}"] = k
        out[f"accuracy_{suffix}"] = k / n
        out[f"ci95_{suffix}_low"] = lo
        out[f"ci95_{suffix}_high"] = hi
    out["mean_response_tokens"] = sum(r["response_tokens"] for r in rows) / n
    # answers cut off at eval.max_new_tokens: the flexible filter may have scored an intermediate number
    out["truncated"] = sum(bool(r["truncated"]) for r in rows)
    return out


def evaluate_docs(spec: ModelSpec, rows: Sequence[dict], params: Params, *,
                  device: str | None = None) -> tuple[list[dict], dict]:
    """Score prepared rows (id/question/gold) with one model. Returns (sample rows, metrics)."""
    from kd.models.loading import default_device

    ev, limit = params.eval, params.eval.limit
    docs = build_docs(rows, params.prompting.instruction, spec.prompt)
    lm = make_lm(spec, ev.batch_size, device or default_device())
    lm.kd_invariant = params.compute.decode == "invariant"  # kd.generation.decode.greedy_decode's mode
    results = run_lm_eval(lm, docs, max_new_tokens=ev.max_new_tokens, batch_size=ev.batch_size,
                          limit=limit, seed=params.seed)
    samples = results["samples"][TASK_NAME]
    out_rows = rows_from_samples(samples)
    expected = len(docs) if limit is None else min(int(limit), len(docs))
    check_against_lm_eval(out_rows, results["results"][TASK_NAME], expected)
    counts = response_token_counts(samples, lm, ev.max_new_tokens)
    for r in out_rows:
        r["response_tokens"], r["truncated"] = counts[r["id"]]
    return out_rows, summarise(out_rows)


def evaluate_model(name: str, params: Params, *, root: str | Path = ".", device: str | None = None) -> dict:
    """The eval@<name> stage: read the prepared eval split, evaluate, write metrics + samples.

    Returns a summary: {"model", "items", "tokens", "seconds", **metrics}. `root` is the repository root
    (paths inside it are the DVC ones)."""
    root = Path(root)
    spec = resolve_model(name, params, root / MODELS_DIR)
    rows = load_eval_rows(root / EVAL_DATA)
    check_model_files(spec)
    t0 = time.perf_counter()
    out_rows, metrics = evaluate_docs(spec, rows, params, device=device)
    seconds = time.perf_counter() - t0
    write_jsonl(root / REPORTS_DIR / name / "samples.jsonl", out_rows)
    from kd.eval.questions import question_rows

    write_jsonl(root / RESULTS_DIR / f"{name}.jsonl", question_rows(out_rows))
    write_json(root / RESULTS_DIR / f"{name}.json", metrics)
    return {"model": name, "items": metrics["n"], "tokens": sum(r["response_tokens"] for r in out_rows),
            "seconds": seconds, **metrics}

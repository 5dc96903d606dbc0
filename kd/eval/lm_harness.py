"""The lm-evaluation-harness side of eval@<model>: our prompts as lm-eval docs, a filled-in copy of the task YAML
(kd/eval/tasks/gsm8k_kd.yaml: lm-eval's gsm8k filters and exact_match normalisation, zero-shot, chat template,
greedy), an HFLM that decodes with kd's batch-invariant decoder and counts each response's tokens, the
`lm_eval.simple_evaluate` run, and lm-eval's per-sample log turned into one row per question and cross-checked
against lm-eval's own aggregate. kd/eval/evaluate.py is the stage around it (which model, which rows, the outputs)."""

from __future__ import annotations

import logging
import math
import tempfile
from pathlib import Path
from typing import TYPE_CHECKING, Any, Iterable, Sequence

import yaml

from kd.core.errors import KdError
from kd.core.io import write_jsonl
from kd.core.paths import GSM8K_TASK
from kd.data.prompting import eval_prompt  # shared with teacher/distill: every model sees the same question

if TYPE_CHECKING:
    from kd.eval.evaluate import ModelSpec

log = logging.getLogger(__name__)

TASK_NAME = "gsm8k_kd"
TASK_TEMPLATE = GSM8K_TASK
METRIC = "exact_match"
FILTERS = {"strict": "strict-match", "flexible": "flexible-extract"}  # our suffix -> lm-eval filter name
INVALID = "[invalid]"  # lm-eval's regex-filter fallback when nothing matches; stored as null in our rows


def build_docs(rows: Iterable[dict], instruction: str, style: str = "task") -> list[dict]:
    """lm-eval docs, in file order (so `eval.limit: N` evaluates the first N rows of the prepared split)."""
    return [{"id": r["id"], "prompt": eval_prompt(r["question"], instruction, style), "gold": r["gold"]}
            for r in rows]


def write_task_dir(docs: Sequence[dict], task_dir: Path, max_new_tokens: int) -> Path:
    """Write docs.jsonl and the filled-in task YAML into `task_dir` (for TaskManager(include_path=...))."""
    task_dir.mkdir(parents=True, exist_ok=True)
    data = (task_dir / "docs.jsonl").resolve()
    write_jsonl(data, docs)
    cfg = yaml.safe_load(TASK_TEMPLATE.read_text(encoding="utf-8"))
    cfg["dataset_kwargs"]["data_files"]["test"] = str(data)
    # datasets' json cache goes into the temp dir too: nothing left in ~/.cache, no stale-cache surprises.
    cfg["dataset_kwargs"]["cache_dir"] = str((task_dir / "hf_datasets_cache").resolve())
    cfg["generation_kwargs"]["max_gen_toks"] = int(max_new_tokens)
    (task_dir / f"{TASK_NAME}.yaml").write_text(yaml.safe_dump(cfg, sort_keys=True), encoding="utf-8")
    return task_dir




def stop_token_ids(tokenizer, stops: Iterable[str]) -> list[int]:
    """Token ids that must end a generation row: the tokenizer's eos plus every stop string that is a single
    special/added token (e.g. <|im_end|>, <|endoftext|>)."""
    ids = []
    if tokenizer.eos_token_id is not None:
        ids.append(int(tokenizer.eos_token_id))
    added = set(tokenizer.get_added_vocab())
    for s in stops:
        if s in added:
            ids.append(int(tokenizer.convert_tokens_to_ids(s)))
    return sorted(set(ids))


def _ensure_eos_stops(lm, stops: Iterable[str]) -> list[int]:
    """Make HF generate stop each row at our stop tokens.

    lm-eval's string stop criterion only halts a batch once *every* row has hit a stop string, and it decodes
    the response with skip_special_tokens=True, so a row that emitted <|im_end|> early (when the model's
    generation_config does not list it as eos) keeps generating and the junk after the invisible <|im_end|>
    ends up in the response. Adding the ids to generation_config.eos_token_id makes HF finish that row."""
    model = lm.model
    base = model.get_base_model() if hasattr(model, "get_base_model") else model
    gc = base.generation_config
    have = gc.eos_token_id
    have = [] if have is None else [have] if isinstance(have, int) else list(have)
    want = have + [i for i in stop_token_ids(lm.tokenizer, stops) if i not in have]
    if want != have:
        log.info("generation_config.eos_token_id %s -> %s", have, want)
        gc.eos_token_id = want
    if gc.pad_token_id is None and lm.tokenizer.pad_token_id is not None:
        gc.pad_token_id = lm.tokenizer.pad_token_id
    return want


def make_lm(spec: ModelSpec, batch_size: int, device: str):
    """An HFLM for `spec` that (a) never asks the Hub about local paths, (b) decodes with kd's batch-invariant
    decoder, which (c) records, per context, how many tokens each response had before its stop token (lm-eval itself
    keeps only the decoded string): `lm.token_counts`."""
    from lm_eval.models.huggingface import HFLM

    class _KdHFLM(HFLM):
        token_counts: dict[str, tuple[int, bool]]
        stop_ids: set[int]

        def get_model_info(self) -> dict:  # the stock one asks the Hub for the "model sha" of a local path
            return {}

        def generate_until(self, requests, disable_tqdm: bool = False) -> list[str]:
            # continuous batching over all requests (kd/generation/decode.py); lm-eval still encodes, stops and scores
            from kd.generation.decode import lm_eval_generate_until

            return lm_eval_generate_until(self, requests, disable_tqdm)

    from kd.models.loading import load_adapted, load_tokenizer

    # We load the model ourselves, with an adapter arm's LoRA *unmerged*: evaluated = trained, to the bit (a merge
    # into bf16 weights rounds most of a small update away). The base and trained students go through identical
    # code (HFLM's own `peft=` path resizes the embeddings to the tokenizer, the plain path does not).
    model = load_adapted(spec.pretrained, spec.peft, spec.dtype, spec.trust_remote_code, device=device,
                         quantization=spec.quantization)
    lm = _KdHFLM(pretrained=model, tokenizer=load_tokenizer(spec.pretrained, spec.trust_remote_code),
                 batch_size=int(batch_size), device=device, trust_remote_code=spec.trust_remote_code)
    lm.token_counts = {}
    lm.stop_ids = set(_ensure_eos_stops(lm, _task_stops()))
    return lm


def _task_stops() -> list[str]:
    return list(yaml.safe_load(TASK_TEMPLATE.read_text(encoding="utf-8"))["generation_kwargs"]["until"])


def run_lm_eval(lm, docs: Sequence[dict], *, max_new_tokens: int, batch_size: int, limit: int | None,
                seed: int) -> dict:
    """Run gsm8k_kd over `docs` with `lm` (any lm_eval LM); returns lm-eval's results with per-sample logs."""
    import lm_eval
    from lm_eval.tasks import TaskManager

    with tempfile.TemporaryDirectory(prefix="kd-eval-") as tmp:
        task_dir = write_task_dir(docs, Path(tmp) / "task", max_new_tokens)
        tm = TaskManager(include_path=str(task_dir), include_defaults=False)
        results = lm_eval.simple_evaluate(
            model=lm,
            tasks=[TASK_NAME],
            task_manager=tm,
            num_fewshot=None,  # the YAML says 0
            batch_size=batch_size,
            limit=limit,
            log_samples=True,
            apply_chat_template=True,
            bootstrap_iters=0,  # we compute Wilson intervals ourselves
            random_seed=seed,
            numpy_random_seed=seed,
            torch_random_seed=seed,
            fewshot_random_seed=seed,
        )
    if results is None:
        raise KdError("lm-eval returned no results (not rank 0?); run eval as a single process")
    return results




def _pred(filtered: Any) -> str | None:
    if isinstance(filtered, list):  # take_first leaves a string; be lenient about a 1-element list
        filtered = filtered[0] if len(filtered) == 1 else filtered
    if not isinstance(filtered, str):
        raise KdError(f"lm-eval: unexpected filtered response {filtered!r}")
    return None if filtered == INVALID else filtered


def rows_from_samples(samples: Sequence[dict]) -> list[dict]:
    """lm-eval's per-sample log (one entry per doc x filter) -> one row per question, sorted by id.

    Correctness is lm-eval's own per-sample exact_match for each filter."""
    by_id: dict[int, dict] = {}
    names = {v: k for k, v in FILTERS.items()}
    for s in samples:
        suffix = names.get(s.get("filter"))
        if suffix is None:
            raise KdError(f"lm-eval: sample for unknown filter {s.get('filter')!r}")
        doc = s["doc"]
        resps = s["resps"]
        if len(resps) != 1 or len(resps[0]) != 1:
            raise KdError(f"lm-eval: expected one response per doc, got {resps!r} (doc id {doc['id']})")
        response = resps[0][0]
        row = by_id.setdefault(doc["id"], {"id": doc["id"], "prompt": doc["prompt"], "gold": doc["gold"],
                                           "response": response})
        if row["response"] != response or row["prompt"] != doc["prompt"]:
            raise KdError(f"lm-eval: filters disagree on the response to doc id {doc['id']}")
        if f"pred_{suffix}" in row:
            raise KdError(f"lm-eval: two {s['filter']} samples for doc id {doc['id']}")
        em = s[METRIC]
        if em not in (0, 1, 0.0, 1.0):
            raise KdError(f"lm-eval: {METRIC} {em!r} is not 0/1 (doc id {doc['id']})")
        row[f"pred_{suffix}"] = _pred(s["filtered_resps"][0] if len(s["filtered_resps"]) == 1
                                      else s["filtered_resps"])
        row[f"correct_{suffix}"] = bool(em)
    rows = [by_id[i] for i in sorted(by_id)]
    for r in rows:
        missing = [k for k in FILTERS if f"pred_{k}" not in r]
        if missing:
            raise KdError(f"lm-eval: doc id {r['id']} has no sample for filter(s) {missing}")
    return rows


def check_against_lm_eval(rows: Sequence[dict], task_results: dict, expected_n: int) -> None:
    """Our per-row totals must reproduce lm-eval's aggregate exactly; otherwise stop loudly."""
    n = len(rows)
    if n != expected_n:
        raise KdError(f"lm-eval scored {n} questions, expected {expected_n}")
    for suffix, filt in FILTERS.items():
        key = f"{METRIC},{filt}"
        if key not in task_results:
            raise KdError(f"lm-eval: no `{key}` in results (have {sorted(task_results)})")
        theirs = float(task_results[key])
        ours = sum(r[f"correct_{suffix}"] for r in rows) / n
        if not math.isclose(ours, theirs, rel_tol=0, abs_tol=1e-9):
            raise KdError(f"lm-eval reports {key}={theirs!r} but its per-sample log gives {ours!r}")


def response_token_counts(samples: Sequence[dict], lm, max_new_tokens: int) -> dict[int, tuple[int, bool]]:
    """doc id -> (tokens generated before the stop token, truncated: the row hit max_new_tokens unfinished).

    From what our HFLM recorded during generation when it did; otherwise (an LM that does not record, e.g. a
    test double) the response text re-encoded without special tokens, truncated when it fills the budget. The
    two counts differ when a response ends inside a multi-byte character (the decoded text then holds U+FFFD)."""
    recorded = getattr(lm, "token_counts", None)
    out: dict[int, tuple[int, bool]] = {}
    for s in samples:
        doc_id, context = s["doc"]["id"], s["arguments"][0][0]
        if recorded is not None:
            if context not in recorded:
                raise KdError(f"lm-eval: no token count recorded for doc id {doc_id}")
            n, stopped = recorded[context]
            # a row that stopped on a stop *string* (no stop token) ends before the budget: not truncated
            out[doc_id] = (n, not stopped and n >= max_new_tokens)
        else:
            tok = getattr(lm, "tokenizer", None)
            if tok is None:
                raise KdError("cannot count response tokens: the lm-eval model has no `tokenizer`")
            n = len(tok(s["resps"][0][0], add_special_tokens=False)["input_ids"])
            out[doc_id] = (n, n >= max_new_tokens)
    return out

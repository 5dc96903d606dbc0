"""The teacher signal for distillation: what the logits stage computes and stores (kd/teacher/signal_reader.py reads
it back for the distill stage).

Formats (params `logits.format`):
- hidden: the teacher's final hidden state (after the final norm) at every response position, in the teacher's
  dtype. Logits are recomputed as hidden @ W_out^T with the teacher's own output layer: the model's logits
  exactly, at ~1/99 of the bytes of full-vocabulary logits for a 1.5B Qwen.
- full: the logits themselves (teacher dtype). Exact; large.
- topk: the top-k logits + ids and the mean of the remaining logits; read back as a dense vector whose tail is
  that mean (a "uniform tail"). An approximation for teachers whose output layer cannot be kept.

Row j of an example is the teacher's prediction of response token j, i.e. the hidden state at sequence position
len(prompt) + j - 1, in shards of whole examples in integer-id order (manifest.json says where each one is)."""

from __future__ import annotations

import json
from dataclasses import dataclass, replace
from pathlib import Path
from typing import TYPE_CHECKING

import torch
import torch.nn.functional as F
from tqdm import tqdm

from kd.core.errors import ArtefactError
from kd.core.io import atomic_path, remove_tree, save_safetensors, sha256_bytes, sha256_file, write_json
from kd.core.launch import barrier

if TYPE_CHECKING:
    from kd.config.params import Logits

MANIFEST = "manifest.json"
# `hidden` assumes logits = h · W_outᵀ. Models whose head scales or soft-caps the logits break that; refuse them.
SCALED_HEAD_KEYS = ("final_logit_softcapping", "logit_scale", "logits_scaling", "output_logit_scale")
# How far the recomputed logits h · W_outᵀ may be from the model's own, relative to the largest logit, checked on every
# example. On the CPU the two are the same matmul over the same rows and measured identical (difference 0.0), so the
# tolerance is 2^-12: a head mis-scaled by 0.1 % (a difference of 1e-3 x the largest logit) fails it
# (tests/teacher/test_signal.py). Elsewhere (CUDA, never run here) two kernels may differ by one bf16 step at the
# largest logit, 2^-7; a scaled or capped head, a missing final norm or a wrong layer differs by far more.
RECOMPUTE_REL_TOL = {"cpu": 2.0 ** -12, "other": 2.0 ** -7}


def check_plain_head(config: dict, model_dir: str | Path) -> None:
    """Refuse, before any forward pass, a teacher whose logits are not h · W_outᵀ (format `hidden` only)."""
    for key in SCALED_HEAD_KEYS:
        v = config.get(key)
        if v not in (None, 1, 1.0):
            raise ArtefactError(f"{model_dir}: config {key}={v!r}: its logits are not hidden · W_out^T, so "
                                "logits.format: hidden cannot reproduce them; set logits.format: full")


def tensor_sha256(t: torch.Tensor) -> str:
    return sha256_bytes(t.detach().contiguous().cpu().view(torch.uint8).numpy().tobytes())


def ids_sha256(ids: list[int]) -> str:
    return sha256_bytes(json.dumps(ids).encode())


def output_layer(model_dir: str | Path) -> tuple[str, torch.Tensor]:
    """The teacher's output layer weight (vocab x hidden), read from its safetensors without loading the model."""
    from safetensors import safe_open

    from kd.models.loading import _check_dir

    model_dir = _check_dir(model_dir)  # config.json and every safetensors header, checked
    config = json.loads((model_dir / "config.json").read_text())
    names = ["lm_head.weight"] + (["model.embed_tokens.weight"] if config.get("tie_word_embeddings") else [])
    for name in names:
        for f in sorted(model_dir.glob("*.safetensors")):
            with safe_open(str(f), framework="pt") as st:
                if name in st.keys():
                    return name, st.get_tensor(name)
    raise ArtefactError(f"{model_dir}: no output layer ({' or '.join(names)}) in its safetensors")


@torch.no_grad()
def capture(model, prompt_ids: list[int], response_ids: list[int], fmt: str, top_k: int,
            check_logits: bool = False) -> tuple[dict[str, torch.Tensor], float | None]:
    """Teacher forward over prompt + response; returns this example's rows in format `fmt`.
    With check_logits, also returns max |recomputed - model logits| (0.0 means bit for bit), and for format
    `hidden` fails when it exceeds RECOMPUTE_REL_TOL (by device) x the largest logit. The model computes its logits
    at the response rows only (the rows the signal keeps)."""
    p, r = len(prompt_ids), len(response_ids)
    ids = torch.tensor([prompt_ids + response_ids], device=model.device)
    rows = torch.arange(p - 1, p + r - 1, device=model.device)
    out = model(input_ids=ids, output_hidden_states=True,
                logits_to_keep=rows if (check_logits or fmt != "hidden") else 1)
    hidden = out.hidden_states[-1][0, p - 1:p + r - 1]
    logits = out.logits[0] if out.logits.shape[1] == r else None
    diff = None
    if check_logits:
        recomputed = F.linear(hidden, model.get_output_embeddings().weight)
        diff = (recomputed.float() - logits.float()).abs().max().item()
        rel = RECOMPUTE_REL_TOL["cpu" if hidden.device.type == "cpu" else "other"]
        tol = rel * logits.float().abs().max().item()
        if fmt == "hidden" and not diff <= tol:  # `not <=`: a NaN fails too
            raise ArtefactError(f"logits: hidden · W_out^T differs from the teacher's own logits by {diff:.4g} "
                                f"(tolerance {tol:.4g}): the `hidden` format cannot reproduce this teacher's "
                                "logits; set logits.format: full")
    if fmt == "hidden":
        return {"hidden": hidden.cpu().contiguous()}, diff
    if fmt == "full":
        return {"logits": logits.cpu().contiguous()}, diff
    values, indices = logits.float().topk(min(top_k, logits.shape[-1]), dim=-1)
    total = logits.float().sum(-1)
    rest = logits.shape[-1] - values.shape[-1]
    tail_mean = (total - values.sum(-1)) / max(rest, 1)
    return {"topk_values": values.cpu(), "topk_indices": indices.to(torch.int32).cpu(),
            "tail_mean": tail_mean.cpu()}, diff


class SignalWriter:
    """Collects examples in id order into safetensors shards of about `shard_rows` rows, then a manifest."""

    def __init__(self, out_dir: str | Path, fmt: str, shard_rows: int):
        self.out, self.fmt, self.shard_rows = Path(out_dir), fmt, shard_rows
        self.pending: list[dict[str, torch.Tensor]] = []
        self.pending_rows = 0
        self.examples: list[dict] = []
        self.shards: list[dict] = []

    def add(self, example_id: int, response_ids: list[int], tensors: dict[str, torch.Tensor]) -> None:
        rows = next(iter(tensors.values())).shape[0]
        if self.pending and self.pending_rows + rows > self.shard_rows:
            self._flush()
        self.examples.append({"id": example_id, "shard": len(self.shards), "offset": self.pending_rows,
                              "rows": rows, "response_sha256": ids_sha256(response_ids)})
        self.pending.append(tensors)
        self.pending_rows += rows

    def _flush(self) -> None:
        name = f"shard-{len(self.shards):05d}.safetensors"
        joined = {k: torch.cat([t[k] for t in self.pending]) for k in self.pending[0]}
        save_safetensors(joined, self.out / name)
        self.shards.append({"file": name, "rows": self.pending_rows, "sha256": sha256_file(self.out / name)})
        self.pending, self.pending_rows = [], 0

    def close(self, meta: dict) -> dict:
        if self.pending:
            self._flush()
        manifest = {**meta, "format": self.fmt, "examples": self.examples, "shards": self.shards}
        write_json(self.out / MANIFEST, manifest)
        return manifest


@dataclass(frozen=True)
class SignalJob:
    """What the logits stage writes: in which format (params `logits`: format, top_k, shard_rows), to `out` (shards +
    manifest, written atomically), with `meta` added to the manifest; `work` holds each process's examples under
    compute.processes."""
    cfg: Logits
    out: Path
    work: Path
    meta: dict


def write_signal(model, responses: list[dict], job: SignalJob, out_dir: str | Path | None,
                 shard: tuple[int, int] = (0, 1), progress=lambda n: None) -> dict | None:
    """Capture every response's teacher signal into `out_dir` (shards + manifest, in id order); returns the manifest.

    shard=(rank, N) under compute.processes (kd/core/launch.py): this process captures examples rank, rank+N, ... of the
    id order into `job.work`, waits for all (kd.core.launch.barrier), and rank 0 writes the shards from them in id
    order (the others return None). Each example is one forward of its own, so the shards are byte-identical to one
    process's."""
    rows = sorted(responses, key=lambda r: r["id"])
    rank, size = shard
    work_dir, fmt = Path(job.work), job.cfg.format

    def one(k):
        r = rows[k]  # the recomputation is checked on every example
        return capture(model, r["prompt_ids"], r["response_ids"], fmt, job.cfg.top_k, check_logits=True)

    if size > 1:
        from safetensors import safe_open

        for k in range(rank, len(rows), size):
            tensors, diff = one(k)
            save_safetensors(tensors, work_dir / f"example-{rows[k]['id']}.safetensors",
                             metadata={"diff": json.dumps(diff)})
            progress(1)
        print(f"logits: process {rank} of {size} captured {len(range(rank, len(rows), size))} of {len(rows)} "
              "examples", flush=True)
        barrier()  # every process has written its examples
        if rank != 0:
            return None

        def load(k):
            with safe_open(str(work_dir / f"example-{rows[k]['id']}.safetensors"), framework="pt") as f:
                return {key: f.get_tensor(key) for key in f.keys()}, json.loads(f.metadata()["diff"])
        examples = (load(k) for k in range(len(rows)))
    else:
        examples = ((progress(1), one(k))[1] for k in range(len(rows)))
    writer = SignalWriter(out_dir, fmt, job.cfg.shard_rows)
    max_diff = 0.0
    for r, (tensors, diff) in zip(rows, examples):
        if diff is not None:
            max_diff = max(max_diff, diff)
        writer.add(r["id"], r["response_ids"], tensors)
    # proof, on every example, that hidden @ W_out^T reproduces the model's logits
    return writer.close({**job.meta, "recompute_max_abs_diff": max_diff})


def record_signal(model, model_dir: str | Path, responses: list[dict], job: SignalJob,
                  shard: tuple[int, int] = (0, 1), desc: str = "logits") -> tuple[dict, float] | None:
    """The teacher's forward over every response, written atomically to `job.out` as shards + manifest. Returns the
    manifest and the largest |recomputed - model| logit difference, checked on every example;
    under compute.processes (shard=(rank, N)) only rank 0 writes and returns, the others return None."""
    name, weight = output_layer(model_dir)
    fmt, top_k = job.cfg.format, job.cfg.top_k
    job = replace(job, meta={**job.meta, "hidden_size": model.config.hidden_size, "vocab_size": weight.shape[0],
                             "top_k": top_k if fmt == "topk" else None,
                             "output_layer": {"name": name, "shape": list(weight.shape),
                                              "sha256": tensor_sha256(weight)}})
    rank = shard[0]
    with tqdm(total=len(responses), desc=desc, unit="q", disable=rank > 0) as bar:
        if rank > 0:  # rank 0 merges every process's examples and writes the outputs
            write_signal(model, responses, job, None, shard, bar.update)
            return None
        with atomic_path(job.out) as tmp:
            tmp.mkdir()
            manifest = write_signal(model, responses, job, tmp, shard, bar.update)
    remove_tree(job.work)
    return manifest, manifest["recompute_max_abs_diff"]

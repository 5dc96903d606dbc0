"""The teacher signal for distillation: what the logits stage stores and the distill stage reads back.

Formats (params `logits.format`):
- hidden: the teacher's final hidden state (after the final norm) at every response position, in the teacher's
  dtype. Logits are recomputed as hidden @ W_out^T with the teacher's own output layer: the model's logits
  exactly, at ~1/99 of the bytes of full-vocabulary logits for a 1.5B Qwen.
- full: the logits themselves (teacher dtype). Exact; large.
- topk: the top-k logits + ids and the mean of the remaining logits; read back as a dense vector whose tail is
  that mean (a "uniform tail"). An approximation for teachers whose output layer cannot be kept.

Row j of an example is the teacher's prediction of response token j, i.e. the hidden state at sequence position
len(prompt) + j - 1. Examples are keyed by integer id, never by strings (the original's sorted "Question 10"
keys paired 1 of 2,638 examples correctly)."""

from __future__ import annotations

import json
import re
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


FORMAT_KEYS = {"hidden": ("hidden",), "full": ("logits",), "topk": ("topk_values", "topk_indices", "tail_mean")}
_SHARD_RE = re.compile(r"shard-\d{5}\.safetensors")
_HEX64 = re.compile(r"[0-9a-f]{64}")


def _is_int(v, lo: int = 0) -> bool:
    return isinstance(v, int) and not isinstance(v, bool) and v >= lo


def check_responses(responses: list[dict], transfer_ids: list[int] | None, path: str | Path, strategy: str) -> None:
    """The teacher's responses, whole: one row per transfer question, in id order, each with token id lists.
    A file cut short (or edited) names `teacher@<strategy>` as the stage to re-run."""
    rerun = f"re-run `dvc repro teacher@{strategy}`"
    for n, r in enumerate(responses, 1):
        if not (_is_int(r.get("id")) and all(isinstance(r.get(k), list) and all(_is_int(t) for t in r[k])
                                             for k in ("prompt_ids", "response_ids")) and r["prompt_ids"]):
            raise ArtefactError(f"{path}:{n}: not a teacher response (needs an integer `id` and token id lists "
                                f"`prompt_ids`, `response_ids`); {rerun}")
    ids = [r["id"] for r in responses]
    if ids != sorted(set(ids)):
        raise ArtefactError(f"{path}: response ids are not unique and in order; {rerun}")
    if transfer_ids is not None and ids != sorted(transfer_ids):
        missing = sorted(set(transfer_ids) - set(ids))
        extra = sorted(set(ids) - set(transfer_ids))
        raise ArtefactError(f"{path}: {len(ids)} responses for {len(transfer_ids)} transfer questions "
                            f"(missing ids {missing[:5]}{'...' if len(missing) > 5 else ''}, extra ids {extra[:5]}"
                            f"{'...' if len(extra) > 5 else ''}); {rerun}")


class TeacherSignal:
    """Reads a logits-stage output back, checked whole before any training: the manifest's every field (format,
    shards, contiguous offsets that tile each shard exactly), each shard's sha256 and its tensors' names and shapes,
    ids and response lengths/hashes against the teacher's responses, those against the transfer set (when given),
    and the output layer against the teacher model. Any mismatch is one line naming the stage to re-run."""

    def __init__(self, signal_dir: str | Path, responses: list[dict], teacher_dir: str | Path | None,
                 transfer_ids: list[int] | None = None):
        self.dir = Path(signal_dir)
        strategy = self.dir.name
        self.path = self.dir / MANIFEST
        self.rerun = f"re-run `dvc repro logits@{strategy}`"
        m = self.manifest = self._read_manifest(strategy)
        check_responses(responses, transfer_ids, self.dir.parent.parent / "teacher" / strategy / "responses.jsonl",
                        strategy)
        self._check_entries(m, responses)
        self._check_layout(m)
        self.weight = self._output_layer(m, teacher_dir) if self.fmt == "hidden" else None
        width = (self.weight.shape[1] if self.fmt == "hidden" else m["vocab_size"] if self.fmt == "full"
                 else min(m["top_k"], m["vocab_size"]) if m.get("top_k") else None)
        for s in m["shards"]:
            f = self.dir / s["file"]
            if not f.is_file():
                raise ArtefactError(f"{f}: shard missing; {self.rerun}")
            digest = sha256_file(f)
            if digest != s["sha256"]:
                raise ArtefactError(f"{f}: sha256 {digest[:16]}… does not match the manifest's {s['sha256'][:16]}… "
                                    f"(truncated or altered); {self.rerun}")
            self._check_shard(f, s["rows"], width, self.rerun)
        self.by_id = {e["id"]: e for e in m["examples"]}
        self._open: dict[int, object] = {}

    def _bad(self, why: str) -> ArtefactError:
        return ArtefactError(f"{self.path}: {why}; {self.rerun}")

    def _read_manifest(self, strategy: str) -> dict:
        """The manifest as JSON, with its format and sizes checked (self.fmt)."""
        if not self.path.exists():
            raise ArtefactError(f"{self.path}: missing (run `dvc repro logits@{strategy}`)")
        try:
            m = json.loads(self.path.read_text())
        except (json.JSONDecodeError, UnicodeDecodeError) as e:
            raise self._bad(f"not valid JSON ({e})") from None
        if not isinstance(m, dict) or not isinstance(m.get("examples"), list) or not isinstance(m.get("shards"), list):
            raise self._bad("not a teacher-signal manifest (needs `examples` and `shards` lists)")
        self.fmt = m.get("format")
        if self.fmt not in FORMAT_KEYS:
            raise self._bad(f"format {self.fmt!r} is not one of {', '.join(FORMAT_KEYS)}")
        if self.fmt != "hidden" and not _is_int(m.get("vocab_size"), 1):
            raise self._bad(f"format {self.fmt} needs a positive integer `vocab_size`")
        for k in ("hidden_size", "top_k"):
            if m.get(k) is not None and not _is_int(m[k], 1):
                raise self._bad(f"`{k}` is {m[k]!r}, not a positive integer")
        return m

    def _check_entries(self, m: dict, responses: list[dict]) -> None:
        """Every shard and example entry well-formed; the examples are the responses' ids, lengths and tokens."""
        for i, sh in enumerate(m["shards"]):
            if not (isinstance(sh, dict) and sh.get("file") == f"shard-{i:05d}.safetensors"
                    and _is_int(sh.get("rows"), 1) and isinstance(sh.get("sha256"), str)
                    and _HEX64.fullmatch(sh["sha256"])):
                raise self._bad(f"shard entry {i} is not {{file: shard-{i:05d}.safetensors, rows: >0, sha256: <hex>}}")
        for e in m["examples"]:
            if not (isinstance(e, dict) and _is_int(e.get("id")) and _is_int(e.get("shard")) and _is_int(e.get("rows"))
                    and _is_int(e.get("offset")) and isinstance(e.get("response_sha256"), str)):
                raise self._bad(f"example entry {str(e)[:80]} lacks an integer id/shard/offset/rows or response_sha256")
        ids = [e["id"] for e in m["examples"]]
        want = [r["id"] for r in responses]
        if ids != want:
            raise self._bad(f"example ids {ids[:5]}... do not match the teacher responses' ids {want[:5]}... "
                            "(stale logits?)")
        for e, r in zip(m["examples"], responses):
            if e["rows"] != len(r["response_ids"]) or e["response_sha256"] != ids_sha256(r["response_ids"]):
                raise self._bad(f"example {e['id']} was computed for a different response "
                                f"(rows {e['rows']} vs {len(r['response_ids'])} tokens)")

    def _check_layout(self, m: dict) -> None:
        """Shard i is shard-0000i.safetensors; examples fill shards in order, each starting where the previous one
        ended, and the rows of a shard's examples add up to exactly its rows."""
        shard, offset = 0, 0
        for e in m["examples"]:
            if shard < len(m["shards"]) and e["shard"] == shard + 1 and offset == m["shards"][shard]["rows"]:
                shard, offset = shard + 1, 0
            if e["shard"] != shard or e["offset"] != offset or shard >= len(m["shards"]):
                raise self._bad(f"example {e['id']} is at shard {e['shard']} offset {e['offset']}, but the examples "
                                f"before it end at shard {shard} offset {offset} (layout edited?)")
            offset += e["rows"]
            if offset > m["shards"][shard]["rows"]:
                raise self._bad(f"example {e['id']} runs past the end of shard {shard} "
                                f"({m['shards'][shard]['rows']} rows)")
        if m["shards"] and (shard != len(m["shards"]) - 1 or offset != m["shards"][-1]["rows"]):
            raise self._bad(f"the examples cover {shard + 1} shard(s) up to row {offset}, the manifest lists "
                            f"{len(m['shards'])} shard(s) of which the last has {m['shards'][-1]['rows']} rows")

    def _output_layer(self, m: dict, teacher_dir: str | Path | None) -> torch.Tensor:
        """Format `hidden`: the teacher's output layer, the one the manifest was computed with."""
        if teacher_dir is None:
            raise ArtefactError(f"{self.path}: format `hidden` needs the teacher's output layer")
        name, w = output_layer(teacher_dir)
        if tensor_sha256(w) != (m.get("output_layer") or {}).get("sha256"):
            raise ArtefactError(f"{teacher_dir}: output layer {name} does not match {self.path} (the teacher "
                                f"changed since the logits were computed); {self.rerun}")
        if m.get("hidden_size") not in (None, w.shape[1]):
            raise self._bad(f"hidden_size {m['hidden_size']} differs from the teacher's output layer {list(w.shape)}")
        return w

    def _check_shard(self, f: Path, rows: int, width: int | str | None, rerun: str) -> None:
        """Tensor names and shapes from the shard's header: exactly this format's tensors, `rows` rows each."""
        from kd.models.loading import check_safetensors

        header = check_safetensors(f, rerun)
        shapes = {k: v["shape"] for k, v in header.items() if k != "__metadata__"}
        if width is None:  # topk without a recorded top_k: the stored width, at most the vocabulary
            got = (shapes.get("topk_values") or [0, 0])[1:2]
            width = got[0] if got and 0 < got[0] <= self.manifest["vocab_size"] else "top_k"
        want = {"hidden": {"hidden": [rows, width]}, "full": {"logits": [rows, width]},
                "topk": {"topk_values": [rows, width], "topk_indices": [rows, width], "tail_mean": [rows]}}[self.fmt]
        if shapes != want:
            raise ArtefactError(f"{f}: holds tensors {shapes}, the manifest says {want}; {rerun}")

    def _slice(self, key: str, e: dict, start: int, end: int) -> torch.Tensor:
        from safetensors import safe_open

        if e["shard"] not in self._open:
            self._open[e["shard"]] = safe_open(str(self.dir / self.manifest["shards"][e["shard"]]["file"]),
                                               framework="pt")
        return self._open[e["shard"]].get_slice(key)[e["offset"] + start:e["offset"] + end]

    def logits(self, example_id: int, start: int = 0, end: int | None = None) -> torch.Tensor:
        """Teacher logits (float32) for response tokens [start, end) of one example."""
        e = self.by_id[example_id]
        end = e["rows"] if end is None else end
        if self.fmt == "hidden":
            h = self._slice("hidden", e, start, end)
            return F.linear(h.to(self.weight.dtype), self.weight).float()
        if self.fmt == "full":
            return self._slice("logits", e, start, end).float()
        values = self._slice("topk_values", e, start, end).float()
        indices = self._slice("topk_indices", e, start, end).long()
        tail = self._slice("tail_mean", e, start, end).float()
        dense = tail[:, None].expand(-1, self.manifest["vocab_size"]).clone()
        return dense.scatter_(1, indices, values)

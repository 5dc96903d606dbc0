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
from pathlib import Path

import torch
import torch.nn.functional as F

from kd.errors import ArtefactError
from kd.io import sha256_bytes, sha256_file, save_safetensors, write_json

MANIFEST = "manifest.json"
# `hidden` assumes logits = h · W_outᵀ. Models whose head scales or soft-caps the logits break that; refuse them.
SCALED_HEAD_KEYS = ("final_logit_softcapping", "logit_scale", "logits_scaling", "output_logit_scale")
# One bf16 step at the largest logit: what two matmul kernels computing the same h · W_outᵀ may differ by. A scaled or
# capped head, a missing final norm or a wrong layer differs by far more.
RECOMPUTE_REL_TOL = 2.0 ** -7


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

    model_dir = Path(model_dir)
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
    `hidden` fails when it exceeds RECOMPUTE_REL_TOL x the largest logit."""
    p, r = len(prompt_ids), len(response_ids)
    ids = torch.tensor([prompt_ids + response_ids], device=model.device)
    out = model(input_ids=ids, output_hidden_states=True, logits_to_keep=0 if (check_logits or fmt != "hidden") else 1)
    hidden = out.hidden_states[-1][0, p - 1:p + r - 1]
    logits = out.logits[0, p - 1:p + r - 1] if out.logits.shape[1] > 1 else None
    diff = None
    if check_logits:
        recomputed = F.linear(hidden, model.get_output_embeddings().weight)
        diff = (recomputed.float() - logits.float()).abs().max().item()
        tol = RECOMPUTE_REL_TOL * logits.float().abs().max().item()
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


class TeacherSignal:
    """Reads a logits-stage output back, verified: shards' sha256, ids and responses against the teacher's
    responses, and the output layer against the teacher model. Every check runs before any training."""

    def __init__(self, signal_dir: str | Path, responses: list[dict], teacher_dir: str | Path | None):
        self.dir = Path(signal_dir)
        path = self.dir / MANIFEST
        if not path.exists():
            raise ArtefactError(f"{path}: missing (run the logits stage)")
        try:
            self.manifest = json.loads(path.read_text())
        except json.JSONDecodeError as e:
            raise ArtefactError(f"{path}: not valid JSON ({e})") from None
        m = self.manifest
        self.fmt = m.get("format")
        ids = [e["id"] for e in m["examples"]]
        want = [r["id"] for r in responses]
        if ids != want:
            raise ArtefactError(f"{path}: example ids {ids[:5]}... do not match the teacher responses' ids "
                                f"{want[:5]}... (stale logits? re-run `dvc repro`)")
        for e, r in zip(m["examples"], responses):
            if e["rows"] != len(r["response_ids"]) or e["response_sha256"] != ids_sha256(r["response_ids"]):
                raise ArtefactError(f"{path}: example {e['id']} was computed for a different response "
                                    f"(rows {e['rows']} vs {len(r['response_ids'])} tokens)")
        for s in m["shards"]:
            f = self.dir / s["file"]
            if not f.exists():
                raise ArtefactError(f"{f}: shard missing")
            digest = sha256_file(f)
            if digest != s["sha256"]:
                raise ArtefactError(f"{f}: sha256 {digest[:16]}… does not match the manifest's {s['sha256'][:16]}… "
                                    "(truncated or altered; re-run the logits stage)")
        self.by_id = {e["id"]: e for e in m["examples"]}
        self.weight = None
        if self.fmt == "hidden":
            if teacher_dir is None:
                raise ArtefactError(f"{path}: format `hidden` needs the teacher's output layer")
            name, w = output_layer(teacher_dir)
            if tensor_sha256(w) != m["output_layer"]["sha256"]:
                raise ArtefactError(f"{teacher_dir}: output layer {name} does not match {path} (the teacher "
                                    "changed since the logits were computed)")
            self.weight = w
        self._open: dict[int, object] = {}

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

"""The teacher signal read back (what distill@<strategy> and kd tune / kd select train on): `TeacherSignal` opens a
logits-stage output (kd/teacher/signal.py writes it) and checks it whole before any training: the manifest's every
field, the shards' sha256 and tensor shapes, the examples against the teacher's responses (`check_responses`) and the
output layer against the teacher model. Any mismatch is one line naming the stage to re-run. Examples are keyed by
integer id, never by strings (the original's sorted "Question 10" keys paired 1 of 2,638 examples correctly)."""

from __future__ import annotations

import json
import re
from pathlib import Path

import torch
import torch.nn.functional as F

from kd.core.errors import ArtefactError
from kd.core.io import sha256_file
from kd.teacher.signal import MANIFEST, ids_sha256, output_layer, tensor_sha256

FORMAT_KEYS = {"hidden": ("hidden",), "full": ("logits",), "topk": ("topk_values", "topk_indices", "tail_mean")}
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

"""A training run's resumable state, as safetensors (no pickle): the trainable LoRA weights, the optimizer's state,
the RNG, the step and the logged history. A run killed between checkpoints resumes from the last one and finishes
with the same bits as an unbroken run (tests/integration/test_faults.py)."""

from __future__ import annotations

import json
import sys
from pathlib import Path

import torch

from kd.core.io import save_safetensors
from kd.train.sharding import full, like


class Checkpoint:
    """Trainable (LoRA) weights + optimizer state + RNG + step + logged history, as safetensors.
    Written atomically every `every` steps (distill.checkpoint_every; None: never, for kd tune / kd select's short
    throw-away runs); a resumed run continues to the same bits as an unbroken one."""

    def __init__(self, path: Path, fingerprint: str, every: int | None = None):
        self.path, self.fingerprint, self.every = Path(path), fingerprint, every

    def due(self, step: int, total: int) -> bool:
        return self.every is not None and step % self.every == 0 and step < total

    def save(self, model, optimizer, step: int, history: list[dict], write: bool = True) -> None:
        """Full tensors (FSDP shards gathered: every process calls this, `write` on one)."""
        tensors = {f"param/{n}": full(p) for n, p in model.named_parameters() if p.requires_grad}
        for i, group in enumerate(optimizer.param_groups):
            for j, p in enumerate(group["params"]):  # SGD's momentum, AdamW8bit's quantized moments, ...
                for key, v in optimizer.state.get(p, {}).items():
                    if torch.is_tensor(v):
                        tensors[f"optim/{i}/{j}/{key}"] = full(v)
                    else:  # a python number (bitsandbytes' step count): restored as one
                        tensors[f"optim/{i}/{j}/{key}#number"] = torch.tensor(v)
        if not write:
            return
        tensors["rng/torch"] = torch.get_rng_state()
        meta = {"fingerprint": self.fingerprint, "step": str(step), "history": json.dumps(history)}
        save_safetensors(tensors, self.path, metadata=meta)

    def load(self, model, optimizer) -> tuple[int, list[dict]] | None:
        """Restore if a checkpoint of this exact run exists; returns (step, history) or None."""
        from safetensors import safe_open

        if not self.path.exists():
            return None
        try:
            with safe_open(str(self.path), framework="pt") as f:
                meta = f.metadata() or {}
                if meta.get("fingerprint") != self.fingerprint:
                    return None
                tensors = {k: f.get_tensor(k) for k in f.keys()}
        except (OSError, ValueError, RuntimeError) as e:  # safetensors' errors for a torn or garbage file
            # say so: a silent restart from step 0 would hide a bug in save/load
            print(f"distill: checkpoint {self.path} is unreadable ({e}); starting from step 0", file=sys.stderr)
            return None
        params = dict(model.named_parameters())
        with torch.no_grad():
            for k, v in tensors.items():
                if k.startswith("param/"):
                    p = params[k[len("param/"):]]
                    p.copy_(like(p, v))  # FSDP: this process's shard of it
        for i, group in enumerate(optimizer.param_groups):
            for j, p in enumerate(group["params"]):
                prefix = f"optim/{i}/{j}/"
                for k in (k for k in tensors if k.startswith(prefix)):
                    key, v = k[len(prefix):], tensors[k]
                    optimizer.state[p][key.removesuffix("#number")] = (
                        v.item() if key.endswith("#number") else like(p, v).clone())
        torch.set_rng_state(tensors["rng/torch"])
        return int(meta["step"]), json.loads(meta["history"])

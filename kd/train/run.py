"""One LoRA training run of the student, shared by `distill@<strategy>` and the fine-tune control (`finetune`):
build the LoRA, train (kd.train.distill.train) with dvclive curves and resumable checkpoints, save the adapter
atomically, write the metrics. The stages only choose the examples and the teacher signal."""

from __future__ import annotations

import hashlib
import json
import math
import time
from dataclasses import dataclass, replace
from pathlib import Path
from typing import TYPE_CHECKING, Callable

from kd.config.arms import adapter_name, run_name, trained_by
from kd.core.errors import KdError
from kd.core.io import atomic_path, remove_tree, sha256_file, write_json
from kd.train.checkpoint import Checkpoint
from kd.train.distill import Recipe, summarise, train
from kd.train.examples import Example
from kd.train.sharding import trainable_state

if TYPE_CHECKING:
    from kd.config.params import Distill, Lora, Params, Student


def fingerprint(*parts) -> str:
    """A digest of everything a run's result depends on: a checkpoint from other inputs is never resumed. Typed
    params sections enter as their plain data."""
    def plain(o):
        return o.model_dump() if hasattr(o, "model_dump") else str(o)
    return hashlib.sha256(json.dumps(parts, sort_keys=True, default=plain).encode()).hexdigest()


def weights_digest(model_dir: str | Path) -> list[str]:
    return sorted(sha256_file(f) for f in Path(model_dir).glob("*.safetensors"))


def lora_student(model_dir: str | Path, dtype: str, trust_remote_code: bool, lora: Lora, seed: int,
                 quantization: str | None = None, device: str | None = None):
    """The student with fresh LoRA adapters (A drawn from the seeded global generator, B zero); with
    `quantization` (student.quantization) a QLoRA student: the frozen base in bitsandbytes 4/8 bit."""
    import torch
    from peft import LoraConfig, get_peft_model

    from kd.models.loading import load_model

    model = load_model(model_dir, dtype, trust_remote_code, quantization=quantization, device=device)
    torch.manual_seed(seed)  # LoRA A matrices are drawn from the global generator
    return get_peft_model(model, LoraConfig(r=lora.r, lora_alpha=lora.alpha, lora_dropout=lora.dropout,
                                            target_modules=list(lora.target_modules), task_type="CAUSAL_LM"))


def save_adapter(model, out_dir: str | Path, state: dict | None = None) -> None:
    """Atomic, byte-stable: peft keeps target_modules as a set, whose saved order follows PYTHONHASHSEED.
    `state`: the full LoRA weights of a sharded student (kd.train.sharding.trainable_state), saved in the same format."""
    for c in model.peft_config.values():
        if isinstance(c.target_modules, (set, frozenset)):
            c.target_modules = sorted(c.target_modules)
    with atomic_path(out_dir) as tmp:
        model.save_pretrained(str(tmp), safe_serialization=True, **({"state_dict": state} if state else {}))


def control_config(distill: Distill) -> Distill:
    """The fine-tune control's training settings, derived from the KD arms' (`distill.*`): every setting shared
    (optimizer, lr, schedule, batch, LoRA, lengths, checkpoints, validation), CE on the gold solutions, no teacher.
    Derived, not copied key by key, so a new `distill.*` key reaches the control without anyone listing it."""
    return distill.model_copy(update={"hard_target": "gold"})


def run_paths(arm: str) -> tuple[Path, Path, Path, Path]:
    """A trained arm's outputs, from the arms table (kd/config/arms.py): its adapter folder models/<adapter>, its
    curves reports/distill/<run>/, its metrics results/distill/<run>.json, and the work folder a killed run resumes
    from, .kd-work/<training stage> ('@' as '/'): .kd-work/finetune, .kd-work/distill/<strategy>."""
    run, stage = run_name(arm), trained_by(arm)
    return (Path("models") / adapter_name(arm), Path("reports/distill") / run, Path("results/distill") / f"{run}.json",
            Path(".kd-work") / stage.replace("@", "/"))


@dataclass(frozen=True)
class StudentRun:
    """One LoRA student run as every trainer makes it (distill@<s>, finetune, kd tune, kd select): the student's
    params, the training settings, the loss weights, the seed and the instruction. The fine-tune control is
    `StudentRun.of(p, control=True)`: the KD arms' run with the teacher term's settings removed (control_config), so
    the two cannot drift. tune and select vary it with `dataclasses.replace` (lr, epochs, alpha, ...)."""
    root: Path
    student: Student   # params student.*: the model folder's dtype, trust_remote_code, quantization
    cfg: Distill       # distill.* (the control: control_config(distill.*))
    alpha: float
    temperature: float
    seed: int
    instruction: str   # prompting.instruction: the answer-format line after every question

    @classmethod
    def of(cls, c: Params, root: str | Path = ".", control: bool = False) -> "StudentRun":
        return cls(Path(root), c.student, control_config(c.distill) if control else c.distill, c.alpha,
                   c.temperature, c.seed, c.prompting.instruction)

    def varied(self, **distill) -> "StudentRun":
        """This run with some `distill.*` settings changed (kd tune's trials, kd select's candidates); `lora_r` sets
        distill.lora.r."""
        if "lora_r" in distill:
            distill["lora"] = self.cfg.lora.model_copy(update={"r": distill.pop("lora_r")})
        return replace(self, cfg=self.cfg.model_copy(update=distill))

    def model(self, device: str | None = None):
        """The student (models/student) with fresh LoRA adapters, every generator seeded first."""
        from kd.core.seeding import seed_everything

        seed_everything(self.seed)
        s = self.student
        return lora_student(self.root / "models/student", s.dtype, s.trust_remote_code, self.cfg.lora,
                            self.seed, quantization=s.quantization, device=device)

    def validation(self, tokenizer) -> Callable[[object], float] | None:
        return validation(self.root, tokenizer, self.instruction, self.cfg.max_length)

    @property
    def recipe(self) -> Recipe:
        return Recipe(self.cfg, self.alpha, self.temperature, self.seed)

    def train(self, model, examples: list[Example], teacher_for, checkpoint: Checkpoint, on_step=None,
              width: int | None = None, shard: tuple[int, int] = (0, 1)):
        """The training loop (kd.train.distill.train) with these settings; returns the per-step history."""
        return train(model, examples, teacher_for, self.recipe, checkpoint, on_step, width=width, shard=shard)


def validation(root: str | Path, tokenizer, instruction: str, max_length: int) -> Callable[[object], float] | None:
    """run_training's `validate`: the mean gold NLL per token over data/prepared/validation.jsonl (None when the
    split is empty: prepare.validation_size 0)."""
    from kd.core.io import read_jsonl
    from kd.train.distill import gold_nll

    rows = read_jsonl(Path(root) / "data/prepared/validation.jsonl")
    if not rows:
        return None

    def validate(model) -> float:
        per_q = gold_nll(model, tokenizer, rows, instruction, max_length)
        return sum(per_q) / len(per_q)
    return validate


def update_norm_ratio(model) -> float | None:
    """||dW|| / ||W|| over every LoRA-adapted weight: dW = scaling * B @ A (float64), W the frozen base weight. How
    far training moved the student (None for a sharded or quantized base, whose full weights are not at hand)."""
    import torch

    num = den = 0.0
    for mod in model.modules():
        if not (hasattr(mod, "lora_A") and hasattr(mod, "base_layer")):
            continue
        for key in mod.lora_A:
            w = mod.base_layer.weight
            if not torch.is_floating_point(w) or hasattr(w, "placements"):  # bitsandbytes-packed, or an FSDP shard
                return None
            a, b = mod.lora_A[key].weight.double(), mod.lora_B[key].weight.double()
            num += float(((b @ a) * mod.scaling[key]).pow(2).sum())
            den += float(w.double().pow(2).sum())
    return (num / den) ** 0.5 if den else None


def run_training(run: StudentRun, arm: str, model, examples: list[Example],
                 teacher_for: Callable[[int], Callable[[int, int], object] | None], run_fingerprint: str, *,
                 width: int | None = None, extra: dict | None = None, shard: tuple[int, int] = (0, 1),
                 validate: Callable[[object], float] | None = None) -> dict | None:
    """Train arm `arm`'s `model` (a peft LoRA model) on `examples`; returns the metrics written to its
    results/distill/<run>.json (paths: run_paths).

    `validate(model)`: the validation gold NLL per token, measured before training, every `cfg.val_every` steps
    (0: never in between) and after; with ||dW||/||W|| it says how far training moved the student.
    The training curves go to a temp folder that replaces `curves_dir` only when training succeeded: a failed
    run leaves the previous curves in place."""
    from dvclive import Live
    from tqdm import tqdm

    name, cfg = trained_by(arm), run.cfg
    adapter_dir, curves_dir, metrics_path, work_dir = run_paths(arm)
    if not examples:
        raise KdError(f"{name}: no training examples (all skipped or filtered out; see distill.max_length and "
                      "distill.response_filter)")
    t0 = time.time()
    checkpoint = Checkpoint(work_dir / "checkpoint.safetensors", run_fingerprint, cfg.checkpoint_every)
    if shard[0] > 0:  # another process of a launch (kd/core/launch.py): trains its share, rank 0 writes everything
        run.train(model, examples, teacher_for, checkpoint, width=width, shard=shard)
        trainable_state(model)  # compute.sharding fsdp: its part of gathering the adapter
        return None
    total = cfg.epochs * math.ceil(len(examples) / cfg.batch_size)
    every = cfg.val_every
    val_before = validate(model) if validate else None  # LoRA B is zero: this is the base student
    with atomic_path(curves_dir) as live_tmp:
        with Live(str(live_tmp), save_dvc_exp=False, dvcyaml=None) as live, \
                tqdm(total=total, desc=name, unit="step") as bar:
            if val_before is not None:
                live.log_metric("val/gold_nll", val_before)  # step 0
            live.next_step()

            def on_step(step, rec):
                for key in ("loss", "ce", "kd", "lr"):
                    live.log_metric(f"train/{key}", rec[key])
                if validate and "val_nll" not in rec and (step == total or (every and step % every == 0)):
                    rec["val_nll"] = validate(model)  # kept in the history: a resumed run replays it
                if rec.get("val_nll") is not None:
                    live.log_metric("val/gold_nll", rec["val_nll"])
                live.next_step()
                bar.update(1)
                bar.set_postfix(loss=f"{rec['loss']:.4f}")

            history = run.train(model, examples, teacher_for, checkpoint, on_step, width=width, shard=shard)
        save_adapter(model, adapter_dir, trainable_state(model))
    summary = {**summarise(history, len(examples), cfg.epochs),
               "response_tokens": sum(e.response_len for e in examples),
               "trainable_params": sum(q.numel() for q in model.parameters() if q.requires_grad),
               "update_norm_ratio": update_norm_ratio(model),
               "val_nll_before": val_before,
               "val_nll_after": history[-1].get("val_nll") if history else None, **(extra or {})}
    write_json(metrics_path, summary)
    remove_tree(work_dir)
    print(f"{name}: {summary['steps']} steps over {len(examples)} examples ({summary['response_tokens']} target "
          f"tokens), final loss {summary['final_loss']:.4f} (ce {summary['final_ce']:.4f}, kd "
          f"{summary['final_kd']:.5f}), {time.time() - t0:.1f} s")
    return summary

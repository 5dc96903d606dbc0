"""LoRA distillation of the student on the teacher's responses, without the priming prefix.

Each example is the student's own prompt (plain question, chat template) followed by the teacher's response
token ids. Student position len(prompt)+j-1 predicts response token j; the teacher signal row j is the
teacher's prediction of that same token (from its own, primed, prompt). So the two distributions are compared
at the same response tokens whatever the prefix length, labels are next tokens, and prompt positions carry no
loss. The loop is plain PyTorch (the paper's SGD + cosine at effective batch 1, or AdamW) so it is deterministic on
CPU and resumable from a checkpoint to the same bits.

Dropout is seeded per forward pass from (seed, epoch, example id, pass): pass 0 is the teacher-response pass (the KD
term), pass 1 the gold-solution pass (the CE term under `hard_target: gold`). The fine-tune control runs the same
examples in the same order with no teacher: it skips pass 0 and its pass 1 draws exactly the KD arm's dropout masks,
so with the same CE weight (alpha) its gradient is the KD arm's minus the teacher term (tests/train/test_distill.py)."""

from __future__ import annotations

import math
from dataclasses import dataclass
from typing import Callable

import torch

from kd.config.params import Distill
from kd.core.errors import KdError
from kd.train.checkpoint import Checkpoint
from kd.train.examples import Example, build_gold_examples
from kd.train.loss import combine, response_losses
from kd.train.qlora import make_optimizer
from kd.train.sharding import all_reduce_grads, all_reduce_sums, is_sharded


def gold_nll(model, tokenizer, rows: list[dict], instruction: str, max_length: int) -> list[float]:
    """Per question: the student's mean negative log-likelihood per token of the gold solution (+ eos), after the
    student's own prompt (float64 log-softmax; eval mode, so no dropout and no random draw)."""
    import torch.nn.functional as F

    examples, _ = build_gold_examples(rows, tokenizer, instruction, max_length)
    out = []
    was_training = model.training
    model.eval()
    with torch.no_grad():
        for e in examples:
            ids = torch.tensor([e.input_ids], device=model.device)
            logits = model(input_ids=ids).logits[0, e.prompt_len - 1:-1].double()
            out.append(float(F.cross_entropy(logits, ids[0, e.prompt_len:])))
    if was_training:
        model.train()
    return out


def epoch_order(n: int, seed: int, epoch: int) -> list[int]:
    g = torch.Generator().manual_seed(seed * 1000 + epoch)
    return torch.randperm(n, generator=g).tolist()


def cosine_lr(base: float, step: int, total: int) -> float:
    return base * 0.5 * (1.0 + math.cos(math.pi * step / max(total, 1)))


def _shifted_hidden(model, ids: list[int], start: int, count: int) -> torch.Tensor:
    """Student final hidden states at the positions predicting tokens ids[start:start+count]."""
    x = torch.tensor([ids], device=model.device)
    # logits_to_keep: no position. With logits_to_keep=1, a hidden state that requires grad sends the output layer
    # through a batched matmul that copies the whole [hidden, vocab] weight (~1 s a forward on the 0.5B student)
    none = torch.zeros(0, dtype=torch.long, device=model.device)
    out = model(input_ids=x, output_hidden_states=True, logits_to_keep=none)
    return out.hidden_states[-1][0, start - 1:start - 1 + count]


def pass_seed(seed: int, epoch: int, example_id: int) -> int:
    """The dropout seed of an example's first forward pass in an epoch (its second pass uses this + 1)."""
    return ((seed * 1000 + epoch) * 1_000_003 + example_id) * 2


def example_loss(model, ex: Example, teacher_logits: Callable[[int, int], torch.Tensor] | None, alpha: float,
                 temperature: float, kind: str, hard_target: str, chunk: int,
                 width: int | None = None, dropout_seed: int | None = None) -> dict[str, torch.Tensor]:
    """alpha * CE + (1 - alpha) * T^2 * KD for one example. With `teacher_logits` None (the fine-tune control) there
    is no KD term and, under `hard_target: gold`, no teacher-response pass: the gold pass alone, with the KD arm's
    dropout seed for it. `dropout_seed`: pass k seeds torch's generator with dropout_seed + k (None: unseeded)."""
    head = model.get_output_embeddings()
    zero = torch.zeros((), dtype=torch.float32)
    ce = kd = zero
    if teacher_logits is not None or hard_target != "gold":
        if dropout_seed is not None:
            torch.manual_seed(dropout_seed)
        h = _shifted_hidden(model, ex.input_ids, ex.prompt_len, ex.response_len)
        targets = torch.tensor(ex.input_ids[ex.prompt_len:], device=h.device)
        ce, kd = response_losses(h, head, targets, teacher_logits, temperature, kind, chunk, width)
    if hard_target == "gold":
        if dropout_seed is not None:
            torch.manual_seed(dropout_seed + 1)
        n = len(ex.gold_ids) - ex.prompt_len
        hg = _shifted_hidden(model, ex.gold_ids, ex.prompt_len, n)
        ce, _ = response_losses(hg, head, torch.tensor(ex.gold_ids[ex.prompt_len:], device=hg.device), None,
                                temperature, kind, chunk, width)
    if not torch.is_tensor(kd) or kd.device != ce.device:
        kd = torch.as_tensor(kd, dtype=ce.dtype, device=ce.device)
    return {"loss": combine(ce, kd, alpha, temperature), "ce": ce, "kd": kd}


@dataclass(frozen=True)
class Recipe:
    """What the training loop needs from a run's settings: distill.* (`cfg`: optimizer, lr, epochs, batch, loss,
    hard target, ...), the loss weights alpha and T, and the seed (kd.train.run.StudentRun.recipe)."""
    cfg: Distill
    alpha: float
    temperature: float
    seed: int


def train(model, examples: list[Example], teacher_for: Callable[[int], Callable[[int, int], torch.Tensor]],
          recipe: Recipe, checkpoint: Checkpoint, on_step: Callable[[int, dict], None] | None = None, *,
          width: int | None = None, shard: tuple[int, int] = (0, 1)) -> list[dict]:
    """Run the whole schedule; returns the per-step history [{step, epoch, loss, ce, kd, lr}].

    Each optimizer step takes the next `distill.batch_size` examples (B) of the epoch's seeded order; their losses
    are averaged (gradient accumulation). shard=(rank, N) under compute.processes (kd/core/launch.py): process r takes
    examples r, r+N, ... of each step's B and the gradients are summed over processes (all-reduce, as DDP does), so
    which examples are trained on, in which step and order, never depends on N. Each forward pass's dropout is
    seeded from (seed, epoch, id, pass) (`pass_seed`), so it depends neither on which process ran it nor on whether
    the run has a teacher (the fine-tune control draws the KD arm's masks for its gold pass)."""
    cfg, alpha, temperature, seed = recipe.cfg, recipe.alpha, recipe.temperature, recipe.seed
    params = [p for p in model.parameters() if p.requires_grad]
    opt = make_optimizer(params, cfg)
    batch = cfg.batch_size
    rank, size = shard
    sharded = is_sharded(model)  # compute.sharding fsdp (kd/train/sharding.py)
    per_epoch = math.ceil(len(examples) / batch)
    total = cfg.epochs * per_epoch
    resumed = checkpoint.load(model, opt)
    step, history = resumed if resumed else (0, [])
    if resumed:
        print(f"distill: resuming from step {step}/{total} ({checkpoint.path})")
    for rec in history:
        if on_step:
            on_step(rec["step"], rec)
    model.train()
    for epoch in range(cfg.epochs):
        order = epoch_order(len(examples), seed, epoch)
        for k in range(per_epoch):
            if epoch * per_epoch + k < step:
                continue  # done before the interruption
            group = [examples[i] for i in order[k * batch:(k + 1) * batch]]
            lr = cosine_lr(cfg.lr, step, total)
            for g in opt.param_groups:
                g["lr"] = lr
            sums = torch.zeros(3, dtype=torch.float64)
            mine = group[rank::size]
            passes = math.ceil(len(group) / size) if sharded else len(mine)  # FSDP: the same count on every process
            for n in range(passes):
                real = n < len(mine)  # else a zero-weight pass, for FSDP's collectives only
                ex = mine[n] if real else group[0]
                if sharded:
                    model.set_requires_gradient_sync(n == passes - 1)  # reduce-scatter once, after the last pass
                losses = example_loss(model, ex, teacher_for(ex.id), alpha, temperature, cfg.loss,
                                      cfg.hard_target, cfg.kd_chunk, width, pass_seed(seed, epoch, ex.id))
                if not torch.isfinite(losses["loss"]):
                    raise KdError(f"distill: non-finite loss at step {step} (example id {ex.id}); lower distill.lr")
                loss = losses["loss"] / len(group)
                (loss if real else loss * 0).backward()
                if real:
                    sums += torch.tensor([float(losses[k].detach()) for k in ("loss", "ce", "kd")], dtype=torch.float64)
            if size > 1:
                if not sharded:
                    all_reduce_grads(params)
                all_reduce_sums(sums)
            opt.step()
            opt.zero_grad(set_to_none=True)
            step += 1
            rec = {"step": step, "epoch": epoch, "id": group[0].id if batch == 1 else [e.id for e in group],
                   "lr": lr, **{key: float(v) / len(group) for key, v in zip(("loss", "ce", "kd"), sums)}}
            history.append(rec)
            if on_step:
                on_step(step, rec)
            if checkpoint.due(step, total) and (rank == 0 or sharded):
                checkpoint.save(model, opt, step, history, write=rank == 0)  # FSDP: every process gathers
    model.eval()
    return history


def summarise(history: list[dict], n_examples: int, epochs: int) -> dict:
    last = [h for h in history if h["epoch"] == epochs - 1]
    mean = lambda key: sum(h[key] for h in last) / max(len(last), 1)  # noqa: E731
    return {"steps": len(history), "examples": n_examples, "epochs": epochs,
            "final_loss": mean("loss"), "final_ce": mean("ce"), "final_kd": mean("kd"),
            "first_loss": history[0]["loss"] if history else None}

"""Distillation losses. total = α·CE + (1−α)·T²·D(p_student, p_teacher), token-averaged over response tokens.

D is the paper's reverse KL, KL(p_s ‖ p_t) = Σ p_s (log p_s − log p_t), or forward KL, or the Jensen–Shannon
divergence; both distributions at temperature T. The vocabulary-wide math runs in float64 (a float32 sum over 151,936
terms drifts by ~1e-6 nats; the matmuls stay in the model's dtype) over chunks of
positions under activation checkpointing, so a 151,936-wide vocabulary never holds more than one chunk's
temporaries for backward."""

from __future__ import annotations

import math
from typing import Callable

import torch
import torch.nn.functional as F
from torch.utils.checkpoint import checkpoint

LN2 = math.log(2.0)


def divergence(student_logits: torch.Tensor, teacher_logits: torch.Tensor, temperature: float,
               kind: str) -> torch.Tensor:
    """Per-position divergence (shape [N]) between softmax(student/T) and softmax(teacher/T)."""
    s = F.log_softmax(student_logits.double() / temperature, dim=-1)
    t = F.log_softmax(teacher_logits.double() / temperature, dim=-1)
    if kind == "reverse_kl":
        return (s.exp() * (s - t)).sum(-1)
    if kind == "forward_kl":
        return (t.exp() * (t - s)).sum(-1)
    if kind == "jsd":
        m = torch.logsumexp(torch.stack([s, t]), dim=0) - LN2  # log of the mixture (p_s + p_t) / 2
        return 0.5 * (s.exp() * (s - m)).sum(-1) + 0.5 * (t.exp() * (t - m)).sum(-1)
    raise ValueError(f"unknown divergence {kind!r}")


def combine(ce: torch.Tensor, kd: torch.Tensor, alpha: float, temperature: float) -> torch.Tensor:
    return alpha * ce + (1.0 - alpha) * temperature ** 2 * kd


def _chunk_terms(hidden, output_layer, targets, teacher_logits, temperature, kind, width):
    logits = output_layer(hidden)[..., :width].double()
    ce = F.cross_entropy(logits, targets, reduction="sum")
    kd = divergence(logits, teacher_logits[..., :width], temperature, kind).sum() if teacher_logits is not None \
        else logits.new_zeros(())
    return ce, kd


def response_losses(hidden: torch.Tensor, output_layer: torch.nn.Module, targets: torch.Tensor,
                    teacher_logits: Callable[[int, int], torch.Tensor] | None, temperature: float, kind: str,
                    chunk: int, width: int | None = None) -> tuple[torch.Tensor, torch.Tensor]:
    """Mean CE and mean divergence over R response positions.

    hidden[j] is the student's final hidden state at the position that predicts targets[j] (already shifted:
    position len(prompt)+j-1 predicts response token j). teacher_logits(a, b) returns the teacher's logits for
    the same response tokens a..b-1, so both distributions are always taken at the same tokens. `width` keeps
    the first columns only: the real tokens, without the output layer's padding rows (kd.vocab.check_same_vocab)."""
    n = targets.shape[0]
    ce_sum = hidden.new_zeros((), dtype=torch.float64)
    kd_sum = hidden.new_zeros((), dtype=torch.float64)
    for a in range(0, n, chunk):
        b = min(a + chunk, n)
        t = teacher_logits(a, b).to(hidden.device) if teacher_logits is not None else None
        if torch.is_grad_enabled() and hidden.requires_grad:
            ce, kd = checkpoint(_chunk_terms, hidden[a:b], output_layer, targets[a:b], t, temperature, kind,
                                width, use_reentrant=False)
        else:
            ce, kd = _chunk_terms(hidden[a:b], output_layer, targets[a:b], t, temperature, kind, width)
        ce_sum, kd_sum = ce_sum + ce, kd_sum + kd
    return ce_sum / n, kd_sum / n

"""QLoRA students and 8-bit optimisers (bitsandbytes), on CUDA and on the CPU.

`student.quantization: bnb-4bit` loads the frozen student base in NF4 (compute in `student.dtype`), `bnb-8bit` in
LLM.int8(); the LoRA adapters stay in float32 on top (peft's bitsandbytes LoRA layers). `distill.optimizer`
picks the optimiser of the LoRA weights: `sgd` (the paper's, with momentum), `adamw` (torch's), `adamw-8bit` or
`paged-adamw-8bit` (bitsandbytes; paged state only exists on CUDA, on the CPU bitsandbytes falls back to the unpaged optimiser).
Loading a quantized model is kd.models.loading.load_model's (`quantization=`), for the teacher and the student alike.

What bitsandbytes 0.50 does on the CPU, measured here (tests/train/test_qlora.py): NF4 and int8 Linear layers run forward
and backward, AdamW8bit steps."""

from __future__ import annotations

from typing import TYPE_CHECKING

from kd.core.errors import ParamError

if TYPE_CHECKING:
    from kd.config.params import Distill, Params

STUDENT_QUANTIZATIONS = ["bnb-4bit", "bnb-8bit"]
OPTIMIZERS = ["sgd", "adamw", "adamw-8bit", "paged-adamw-8bit"]
BNB_OPTIMIZERS = ["adamw-8bit", "paged-adamw-8bit"]  # bitsandbytes' kernels: ISA-specific, not for FSDP


def check_params(c: Params) -> None:
    """Cross-key checks: refuse the combinations that cannot work, naming the key and what is allowed."""
    q, opt = c.student.quantization, c.distill.optimizer
    if q and c.compute.portable:
        raise ParamError("student.quantization", f"is {q}, but compute.portable is true: bitsandbytes' kernels "
                         "are ISA-specific, so a quantized student cannot give the same bits on every CPU",
                         "null with compute.portable true, or compute.portable false")
    if q and c.student.dtype not in ("bfloat16", "float16", "float32"):
        raise ParamError("student.dtype", f"is {c.student.dtype}, which cannot be the compute dtype of a "
                         f"{q} student", "bfloat16, float16 or float32")
    if opt in BNB_OPTIMIZERS and c.compute.portable:
        raise ParamError("distill.optimizer", f"is {opt}, but compute.portable is true: bitsandbytes' optimiser "
                         "kernels are ISA-specific", "sgd or adamw with compute.portable true")


def make_optimizer(params: list, cfg: Distill):
    """The LoRA weights' optimiser, by `distill.optimizer`."""
    import torch

    name = cfg.optimizer
    if name == "sgd":
        return torch.optim.SGD(params, lr=cfg.lr, momentum=cfg.momentum, weight_decay=cfg.weight_decay)
    if name == "adamw":  # torch's, single-tensor loop (foreach=False): the same bits whatever the parameter count
        return torch.optim.AdamW(params, lr=cfg.lr, weight_decay=cfg.weight_decay, foreach=False)
    if name not in OPTIMIZERS:
        raise ParamError("distill.optimizer", f"is {name!r}", ", ".join(OPTIMIZERS))
    from kd.models.loading import (
        import_bnb,  # here, not at the top: kd.config.params imports this module (no torch, no bnb)
    )

    bnb = import_bnb(f"distill.optimizer={name}")
    opt = bnb.optim.AdamW8bit if name == "adamw-8bit" else bnb.optim.PagedAdamW8bit
    return opt(params, lr=cfg.lr, weight_decay=cfg.weight_decay)

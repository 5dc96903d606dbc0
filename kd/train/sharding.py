"""`compute.sharding` for `distill@*` under compute.processes > 1 (kd/core/launch.py): how the student is spread over the
processes.

- `ddp`: every process holds the whole student; after each optimizer step's backward passes the LoRA gradients are
  summed over processes (one all-reduce of a flat buffer: DDP's math without its wrapper; `all_reduce_grads`).
- `fsdp`: for students too large for one device. torch's FSDP2 (`torch.distributed.fsdp.fully_shard`) shards every
  parameter, frozen base and LoRA alike, over the processes: each transformer block (the model's
  `_no_split_modules`, accelerate's TRANSFORMER_BASED_WRAP) is one unit all-gathered for its forward and backward,
  the root (embeddings, final norm, output layer) another, gathered from its forward to the end of its backward;
  gradients are reduce-scattered and *summed* (divide factor 1, as `ddp` sums), the optimizer steps on each
  process's shard. Every process runs the same number of forward and
  backward passes per optimizer step (FSDP's collectives need them all): one that has fewer of the step's examples
  runs a zero-weight pass. Checkpoints and the adapter are gathered to full tensors (a collective), and written by
  process 0 in the same format as one process's. With compute.processes 1 there is nothing to shard: one process
  trains the whole student, as with `ddp`. Not with a bitsandbytes student or optimiser (kd/config/params.py refuses them).

The launched processes read accelerate/fsdp.yaml's settings from the environment `accelerate launch` sets: it must
say fsdp_version 2 and its fsdp_reshard_after_forward is applied here. Proven on the CPU with the gloo backend
(tests/train/test_sharding.py); never run on a GPU."""

from __future__ import annotations

import os

import torch

from kd.core.errors import KdError


def shard(model, size: int):
    """FSDP2 over `size` processes (the process group kd.core.launch.init joined), in place; returns the model."""
    from torch.distributed.device_mesh import init_device_mesh
    from torch.distributed.fsdp import fully_shard

    version = os.environ.get("FSDP_VERSION", "2")
    if version != "2":
        raise KdError(f"compute.sharding fsdp: accelerate/fsdp.yaml says fsdp_version {version}; kd/train/sharding.py "
                      "shards with FSDP2 (fsdp_version: 2)")
    reshard = os.environ.get("FSDP_RESHARD_AFTER_FORWARD", "true").lower() == "true"
    mesh = init_device_mesh("cuda" if torch.cuda.is_available() else "cpu", (size,))
    blocks = set(getattr(model.get_base_model(), "_no_split_modules", None) or ())
    units = [m for m in model.modules() if type(m).__name__ in blocks]
    if not units:
        raise KdError(f"compute.sharding fsdp: {type(model.get_base_model()).__name__} names no transformer block "
                      "class (_no_split_modules) to shard by; use compute.sharding ddp")
    for m in units:
        fully_shard(m, mesh=mesh, reshard_after_forward=reshard)
    # the root (embeddings, norm, output layer) stays gathered from its forward through its backward, whatever
    # fsdp_reshard_after_forward says (FSDP2's own default for a root): kd.train.distill applies the output layer to the
    # hidden states after forward returns (the chunked loss)
    fully_shard(model, mesh=mesh, reshard_after_forward=False)
    held = sum(p.to_local().numel() for p in model.parameters())
    print(f"compute.sharding fsdp: {len(units)} blocks and the root sharded over {size} processes; process "
          f"{mesh.get_local_rank()} holds {held} of {sum(p.numel() for p in model.parameters())} parameter elements",
          flush=True)
    for m in model.modules():
        if is_sharded(m):
            m.set_gradient_divide_factor(1.0)  # a sum over processes, as ddp's all-reduce ...
            m.set_force_sum_reduction_for_comms(True)  # ... as a plain SUM (gloo has no PREMUL_SUM)
    return model


def is_sharded(model) -> bool:
    from torch.distributed.fsdp import FSDPModule

    return isinstance(model, FSDPModule)


def full(t: torch.Tensor) -> torch.Tensor:
    """The whole tensor on the CPU: a sharded (DTensor) parameter or optimizer state is gathered (a collective:
    every process must call it, in the same order)."""
    from torch.distributed.tensor import DTensor

    return (t.full_tensor() if isinstance(t, DTensor) else t).detach().cpu()


def like(p: torch.Tensor, whole: torch.Tensor) -> torch.Tensor:
    """`whole` (a full tensor read from a checkpoint) laid out like parameter `p`: this process's shard of it when
    `p` is sharded (every process read the same file: no communication), else `whole` on p's device."""
    from torch.distributed.tensor import DTensor, distribute_tensor

    if isinstance(p, DTensor):
        return distribute_tensor(whole.to(p.device), p.device_mesh, p.placements, src_data_rank=None)
    return whole.to(p.device)


def trainable_state(model) -> dict[str, torch.Tensor] | None:
    """The full LoRA weights by parameter name when the model is sharded (a collective), else None."""
    if not is_sharded(model):
        return None
    return {n: full(p).contiguous() for n, p in model.named_parameters() if p.requires_grad}


def all_reduce_grads(params: list) -> None:
    """ddp: sum the trainable gradients over every process (one flat buffer)."""
    import torch.distributed as dist

    flat = torch.cat([(p.grad if p.grad is not None else torch.zeros_like(p)).reshape(-1) for p in params])
    dist.all_reduce(flat)
    offset = 0
    for p in params:
        n = p.numel()
        p.grad = flat[offset:offset + n].view_as(p).clone()
        offset += n


def all_reduce_sums(sums: torch.Tensor) -> None:
    """The logged loss sums over every process (in place)."""
    import torch.distributed as dist

    on_device = sums.to("cuda" if torch.cuda.is_available() else "cpu")  # NCCL reduces CUDA tensors only
    dist.all_reduce(on_device)
    sums.copy_(on_device.cpu())

"""`compute.processes`: a heavy stage runs in this process for 1, and re-executes itself under `accelerate launch`
for N, with the accelerate config from this repo's accelerate/ folder (multi-gpu.yaml when CUDA is there,
cpu-gloo.yaml otherwise; fsdp.yaml for `distill@*` with `compute.sharding: fsdp`, kd/train/sharding.py). dvc.yaml keeps
its `python -m stages.<stage> ...` commands: a stage calls `relaunch` first thing (with its module name), so
`dvc repro` on a 4-GPU box with `compute.processes: 4` uses all four without editing dvc.yaml.

Inside the launched processes `world()` gives (rank, world size) from torchrun's environment and `init()` joins the
process group (NCCL on CUDA, gloo on the CPU). Work is split by `mine`: item k goes to rank k mod N, in the stage's
deterministic order, and rank 0 merges in id order after `barrier()`; outputs are written by rank 0 only."""

from __future__ import annotations

import os
import socket
import sys

from kd.core.paths import SOURCE_ROOT

ROOT = SOURCE_ROOT
CONFIGS = {"cuda": ROOT / "accelerate/multi-gpu.yaml", "cpu": ROOT / "accelerate/cpu-gloo.yaml",
           "fsdp": ROOT / "accelerate/fsdp.yaml"}  # fsdp: CUDA (NCCL) or CPU (gloo), as init() picks
LAUNCHED = "KD_LAUNCHED"  # set in the launched processes: a stage never re-launches itself twice


def world() -> tuple[int, int]:
    """(rank, world size) of this process: (0, 1) outside `accelerate launch`."""
    return int(os.environ.get("RANK", 0)), int(os.environ.get("WORLD_SIZE", 1))


def mine(items: list, rank: int, size: int) -> list:
    """This rank's share of `items` (already in their deterministic order): items rank, rank + N, rank + 2N, ..."""
    return items[rank::size]


def _free_port() -> int:
    with socket.socket() as s:
        s.bind(("127.0.0.1", 0))
        return s.getsockname()[1]


def launch_argv(processes: int, module: str, args: list[str], cuda: bool | None = None,
                sharding: str = "ddp") -> list[str]:
    """The `accelerate launch` command that runs `python -m module args` in `processes` processes
    (`sharding`: compute.sharding, for distill@*)."""
    if cuda is None:
        import torch

        cuda = torch.cuda.is_available()
    config = CONFIGS["fsdp" if sharding == "fsdp" else "cuda" if cuda else "cpu"]
    return [sys.executable, "-m", "accelerate.commands.launch", "--config_file", str(config),
            "--num_processes", str(processes), "--main_process_port", str(_free_port()), "--module", module, *args]


def relaunch(processes: int, module: str, args: list[str], sharding: str = "ddp") -> None:
    """At the start of a stage: with compute.processes > 1, replace this process by `accelerate launch` of the same
    stage (returns only in the launched processes, or when processes is 1)."""
    if processes <= 1 or os.environ.get(LAUNCHED):
        return
    argv = launch_argv(processes, module, args, sharding=sharding)
    print(f"compute.processes={processes}: {' '.join(argv[1:])}", file=sys.stderr, flush=True)
    os.environ[LAUNCHED] = "1"
    sys.stdout.flush()
    os.execv(argv[0], argv)


def init() -> tuple[int, int]:
    """Join the process group when launched with N > 1 processes; returns (rank, world size)."""
    rank, size = world()
    if size > 1:
        import torch
        import torch.distributed as dist

        if not dist.is_initialized():
            cuda = torch.cuda.is_available()
            if cuda:
                torch.cuda.set_device(int(os.environ.get("LOCAL_RANK", 0)))
            dist.init_process_group("nccl" if cuda else "gloo")
    return rank, size


def device() -> str | None:
    """The device of this process: its own GPU under a multi-process launch, else the default (None)."""
    import torch

    if world()[1] > 1 and torch.cuda.is_available():
        return f"cuda:{int(os.environ.get('LOCAL_RANK', 0))}"
    return None


def barrier() -> None:
    import torch.distributed as dist

    if dist.is_available() and dist.is_initialized():
        dist.barrier()


def finish() -> None:
    import torch.distributed as dist

    if dist.is_available() and dist.is_initialized():
        dist.barrier()
        dist.destroy_process_group()

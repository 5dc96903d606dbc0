"""Stage `distill@<strategy>`: LoRA-train the student on the teacher's responses (no priming prefix)."""

import kd.core.portable; kd.core.portable.apply()  # noqa: E702 - compute.portable: ISA caps, before torch loads

import click

from kd.core import launch
from kd.core.entry import run_stage
from kd.core.io import sha256_file
from kd.data.prompting import check_context
from kd.harness.stage import Stage
from kd.train import sharding
from kd.train.inputs import load_kd_inputs
from kd.train.run import StudentRun, fingerprint, run_training, weights_digest


@click.command()
@click.argument("strategy")
def main(strategy):
    st = Stage("distill", strategy)
    c = st.c
    run = StudentRun.of(c)
    cfg = c.distill
    # compute.processes > 1: accelerate launch; ddp: at most one process per example of an optimizer step, fsdp: all
    # of them (they hold the student's shards), kd/train/sharding.py
    fsdp = c.compute.sharding == "fsdp"
    rank, procs = st.launch(c.compute.processes if fsdp else min(c.compute.processes, cfg.batch_size),
                            sharding=c.compute.sharding)
    # every artefact check runs before the student loads
    inputs = load_kd_inputs(".", strategy, c.student.trust_remote_code)
    run_fp = fingerprint(run.cfg, run.alpha, run.temperature, run.seed, run.instruction,
                         sha256_file(f"data/logits/{strategy}/manifest.json"),
                         sha256_file(f"data/teacher/{strategy}/responses.jsonl"), weights_digest("models/student"))
    st.seed()
    check_context(c, ".", {"student": inputs.tokenizer}, uses=("distill",))  # before the weights load
    kept, examples, skipped = inputs.examples(cfg.response_filter, run.instruction, cfg.max_length, cfg.hard_target)
    sharded = fsdp and procs > 1  # one process has nothing to shard
    model = run.model(device=None if sharded else launch.device())
    if sharded:  # loaded on the CPU, each block moved to this process's device as it is sharded
        sharding.shard(model, procs)
    run_training(run, f"kd-{strategy}", model, examples, inputs.teacher_for, run_fp,
                 width=inputs.vocab["kd_width"], shard=(rank, procs),
                 extra={"skipped": len(skipped), "filtered_out": len(inputs.responses) - len(kept),
                        "response_filter": cfg.response_filter, "hard_target": cfg.hard_target,
                        "kd_width": inputs.vocab["kd_width"]},
                 validate=run.validation(inputs.tokenizer) if rank == 0 and not sharded else None)
    st.finish()  # rank 0 wrote the adapter, curves and metrics (run_training printed its line)


if __name__ == "__main__":
    run_stage(main)

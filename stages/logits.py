"""Stage `logits@<strategy>`: teacher forward over (primed prompt + its response); store the teacher signal."""

import kd.core.portable; kd.core.portable.apply()  # noqa: E702 - compute.portable: ISA caps, before torch loads

import time
from pathlib import Path

import click

from kd.config.params import load_config
from kd.core import launch
from kd.core.entry import run_stage
from kd.core.environment import record_environment
from kd.core.io import read_json, read_jsonl
from kd.core.names import stage_arg
from kd.core.seeding import seed_everything
from kd.models.loading import load_model
from kd.teacher.signal import check_plain_head, check_responses, record_signal


@click.command()
@click.argument("strategy")
def main(strategy):
    c = load_config()
    stage_arg("strategy", strategy, c.prompting.strategies, "prompting.strategies")  # before any path use
    launch.relaunch(c.compute.processes, __spec__.name, [strategy])  # compute.processes > 1: accelerate launch
    rank, procs = launch.init()
    cfg, t = c.logits, c.teacher
    responses = read_jsonl(f"data/teacher/{strategy}/responses.jsonl")
    check_responses(responses, None, f"data/teacher/{strategy}/responses.jsonl", strategy)
    if cfg.format == "hidden":
        check_plain_head(read_json("models/teacher/config.json"), "models/teacher")
    t0 = time.time()
    seed_everything(c.seed)
    model = load_model("models/teacher", t.dtype, t.trust_remote_code, quantization=t.quantization,
                       device=launch.device())
    out = f"data/logits/{strategy}"
    done = record_signal(model, "models/teacher", responses, out, {"strategy": strategy, "dtype": t.dtype},
                         cfg.format, cfg.top_k, cfg.shard_rows, Path(".kd-work/logits") / strategy,
                         (rank, procs), launch.barrier, desc=f"logits@{strategy}")
    if done is None:  # rank > 0: rank 0 wrote the outputs
        return launch.finish()
    manifest, max_diff = done
    record_environment(f"logits-{strategy}")  # environment/logits-<s>.json: the lineage beyond params + code
    rows = sum(e["rows"] for e in manifest["examples"])
    size = sum(f.stat().st_size for f in Path(out).iterdir())
    print(f"logits@{strategy}: {len(responses)} examples, {rows} response tokens, format {cfg.format}, "
          f"{size / 1e6:.1f} MB, recompute max |diff| {max_diff}, {time.time() - t0:.1f} s")
    launch.finish()


if __name__ == "__main__":
    run_stage(main)

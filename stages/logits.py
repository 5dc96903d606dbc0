"""Stage `logits@<strategy>`: teacher forward over (primed prompt + its response); store the teacher signal."""

import os
import sys

sys.path.insert(0, os.path.dirname(os.path.dirname(os.path.abspath(__file__))))  # this checkout's `kd`
import kd.portable; kd.portable.apply()  # noqa: E402,E702 - compute.portable: ISA caps, before torch loads

import shutil
import time
from pathlib import Path

import click
from tqdm import tqdm

from kd import launch
from kd.cli_util import run_stage
from kd.environment import record_environment
from kd.io import atomic_path, read_json, read_jsonl
from kd.loading import load_model
from kd.names import stage_arg
from kd.params import load_params
from kd.seeding import seed_everything
from kd.teacher_signal import check_plain_head, check_responses, output_layer, tensor_sha256, write_signal


@click.command()
@click.argument("strategy")
def main(strategy):
    p = load_params()
    stage_arg("strategy", strategy, p["prompting"]["strategies"], "prompting.strategies")  # before any path use
    launch.relaunch(p["compute"]["processes"], __file__, [strategy])  # compute.processes > 1: accelerate launch
    rank, procs = launch.init()
    cfg, t = p["logits"], p["teacher"]
    responses = read_jsonl(f"data/teacher/{strategy}/responses.jsonl")
    check_responses(responses, None, f"data/teacher/{strategy}/responses.jsonl", strategy)
    if cfg["format"] == "hidden":
        check_plain_head(read_json("models/teacher/config.json"), "models/teacher")
    t0 = time.time()
    seed_everything(p["seed"])
    model = load_model("models/teacher", t["dtype"], t["trust_remote_code"], quantization=t["quantization"],
                       device=launch.device())
    name, weight = output_layer("models/teacher")
    meta = {"strategy": strategy, "dtype": t["dtype"], "hidden_size": model.config.hidden_size,
            "vocab_size": weight.shape[0], "top_k": cfg["top_k"] if cfg["format"] == "topk" else None,
            "output_layer": {"name": name, "shape": list(weight.shape), "sha256": tensor_sha256(weight)}}
    work = Path(".kd-work/logits") / strategy
    with tqdm(total=len(responses), desc=f"logits@{strategy}", unit="q", disable=rank > 0) as bar:
        if rank > 0:  # rank 0 merges every process's examples and writes the outputs
            write_signal(model, responses, cfg["format"], cfg["top_k"], cfg["shard_rows"], None, meta, work,
                         (rank, procs), launch.barrier, bar.update)
            return launch.finish()
        with atomic_path(f"data/logits/{strategy}") as tmp:
            tmp.mkdir()
            manifest = write_signal(model, responses, cfg["format"], cfg["top_k"], cfg["shard_rows"], tmp, meta,
                                    work, (rank, procs), launch.barrier, bar.update)
    shutil.rmtree(work, ignore_errors=True)
    max_diff = manifest["recompute_max_abs_diff"]
    record_environment(f"logits-{strategy}")  # environment/logits-<s>.json: the lineage beyond params + code
    rows = sum(e["rows"] for e in manifest["examples"])
    size = sum(f.stat().st_size for f in Path(f"data/logits/{strategy}").iterdir())
    print(f"logits@{strategy}: {len(responses)} examples, {rows} response tokens, format {cfg['format']}, "
          f"{size / 1e6:.1f} MB, recompute max |diff| {max_diff}, {time.time() - t0:.1f} s")
    launch.finish()


if __name__ == "__main__":
    run_stage(main)

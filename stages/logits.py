"""Stage `logits@<strategy>`: teacher forward over (primed prompt + its response); store the teacher signal."""

import kd.portable; kd.portable.apply()  # noqa: E702 - compute.portable: ISA caps, before torch loads

import time
from pathlib import Path

import click
from tqdm import tqdm

from kd.cli_util import run_stage
from kd.environment import record_environment
from kd.io import atomic_path, read_json, read_jsonl
from kd.loading import load_model
from kd.names import stage_arg
from kd.params import load_params
from kd.seeding import seed_everything
from kd.teacher_signal import SignalWriter, capture, check_plain_head, check_responses, output_layer, tensor_sha256


@click.command()
@click.argument("strategy")
def main(strategy):
    p = load_params()
    stage_arg("strategy", strategy, p["prompting"]["strategies"], "prompting.strategies")  # before any path use
    cfg, t = p["logits"], p["teacher"]
    responses = read_jsonl(f"data/teacher/{strategy}/responses.jsonl")
    check_responses(responses, None, f"data/teacher/{strategy}/responses.jsonl", strategy)
    if cfg["format"] == "hidden":
        check_plain_head(read_json("models/teacher/config.json"), "models/teacher")
    t0 = time.time()
    seed_everything(p["seed"])
    model = load_model("models/teacher", t["dtype"], t["trust_remote_code"], quantization=t["quantization"])
    name, weight = output_layer("models/teacher")
    meta = {"strategy": strategy, "dtype": t["dtype"], "hidden_size": model.config.hidden_size,
            "vocab_size": weight.shape[0], "top_k": cfg["top_k"] if cfg["format"] == "topk" else None,
            "output_layer": {"name": name, "shape": list(weight.shape), "sha256": tensor_sha256(weight)}}
    max_diff = 0.0
    with atomic_path(f"data/logits/{strategy}") as tmp:
        tmp.mkdir()
        writer = SignalWriter(tmp, cfg["format"], cfg["shard_rows"])
        for r in tqdm(sorted(responses, key=lambda r: r["id"]), desc=f"logits@{strategy}", unit="q"):
            # check the recomputation on the first example of every shard (a shard starts when it would overflow)
            first_of_shard = writer.pending_rows == 0 or writer.pending_rows + len(r["response_ids"]) > cfg["shard_rows"]
            tensors, diff = capture(model, r["prompt_ids"], r["response_ids"], cfg["format"], cfg["top_k"],
                                    check_logits=first_of_shard)
            if diff is not None:
                max_diff = max(max_diff, diff)
            writer.add(r["id"], r["response_ids"], tensors)
        # proof, on every shard's first example, that hidden @ W_out^T reproduces the model's logits
        manifest = writer.close({**meta, "recompute_max_abs_diff": max_diff})
    record_environment(f"logits-{strategy}")  # environment/logits-<s>.json: the lineage beyond params + code
    rows = sum(e["rows"] for e in manifest["examples"])
    size = sum(f.stat().st_size for f in Path(f"data/logits/{strategy}").iterdir())
    print(f"logits@{strategy}: {len(responses)} examples, {rows} response tokens, format {cfg['format']}, "
          f"{size / 1e6:.1f} MB, recompute max |diff| {max_diff}, {time.time() - t0:.1f} s")


if __name__ == "__main__":
    run_stage(main)

"""Stage `teacher@<strategy>`: the teacher answers every transfer question under one priming strategy."""

import kd.portable; kd.portable.apply()  # noqa: E702 - compute.portable: ISA caps, before torch loads

import hashlib
import json
import shutil
import time
from pathlib import Path

import click
from tqdm import tqdm

from kd.cli_util import run_stage
from kd.environment import record_environment
from kd.generate import run_generation
from kd.io import read_jsonl, sha256_file, write_json, write_jsonl
from kd.loading import load_model, load_tokenizer
from kd.params import load_params
from kd.names import stage_arg
from kd.prompting import check_context, load_strategies
from kd.seeding import seed_everything


@click.command()
@click.argument("strategy")
def main(strategy):
    p = load_params()
    stage_arg("strategy", strategy, p["prompting"]["strategies"], "prompting.strategies")  # before any path use
    template = load_strategies(p["prompting"]["file"])[strategy]
    rows = read_jsonl("data/prepared/transfer.jsonl")
    t = p["teacher"]
    model_dir = Path("models/teacher")
    fingerprint = hashlib.sha256(json.dumps(
        [template, p["prompting"]["instruction"], t, p["seed"], sha256_file(model_dir / "config.json"),
         sorted(sha256_file(f) for f in model_dir.glob("*.safetensors"))]).encode()).hexdigest()
    t0 = time.time()
    seed_everything(p["seed"])
    tok = load_tokenizer(model_dir, t["trust_remote_code"])
    only_this = {**p, "prompting": {**p["prompting"], "strategies": [strategy]}}
    check_context(only_this, ".", {"teacher": tok}, uses=("teacher",))  # before the weights load
    model = load_model(model_dir, t["dtype"], t["trust_remote_code"], quantization=t["quantization"])
    work = Path(".kd-work/teacher") / strategy
    with tqdm(total=len(rows), desc=f"teacher@{strategy}", unit="q") as bar:
        out = run_generation(model, tok, rows, template, p["prompting"]["instruction"], t["max_new_tokens"],
                             t["batch_size"], work, fingerprint, progress=bar.update)
    n = len(out)
    tokens = sum(len(r["response_ids"]) for r in out)
    metrics = {"n": n, "accuracy_strict": sum(r["correct_strict"] for r in out) / n,
               "accuracy_flexible": sum(r["correct_flexible"] for r in out) / n,
               "mean_response_tokens": tokens / n, "finished_fraction": sum(r["finished"] for r in out) / n}
    write_jsonl(f"data/teacher/{strategy}/responses.jsonl", out)
    write_json(f"metrics/teacher/{strategy}.json", metrics)
    record_environment(f"teacher-{strategy}")  # environment/teacher-<s>.json: the lineage beyond params + code
    shutil.rmtree(work, ignore_errors=True)
    dt = time.time() - t0
    print(f"teacher@{strategy}: {n} responses, {tokens} tokens, {tokens / dt:.1f} tok/s, {dt:.1f} s; "
          f"accuracy strict {metrics['accuracy_strict']:.3f} flexible {metrics['accuracy_flexible']:.3f}")


if __name__ == "__main__":
    run_stage(main)

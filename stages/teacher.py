"""Stage `teacher@<strategy>`: the teacher answers every transfer question under one priming strategy."""

import kd.core.portable; kd.core.portable.apply()  # noqa: E702 - compute.portable: ISA caps, before torch loads

import time
from pathlib import Path

import click
from tqdm import tqdm

from kd.config.params import load_params
from kd.core import launch
from kd.core.entry import run_stage
from kd.core.environment import record_environment
from kd.core.io import read_jsonl, remove_tree, write_json, write_jsonl
from kd.core.names import stage_arg
from kd.core.seeding import seed_everything
from kd.data.prompting import check_context, load_strategies
from kd.models.loading import load_model, load_tokenizer
from kd.teacher.responses import fingerprint, run_generation, summarize


@click.command()
@click.argument("strategy")
def main(strategy):
    p = load_params()
    stage_arg("strategy", strategy, p["prompting"]["strategies"], "prompting.strategies")  # before any path use
    launch.relaunch(p["compute"]["processes"], __spec__.name, [strategy])  # compute.processes > 1: accelerate launch
    rank, size = launch.init()
    template = load_strategies(p["prompting"]["file"])[strategy]
    instruction, t = p["prompting"]["instruction"], p["teacher"]
    rows = read_jsonl("data/prepared/transfer.jsonl")
    run_fp = fingerprint(template, instruction, {**t, "decode": p["compute"]["decode"]}, p["seed"], "models/teacher")
    t0 = time.time()
    seed_everything(p["seed"])
    tok = load_tokenizer("models/teacher", t["trust_remote_code"])
    only_this = {**p, "prompting": {**p["prompting"], "strategies": [strategy]}}
    check_context(only_this, ".", {"teacher": tok}, uses=("teacher",))  # before the weights load
    model = load_model("models/teacher", t["dtype"], t["trust_remote_code"], quantization=t["quantization"],
                       device=launch.device())
    work = Path(".kd-work/teacher") / strategy
    with tqdm(total=len(rows), desc=f"teacher@{strategy}", unit="answer", disable=rank > 0) as bar:
        tokens = [0]

        def progress(answers: int, n_tokens: int) -> None:  # as each answer finishes, not per chunk
            tokens[0] += n_tokens
            bar.update(answers)
            bar.set_postfix(tokens=tokens[0])
        out = run_generation(model, tok, rows, template, instruction, t["max_new_tokens"], t["batch_size"], work,
                             run_fp, progress=progress, shard=(rank, size), sync=launch.barrier,
                             invariant=p["compute"]["decode"] == "invariant")
    if rank > 0:  # rank 0 merged every process's responses and writes the outputs
        return launch.finish()
    metrics = summarize(out)
    write_jsonl(f"data/teacher/{strategy}/responses.jsonl", out)
    write_json(f"results/teacher/{strategy}.json", metrics)
    record_environment(f"teacher-{strategy}")  # environment/teacher-<s>.json: the lineage beyond params + code
    remove_tree(work)
    dt, tokens = time.time() - t0, metrics["mean_response_tokens"] * metrics["n"]
    print(f"teacher@{strategy}: {metrics['n']} responses, {tokens:.0f} tokens, {tokens / dt:.1f} tok/s, {dt:.1f} s; "
          f"accuracy strict {metrics['accuracy_strict']:.3f} flexible {metrics['accuracy_flexible']:.3f}")
    launch.finish()


if __name__ == "__main__":
    run_stage(main)

"""Stage `teacher@<strategy>`: the teacher answers every transfer question under one priming strategy."""

import kd.core.portable; kd.core.portable.apply()  # noqa: E702 - compute.portable: ISA caps, before torch loads

from pathlib import Path

import click
from tqdm import tqdm

from kd.core import launch
from kd.core.entry import run_stage
from kd.core.io import read_jsonl, remove_tree, write_json, write_jsonl
from kd.data.prompting import check_context, load_strategies
from kd.harness.stage import Stage
from kd.models.loading import load_model, load_tokenizer
from kd.teacher.responses import Generation, run_generation, summarize


@click.command()
@click.argument("strategy")
def main(strategy):
    st = Stage("teacher", strategy)
    c, t = st.c, st.c.teacher
    rank, _ = st.launch(c.compute.processes)
    gen = Generation.of(c, load_strategies(c.prompting.file)[strategy], work=Path(".kd-work/teacher") / strategy)
    rows = read_jsonl("data/prepared/transfer.jsonl")
    st.seed()
    tok = load_tokenizer("models/teacher", t.trust_remote_code)
    only_this = c.model_copy(update={"prompting": c.prompting.model_copy(update={"strategies": [strategy]})})
    check_context(only_this, ".", {"teacher": tok}, uses=("teacher",))  # before the weights load
    model = load_model("models/teacher", t.dtype, t.trust_remote_code, quantization=t.quantization,
                       device=launch.device())
    with tqdm(total=len(rows), desc=st.label, unit="answer", disable=rank > 0) as bar:
        tokens = [0]

        def progress(answers: int, n_tokens: int) -> None:  # as each answer finishes, not per chunk
            tokens[0] += n_tokens
            bar.update(answers)
            bar.set_postfix(tokens=tokens[0])
        out = run_generation(model, tok, rows, gen, progress=progress, shard=(rank, st.procs))
    if rank == 0:  # rank 0 merged every process's responses and writes the outputs
        metrics = summarize(out)
        write_jsonl(f"data/teacher/{strategy}/responses.jsonl", out)
        write_json(f"results/teacher/{strategy}.json", metrics)
        remove_tree(gen.work)
        tokens = metrics["mean_response_tokens"] * metrics["n"]
        summary = (f"{metrics['n']} responses, {tokens:.0f} tokens, {tokens / st.seconds:.1f} tok/s; accuracy strict "
                   f"{metrics['accuracy_strict']:.3f} flexible {metrics['accuracy_flexible']:.3f}")
    st.finish(summary if rank == 0 else None)


if __name__ == "__main__":
    run_stage(main)

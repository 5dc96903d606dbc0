"""Stage `logits@<strategy>`: teacher forward over (primed prompt + its response); store the teacher signal."""

import kd.core.portable; kd.core.portable.apply()  # noqa: E702 - compute.portable: ISA caps, before torch loads

from pathlib import Path

import click

from kd.core import launch
from kd.core.entry import run_stage
from kd.core.io import read_json, read_jsonl
from kd.harness.stage import Stage
from kd.models.loading import load_model
from kd.teacher.signal import SignalJob, check_plain_head, record_signal
from kd.teacher.signal_reader import check_responses


@click.command()
@click.argument("strategy")
def main(strategy):
    st = Stage("logits", strategy)
    c, t = st.c, st.c.teacher
    rank, procs = st.launch(c.compute.processes)
    responses = read_jsonl(f"data/teacher/{strategy}/responses.jsonl")
    check_responses(responses, None, f"data/teacher/{strategy}/responses.jsonl", strategy)
    if c.logits.format == "hidden":
        check_plain_head(read_json("models/teacher/config.json"), "models/teacher")
    st.seed()
    model = load_model("models/teacher", t.dtype, t.trust_remote_code, quantization=t.quantization,
                       device=launch.device())
    job = SignalJob(c.logits, Path(f"data/logits/{strategy}"), Path(".kd-work/logits") / strategy,
                    {"strategy": strategy, "dtype": t.dtype})
    done = record_signal(model, "models/teacher", responses, job, (rank, procs), desc=st.label)
    summary = None
    if done is not None:  # rank 0 wrote the outputs
        manifest, max_diff = done
        rows = sum(e["rows"] for e in manifest["examples"])
        size = sum(f.stat().st_size for f in job.out.iterdir())
        summary = (f"{len(responses)} examples, {rows} response tokens, format {c.logits.format}, {size / 1e6:.1f} "
                   f"MB, recompute max |diff| {max_diff}")
    st.finish(summary)


if __name__ == "__main__":
    run_stage(main)

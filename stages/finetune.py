"""Stage `finetune`: the fine-tune control, the KD arms minus the teacher. Its run is the KD arms' with the teacher
term's settings removed (kd.train.run.StudentRun.of(p, control=True): optimizer, lr, schedule, batch, LoRA, ... all
shared) and it trains on the same transfer questions in the same seeded order, with the KD arms' loss alpha * CE(gold
solution) and no teacher term: same CE weight, same dropout masks on the gold pass (kd/train/distill.py). A
KD-vs-control difference is then the teacher term's contribution alone (under `distill.hard_target: gold`, the default
and the paper's; docs/science.md)."""

import kd.core.portable; kd.core.portable.apply()  # noqa: E702 - compute.portable: ISA caps, before torch loads

import click

from kd.core.entry import run_stage
from kd.core.io import read_jsonl
from kd.harness.stage import Stage
from kd.models.loading import load_tokenizer
from kd.train.examples import build_gold_examples
from kd.train.run import StudentRun, fingerprint, run_training, weights_digest


@click.command()
def main():
    st = Stage("finetune")
    run = StudentRun.of(st.c, control=True)
    questions = read_jsonl("data/prepared/transfer.jsonl")
    run_fp = fingerprint("finetune", run.cfg, run.alpha, run.seed, run.instruction, [q["id"] for q in questions],
                         weights_digest("models/student"))
    st.seed()
    tok = load_tokenizer("models/student", run.student.trust_remote_code)
    examples, skipped = build_gold_examples(questions, tok, run.instruction, run.cfg.max_length)
    model = run.model()
    # no teacher: the loss is alpha * CE on the gold solutions (the KD arms' CE term, at the KD arms' weight)
    run_training(run, "finetune", model, examples, lambda i: None, run_fp,
                 extra={"skipped": len(skipped), "hard_target": "gold"}, validate=run.validation(tok))
    st.finish()  # run_training printed its line


if __name__ == "__main__":
    run_stage(main)

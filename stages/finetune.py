"""Stage `finetune`: the fine-tune control, the KD arms minus the teacher. Its settings are derived from `distill.*`
(kd.train.run.control_config: optimizer, lr, schedule, batch, LoRA, ... all shared) and it trains on the same transfer
questions in the same seeded order, with the KD arms' loss alpha * CE(gold solution) and no teacher term: same CE
weight, same dropout masks on the gold pass (kd/train/distill.py). A KD-vs-control difference is then the teacher term's
contribution alone (under `distill.hard_target: gold`, the default and the paper's; docs/science.md)."""

import kd.core.portable; kd.core.portable.apply()  # noqa: E702 - compute.portable: ISA caps, before torch loads

import click

from kd.config.params import load_params
from kd.core.entry import run_stage
from kd.core.environment import record_environment
from kd.core.io import read_jsonl
from kd.core.seeding import seed_everything
from kd.models.loading import load_tokenizer
from kd.train.distill import build_gold_examples
from kd.train.run import control_config, fingerprint, lora_student, run_training, validation, weights_digest


@click.command()
def main():
    p = load_params()
    s = p["student"]
    cfg = control_config(p["distill"])
    questions = read_jsonl("data/prepared/transfer.jsonl")
    run_fp = fingerprint("finetune", cfg, p["alpha"], p["seed"], p["prompting"]["instruction"],
                         [q["id"] for q in questions], weights_digest("models/student"))
    seed_everything(p["seed"])
    tok = load_tokenizer("models/student", s["trust_remote_code"])
    examples, skipped = build_gold_examples(questions, tok, p["prompting"]["instruction"], cfg["max_length"])
    model = lora_student("models/student", s["dtype"], s["trust_remote_code"], cfg["lora"], p["seed"],
                         quantization=s["quantization"])
    # no teacher: the loss is alpha * CE on the gold solutions (the KD arms' CE term, at the KD arms' weight)
    run_training("finetune", model, examples, lambda i: None, cfg, p["alpha"], p["temperature"], p["seed"], run_fp,
                 adapter_dir="models/finetune", curves_dir="reports/distill/finetune",
                 metrics_path="results/distill/finetune.json", work_dir=".kd-work/finetune",
                 extra={"skipped": len(skipped), "hard_target": "gold"},
                 validate=validation(".", tok, p["prompting"]["instruction"], cfg["max_length"]))
    record_environment("finetune")  # environment/finetune.json: the lineage beyond params + code


if __name__ == "__main__":
    run_stage(main)

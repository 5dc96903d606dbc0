"""Stage `finetune`: the fine-tune control. The same LoRA, schedule and transfer questions as distill@<strategy>,
trained with cross-entropy on GSM8K's gold solutions only (no teacher). It separates "the teacher helped" from
"training on GSM8K-style text helped"."""

import kd.portable; kd.portable.apply()  # noqa: E702 - compute.portable: ISA caps, before torch loads

import click

from kd.cli_util import run_stage
from kd.distill import build_gold_examples
from kd.environment import record_environment
from kd.io import read_jsonl
from kd.loading import load_tokenizer
from kd.params import load_params
from kd.seeding import seed_everything
from kd.trainer import fingerprint, lora_student, run_training, weights_digest

# the distill.* keys the control shares with the KD arms (everything but the loss and target choices)
SHARED = ("epochs", "lr", "momentum", "weight_decay", "max_length", "kd_chunk", "checkpoint_every", "lora")


@click.command()
def main():
    p = load_params()
    s = p["student"]
    cfg = {**{k: p["distill"][k] for k in SHARED}, "loss": "reverse_kl", "hard_target": "teacher"}  # CE on own targets
    questions = read_jsonl("data/prepared/transfer.jsonl")
    run_fp = fingerprint("finetune", cfg, p["seed"], p["prompting"]["instruction"],
                         [q["id"] for q in questions], weights_digest("models/student"))
    seed_everything(p["seed"])
    tok = load_tokenizer("models/student", s["trust_remote_code"])
    examples, skipped = build_gold_examples(questions, tok, p["prompting"]["instruction"], cfg["max_length"])
    model = lora_student("models/student", s["dtype"], s["trust_remote_code"], cfg["lora"], p["seed"],
                         quantization=s["quantization"])
    # alpha = 1: the loss is the cross-entropy alone; no teacher signal is read
    run_training("finetune", model, examples, lambda i: None, cfg, 1.0, 1.0, p["seed"], run_fp,
                 adapter_dir="models/finetune", curves_dir="reports/distill/finetune",
                 metrics_path="results/distill/finetune.json", work_dir=".kd-work/finetune",
                 extra={"skipped": len(skipped), "hard_target": "gold"})
    record_environment("finetune")  # environment/finetune.json: the lineage beyond params + code


if __name__ == "__main__":
    run_stage(main)

"""Stage `distill@<strategy>`: LoRA-train the student on the teacher's responses (no priming prefix)."""

import kd.portable; kd.portable.apply()  # noqa: E702 - compute.portable: ISA caps, before torch loads

import click

from kd.cli_util import run_stage
from kd.distill import build_examples, select_responses
from kd.environment import record_environment
from kd.io import read_jsonl, sha256_file
from kd.loading import load_tokenizer
from kd.names import stage_arg
from kd.params import load_params
from kd.prompting import check_context
from kd.seeding import seed_everything
from kd.teacher_signal import TeacherSignal
from kd.trainer import fingerprint, lora_student, run_training, weights_digest
from kd.vocab import check_same_vocab


@click.command()
@click.argument("strategy")
def main(strategy):
    p = load_params()
    stage_arg("strategy", strategy, p["prompting"]["strategies"], "prompting.strategies")  # before any path use
    cfg, s = p["distill"], p["student"]
    responses = read_jsonl(f"data/teacher/{strategy}/responses.jsonl")
    questions = {r["id"]: r for r in read_jsonl("data/prepared/transfer.jsonl")}
    # every artefact check runs before the student loads
    signal = TeacherSignal(f"data/logits/{strategy}", responses, "models/teacher", transfer_ids=list(questions))
    vocab = check_same_vocab("models/teacher", "models/student", s["trust_remote_code"])
    kept = select_responses(responses, cfg["response_filter"])
    run_fp = fingerprint(cfg, p["alpha"], p["temperature"], p["seed"], p["prompting"]["instruction"],
                         sha256_file(f"data/logits/{strategy}/manifest.json"),
                         sha256_file(f"data/teacher/{strategy}/responses.jsonl"), weights_digest("models/student"))
    seed_everything(p["seed"])
    tok = load_tokenizer("models/student", s["trust_remote_code"])
    check_context(p, ".", {"student": tok}, uses=("distill",))  # before the weights load
    examples, skipped = build_examples(kept, questions, tok, p["prompting"]["instruction"], cfg["max_length"],
                                       cfg["hard_target"])
    model = lora_student("models/student", s["dtype"], s["trust_remote_code"], cfg["lora"], p["seed"])
    run_training(f"distill@{strategy}", model, examples, lambda i: (lambda a, b: signal.logits(i, a, b)), cfg,
                 p["alpha"], p["temperature"], p["seed"], run_fp, adapter_dir=f"models/kd-{strategy}",
                 curves_dir=f"reports/distill/{strategy}", metrics_path=f"metrics/distill/{strategy}.json",
                 work_dir=f".kd-work/distill/{strategy}", width=vocab["kd_width"],
                 extra={"skipped": len(skipped), "filtered_out": len(responses) - len(kept),
                        "response_filter": cfg["response_filter"], "hard_target": cfg["hard_target"],
                        "kd_width": vocab["kd_width"]})
    record_environment(f"distill-{strategy}")  # environment/distill-<s>.json: the lineage beyond params + code


if __name__ == "__main__":
    run_stage(main)

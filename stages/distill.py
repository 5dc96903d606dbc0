"""Stage `distill@<strategy>`: LoRA-train the student on the teacher's responses (no priming prefix)."""

import os
import sys

sys.path.insert(0, os.path.dirname(os.path.dirname(os.path.abspath(__file__))))  # this checkout's `kd`
import kd.portable; kd.portable.apply()  # noqa: E402,E702 - compute.portable: ISA caps, before torch loads

import hashlib
import json
import shutil
import time
from pathlib import Path

import click
from tqdm import tqdm

from kd.cli_util import run_stage
from kd.distill import Checkpoint, build_examples, summarise, train
from kd.environment import record_environment
from kd.errors import KdError
from kd.io import atomic_path, read_jsonl, sha256_file, write_json
from kd.loading import load_model, load_tokenizer
from kd.models import check_same_vocab
from kd.params import load_params
from kd.seeding import seed_everything
from kd.teacher_signal import TeacherSignal


@click.command()
@click.argument("strategy")
def main(strategy):
    p = load_params()
    cfg, s = p["distill"], p["student"]
    responses = read_jsonl(f"data/teacher/{strategy}/responses.jsonl")
    questions = {r["id"]: r for r in read_jsonl("data/prepared/transfer.jsonl")}
    # every artefact check runs before the student loads
    signal = TeacherSignal(f"data/logits/{strategy}", responses, "models/teacher")
    vocab = check_same_vocab("models/teacher", "models/student", s["trust_remote_code"])
    fingerprint = hashlib.sha256(json.dumps(
        [cfg, p["alpha"], p["temperature"], p["seed"], p["prompting"]["instruction"],
         sha256_file(f"data/logits/{strategy}/manifest.json"),
         sha256_file(f"data/teacher/{strategy}/responses.jsonl"),
         sorted(sha256_file(f) for f in Path("models/student").glob("*.safetensors"))]).encode()).hexdigest()

    t0 = time.time()
    seed_everything(p["seed"])
    tok = load_tokenizer("models/student", s["trust_remote_code"])
    examples, skipped = build_examples(responses, questions, tok, p["prompting"]["instruction"],
                                       cfg["max_length"], cfg["hard_target"])
    if not examples:
        raise KdError(f"distill: no example fits distill.max_length={cfg['max_length']}")
    model = load_model("models/student", s["dtype"], s["trust_remote_code"])
    from peft import LoraConfig, get_peft_model

    lora = cfg["lora"]
    torch_seed = p["seed"]
    import torch

    torch.manual_seed(torch_seed)  # LoRA A matrices are drawn from the global generator
    model = get_peft_model(model, LoraConfig(r=lora["r"], lora_alpha=lora["alpha"], lora_dropout=lora["dropout"],
                                             target_modules=lora["target_modules"], task_type="CAUSAL_LM"))
    from dvclive import Live

    live_dir = Path(f"reports/distill/{strategy}")
    shutil.rmtree(live_dir, ignore_errors=True)
    total = cfg["epochs"] * len(examples)
    with Live(str(live_dir), save_dvc_exp=False, dvcyaml=None) as live, \
            tqdm(total=total, desc=f"distill@{strategy}", unit="step") as bar:
        def on_step(step, rec):
            for key in ("loss", "ce", "kd", "lr"):
                live.log_metric(f"train/{key}", rec[key])
            live.next_step()
            bar.update(1)
            bar.set_postfix(loss=f"{rec['loss']:.4f}")

        work = Path(".kd-work/distill") / strategy
        history = train(model, examples, lambda i: (lambda a, b: signal.logits(i, a, b)), cfg, p["alpha"],
                        p["temperature"], p["seed"], Checkpoint(work / "checkpoint.safetensors", fingerprint),
                        cfg["checkpoint_every"], on_step, width=vocab["kd_width"])
    for c in model.peft_config.values():  # peft keeps target_modules as a set: saved order follows PYTHONHASHSEED
        if isinstance(c.target_modules, (set, frozenset)):
            c.target_modules = sorted(c.target_modules)
    with atomic_path(f"models/kd-{strategy}") as tmp:
        model.save_pretrained(str(tmp), safe_serialization=True)
    summary = {**summarise(history, len(examples), cfg["epochs"]), "skipped": len(skipped),
               "response_tokens": sum(e.response_len for e in examples), "kd_width": vocab["kd_width"],
               "trainable_params": sum(q.numel() for q in model.parameters() if q.requires_grad)}
    write_json(f"metrics/distill/{strategy}.json", summary)
    record_environment(f"distill-{strategy}")  # environment/distill-<s>.json: the lineage beyond params + code
    shutil.rmtree(work, ignore_errors=True)
    print(f"distill@{strategy}: {summary['steps']} steps over {len(examples)} examples "
          f"({summary['response_tokens']} response tokens, {len(skipped)} skipped), final loss "
          f"{summary['final_loss']:.4f} (ce {summary['final_ce']:.4f}, kd {summary['final_kd']:.5f}), "
          f"{time.time() - t0:.1f} s")


if __name__ == "__main__":
    run_stage(main)

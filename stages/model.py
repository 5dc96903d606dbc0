"""Stage `model@<role>`: materialise params `<role>.model` into models/<role> (bf16 safetensors + tokenizer +
chat template) plus models/<role>/kd_model.json (a byte-stable summary: no wall-clock times in it)."""

import os
import sys
import time

sys.path.insert(0, os.path.dirname(os.path.dirname(os.path.abspath(__file__))))  # `kd` without installing

import click  # noqa: E402

from kd.cli_util import run_stage  # noqa: E402
from kd.materialise import materialise  # noqa: E402
from kd.models import validate_spec  # noqa: E402
from kd.params import load_params  # noqa: E402


@click.command()
@click.argument("role", type=click.Choice(["teacher", "student"]))
def main(role):
    p = load_params()
    cfg = p[role]
    validate_spec(cfg["model"], key=f"{role}.model")
    out = f"models/{role}"
    t0 = time.time()
    summary = materialise(cfg["model"], out, dtype=cfg["dtype"], trust_remote_code=cfg["trust_remote_code"],
                          manifest="kd_model.json")
    print(f"model@{role}: {cfg['model']} -> {out}/ ({time.time() - t0:.1f} s; kd_model.json written)")
    return summary


if __name__ == "__main__":
    run_stage(main)

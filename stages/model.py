"""Stage `model@<role>`: materialise params `<role>.model` into models/<role> (bf16 safetensors + tokenizer +
chat template) plus models/<role>/kd_model.json (a byte-stable summary: no wall-clock times in it)."""

import time

import click

from kd.config.params import load_params
from kd.core.entry import run_stage
from kd.models.materialise import materialise
from kd.models.registry import validate_spec


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

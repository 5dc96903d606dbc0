"""Stage `model@<role>`: materialise params `<role>.model` into models/<role> (bf16 safetensors + tokenizer +
chat template) plus models/<role>/kd_model.json (a byte-stable summary: no wall-clock times in it)."""

import click

from kd.core.entry import run_stage
from kd.harness.stage import Stage
from kd.models.materialise import materialise


@click.command()
@click.argument("role", type=click.Choice(["teacher", "student"]))
def main(role):
    st = Stage("model", role, kind="role", allowed=lambda c: ["teacher", "student"], key="role")
    m = getattr(st.c, role)
    out = f"models/{role}"
    materialise(m.model, out, dtype=m.dtype, trust_remote_code=m.trust_remote_code, manifest="kd_model.json")
    st.finish(f"{m.model} -> {out}/ (kd_model.json written)", environment=False)


if __name__ == "__main__":
    run_stage(main)

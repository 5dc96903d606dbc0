"""Stages `attention_*`: per-layer attention statistics of one student arm (kd/config/arms.py), exactly as evaluated
(adapter unmerged), over the first report.attention_prompts eval questions -> reports/attention/<arm>.json."""

import kd.core.portable; kd.core.portable.apply()  # noqa: E702 - compute.portable: ISA caps, before torch loads

import click

from kd.config.arms import student_arms
from kd.core.entry import run_stage
from kd.core.io import write_json
from kd.core.paths import ATTENTION_DIR
from kd.eval.attention import arm_attention
from kd.harness.stage import Stage


@click.command()
@click.argument("arm")
def main(arm):
    st = Stage("attention", arm, kind="arm", allowed=lambda c: student_arms(c.prompting.strategies), key="arm")
    c = st.c
    st.seed()
    rows = arm_attention(arm, c.prompting.strategies, c.report.attention_prompts, c.prompting.instruction,
                         dtype=c.student.dtype, trust_remote_code=c.student.trust_remote_code)
    write_json(ATTENTION_DIR / f"{arm}.json", [{"model": arm, **r} for r in rows])  # one line per arm in `dvc plots`
    st.finish(f"{len(rows)} layers over {c.report.attention_prompts} prompts")


if __name__ == "__main__":
    run_stage(main)

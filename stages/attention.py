"""Stages `attention_*`: per-layer attention statistics of one student arm (kd/config/arms.py), exactly as evaluated
(adapter unmerged), over the first report.attention_prompts eval questions -> reports/attention/<arm>.json."""

import kd.core.portable; kd.core.portable.apply()  # noqa: E702 - compute.portable: ISA caps, before torch loads

import time

import click

from kd.config.arms import student_arms
from kd.config.params import load_config
from kd.core.entry import run_stage
from kd.core.environment import record_environment
from kd.core.io import write_json
from kd.core.names import stage_arg
from kd.core.paths import ATTENTION_DIR
from kd.core.seeding import seed_everything
from kd.eval.attention import arm_attention


@click.command()
@click.argument("arm")
def main(arm):
    c = load_config()
    strategies = c.prompting.strategies
    stage_arg("arm", arm, student_arms(strategies), "arm")  # before any path use
    t0 = time.time()
    seed_everything(c.seed)
    rows = arm_attention(arm, strategies, c.report.attention_prompts, c.prompting.instruction,
                         dtype=c.student.dtype, trust_remote_code=c.student.trust_remote_code)
    write_json(ATTENTION_DIR / f"{arm}.json", [{"model": arm, **r} for r in rows])  # one line per arm in `dvc plots`
    record_environment(f"attention-{arm}")  # environment/attention-<arm>.json: the lineage beyond params + code
    print(f"attention@{arm}: {len(rows)} layers over {c.report.attention_prompts} prompts "
          f"({time.time() - t0:.1f} s)")


if __name__ == "__main__":
    run_stage(main)

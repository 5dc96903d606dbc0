"""Stage `report`: results table, the three families of paired tests (kd-<s> vs kd-none, kd-* vs finetune, trained
arms vs the base student), the attention stages' statistics -> reports/index.{md,html}, reports/plots/,
reports/attention.json, reports/comparisons.json, metrics/{compare,strict,flexible}/ (the headline). Reads outputs
only: no model is loaded."""

import click

from kd.core.entry import run_stage
from kd.core.environment import write_headline
from kd.harness.stage import Stage
from kd.report.page import read_attention, trained_arms, write_report
from kd.train.curves import write_curves


@click.command()
def main():
    st = Stage("report")
    strategies = st.c.prompting.strategies
    rows = read_attention(strategies)
    m = write_report(st.c, rows)
    write_curves(trained_arms(strategies))  # reports/curves/: one chart per quantity, arms overlaid
    write_headline()  # metrics/environment.json from environment/*.json: `dvc metrics diff` shows another machine
    st.finish(f"reports/index.md, {len(rows)} attention rows, best arm: {m['best_arm']}", environment=False)


if __name__ == "__main__":
    run_stage(main)

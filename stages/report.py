"""Stage `report`: results table, the three families of paired tests (kd-<s> vs kd-none, kd-* vs finetune, trained
arms vs the base student), the attention stages' statistics -> reports/index.{md,html}, reports/plots/,
reports/attention.json, reports/comparisons.json, metrics/{compare,strict,flexible}/ (the headline). Reads outputs
only: no model is loaded."""

import time

import click

from kd.config.params import load_params
from kd.core.entry import run_stage
from kd.core.environment import write_headline
from kd.report.page import read_attention, trained_arms, write_report
from kd.train.curves import write_curves


@click.command()
def main():
    p = load_params()
    t0 = time.time()
    rows = read_attention(p["prompting"]["strategies"])
    m = write_report(p, rows)
    write_curves(trained_arms(p["prompting"]["strategies"]))  # reports/curves/: one chart per quantity, arms overlaid
    write_headline()  # metrics/environment.json from environment/*.json: `dvc metrics diff` shows another machine
    print(f"report: reports/index.md, {len(rows)} attention rows, best arm: {m['best_arm']} "
          f"({time.time() - t0:.1f} s)")


if __name__ == "__main__":
    run_stage(main)

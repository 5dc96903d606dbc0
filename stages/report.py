"""Stage `report`: results table, paired tests, attention summary -> reports/index.{md,html}, reports/plots/,
reports/attention.json, metrics/report.json."""

import time

import click

from kd.cli_util import run_stage
from kd.params import load_params


@click.command()
@click.option("--no-attention", is_flag=True, help="Skip the attention summary (no model is loaded).")
def main(no_attention):
    from kd.attention import attention_rows
    from kd.report import write_report
    from kd.seeding import seed_everything

    p = load_params()
    t0 = time.time()
    seed_everything(p["seed"])
    rows = [] if no_attention else attention_rows(p)
    m = write_report(p, rows)
    from kd.environment import write_headline

    write_headline()  # metrics/environment.json from environment/*.json: `dvc metrics diff` shows another machine
    print(f"report: reports/index.md, {len(rows)} attention rows, best arm: {m['best_arm']} "
          f"({time.time() - t0:.1f} s)")


if __name__ == "__main__":
    run_stage(main)

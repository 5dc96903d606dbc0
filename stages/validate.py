"""Stage `validate`: every param, the prompting file and the project's output/work/lock locations, checked before DVC
deletes any other stage's outputs. Every stage depends on its output, so `dvc repro` and `dvc exp run -S key=value`
run it first: a refused value stops the run with one line naming the key, and nothing has been deleted.

Its output, params.valid, holds fixed text: the same bytes whatever the (valid) params are, so a change re-runs only
the stages that use the changed key. It is `persist: true`, so DVC never deletes it before running this stage."""

import click

from kd.config.params import load_config
from kd.core.entry import run_stage
from kd.core.guard import VALIDATED, check_layout
from kd.core.io import write_text

TEXT = ("params.yaml and the prompting file passed kd-prime's checks (stages/validate.py). Every stage depends on this\n"
        "file so that DVC runs the checks before it deletes any output; its bytes never change.\n")


@click.command()
def main():
    load_config("params.yaml")
    check_layout(".")
    if not VALIDATED.is_file() or VALIDATED.is_symlink() or VALIDATED.read_text(encoding="utf-8") != TEXT:
        write_text(VALIDATED, TEXT)


if __name__ == "__main__":
    run_stage(main)

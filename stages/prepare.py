"""Stage `prepare`: GSM8K -> data/prepared/{transfer,validation,eval}.jsonl + summary.json."""

import click

from kd.core.entry import run_stage
from kd.core.io import write_json, write_jsonl
from kd.data.gsm8k import load_source, make_splits
from kd.harness.stage import Stage


@click.command()
def main():
    st = Stage("prepare")
    c, cfg, out = st.c, st.c.prepare, "data/prepared"
    splits, note = make_splits(load_source(cfg.source), cfg.transfer_size, cfg.validation_size, cfg.eval_size,
                               c.seed, cfg.source)
    for name, rows in splits.items():
        write_jsonl(f"{out}/{name}.jsonl", rows)
    write_json(f"{out}/summary.json", {"source": cfg.source, "note": note, "seed": c.seed,
                                       **{name: len(rows) for name, rows in splits.items()}})
    st.finish(f"{cfg.source}: " + ", ".join(f"{k} {len(v)}" for k, v in splits.items()) + f"\n  {note}",
              environment=False)


if __name__ == "__main__":
    run_stage(main)

"""Training curves for `dvc plots`: one file per quantity with every trained arm in it, so each chart overlays the
arms (DVC's default would draw one chart per file and arm). Read from the curves dvclive wrote under
reports/distill/<run>/plots/metrics/ (kd/train/run.py), written to reports/curves/<quantity>.json as rows
{arm, step, value}; the top-level `plots:` of dvc.yaml draws them with .dvc/plots/curves.json (colour = arm).

- `loss`, `ce`: every trained arm; `kd`: the KD arms only (the control has no teacher term: a flat zero says nothing);
- `val_gold_nll`: every trained arm, at the steps it was measured (0 = before training; distill.val_every);
- `lr`: once, from the first arm (every arm shares the schedule: kd.train.run.control_config)."""

from __future__ import annotations

import csv
from pathlib import Path

from kd.core.io import write_json

QUANTITIES = {"loss": "train/loss", "ce": "train/ce", "kd": "train/kd", "val_gold_nll": "val/gold_nll",
              "lr": "train/lr"}


def run_dir(arm: str) -> str:
    """An arm's training run folder under reports/distill/ (kd.config.arms.run_name)."""
    from kd.config.arms import run_name

    return run_name(arm)


def _read(path: Path) -> list[tuple[int, float]]:
    if not path.is_file():
        return []
    with path.open(encoding="utf-8", newline="") as f:
        rows = list(csv.reader(f, delimiter="\t"))
    return [(int(r[0]), float(r[1])) for r in rows[1:] if len(r) == 2]


def curve_rows(arms: list[str], root: str | Path = ".") -> dict[str, list[dict]]:
    """quantity -> rows {arm, step, value}, arms in the given order, steps ascending."""
    root = Path(root)
    out: dict[str, list[dict]] = {}
    for q, key in QUANTITIES.items():
        chosen = [a for a in arms if a != "finetune"] if q == "kd" else arms[:1] if q == "lr" else arms
        out[q] = [{"arm": a, "step": s, "value": v} for a in chosen
                  for s, v in _read(root / "reports/distill" / run_dir(a) / "plots/metrics" / f"{key}.tsv")]
    return out


def write_curves(arms: list[str], root: str | Path = ".") -> None:
    root = Path(root)
    for q, rows in curve_rows(arms, root).items():
        write_json(root / "reports/curves" / f"{q}.json", rows)

"""kd/train/curves.py: one file per training quantity with every arm in it (one chart per quantity, arms overlaid)."""

from kd.core.io import read_json
from kd.train.curves import curve_rows, write_curves


def _tsv(path, name, rows):
    path.parent.mkdir(parents=True, exist_ok=True)
    path.write_text("step\t" + name + "\n" + "".join(f"{s}\t{v}\n" for s, v in rows))


def test_every_arm_in_one_file_per_quantity(tmp_path):
    for run, arm_loss in (("none", 2.0), ("teacher", 3.0), ("finetune", 1.0)):
        base = tmp_path / "reports/distill" / run / "plots/metrics"
        _tsv(base / "train/loss.tsv", "loss", [(1, arm_loss), (2, arm_loss - 0.5)])
        _tsv(base / "train/kd.tsv", "kd", [(1, 0.1), (2, 0.05)] if run != "finetune" else [(1, 0.0), (2, 0.0)])
        _tsv(base / "train/lr.tsv", "lr", [(1, 1e-3), (2, 5e-4)])
        _tsv(base / "val/gold_nll.tsv", "gold_nll", [(0, 4.0), (2, 3.5)])
    arms = ["finetune", "kd-none", "kd-teacher"]
    rows = curve_rows(arms, tmp_path)
    assert [(r["arm"], r["step"], r["value"]) for r in rows["loss"]] == [
        ("finetune", 1, 1.0), ("finetune", 2, 0.5), ("kd-none", 1, 2.0), ("kd-none", 2, 1.5),
        ("kd-teacher", 1, 3.0), ("kd-teacher", 2, 2.5)]
    assert {r["arm"] for r in rows["kd"]} == {"kd-none", "kd-teacher"}  # the control's flat zero is left out
    assert {r["arm"] for r in rows["lr"]} == {"finetune"} and len(rows["lr"]) == 2  # the shared schedule, once
    assert [r["step"] for r in rows["val_gold_nll"] if r["arm"] == "kd-none"] == [0, 2]
    assert rows["ce"] == []  # a quantity no run wrote: an empty chart, not an error
    write_curves(arms, tmp_path)
    assert read_json(tmp_path / "reports/curves/loss.json") == rows["loss"]

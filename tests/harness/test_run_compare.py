"""kd.harness.run_compare: two runs compared stage by stage (naming the first difference), exact vs --tolerance."""

from __future__ import annotations

import json
from pathlib import Path

import yaml

from kd.harness.run_compare import compare_locks, compare_metrics, compare_projects, values_match
from kd.harness.verify import Verdict, render

# ------------------------------------------------------------------------------------------------ comparison


def _lock(**outs) -> dict:
    return {stage: {"cmd": "x", "outs": [{"path": p, "md5": h} for p, h in o]} for stage, o in outs.items()}


def test_identical_locks():
    a = _lock(prepare=[("data/prepared", "1.dir")], report=[("reports/index.md", "2")])
    rows = compare_locks(a, json.loads(json.dumps(a)))
    assert [r.stage for r in rows] == ["prepare", "report"] and all(r.identical for r in rows)


def test_differing_output_and_missing_stage_are_named(tmp_path):
    a = _lock(prepare=[("data/prepared", "1.dir")], distill=[("models/kd-none", "2.dir"), ("m.json", "3")])
    b = _lock(prepare=[("data/prepared", "1.dir")], distill=[("models/kd-none", "9.dir"), ("m.json", "3")],
              extra=[("x", "4")])
    for root, text in ((tmp_path / "a", '["q_proj", "o_proj"]'), (tmp_path / "b", '["o_proj", "q_proj"]')):
        (root / "models/kd-none").mkdir(parents=True)
        (root / "models/kd-none/adapter_model.safetensors").write_bytes(b"same")
        (root / "models/kd-none/adapter_config.json").write_text(text)
    rows = {r.stage: r for r in compare_locks(a, b, tmp_path / "a", tmp_path / "b")}
    assert rows["prepare"].identical
    # a differing folder is opened: the first differing file inside it is named
    assert rows["distill"].differing == ["models/kd-none/adapter_config.json"]
    assert not rows["extra"].identical and "only in run B" in rows["extra"].differing[0]


def _project(root: Path, lock: dict, metrics: dict[str, dict]) -> Path:
    root.mkdir(parents=True)
    (root / "dvc.lock").write_text(yaml.safe_dump({"schema": "2.0", "stages": lock}))
    for name, data in metrics.items():
        (root / name).parent.mkdir(parents=True, exist_ok=True)
        (root / name).write_text(json.dumps(data))
    return root


def test_first_difference_exact_and_within_tolerance(tmp_path):
    lock_a = _lock(distill=[("results/distill/none.json", "1")])
    lock_b = _lock(distill=[("results/distill/none.json", "2")])
    a = _project(tmp_path / "a", lock_a, {"results/distill/none.json": {"final_loss": 1.0, "steps": 16}})
    b = _project(tmp_path / "b", lock_b, {"results/distill/none.json": {"final_loss": 1.0 + 1e-9, "steps": 16}})
    rows, diffs, first = compare_projects(a, b)
    assert first == "output results/distill/none.json of stage distill differs between two runs"
    assert diffs == [("results/distill/none.json", "final_loss", 1.0, 1.0 + 1e-9)]
    rows, diffs, first = compare_projects(a, b, tolerance=(1e-3, 1e-6))
    assert first is None and diffs == []  # bytes differ, metrics agree within the stated tolerance
    text = render(Verdict(first is None, first, rows, diffs, [], [], (1e-3, 1e-6), {}))
    assert "rtol=0.001, atol=1e-06" in text and text.splitlines()[-1].startswith("OK")


def test_metric_rules():
    assert not values_match("n", 1, 1.0, None, None)  # type counts when exact
    assert values_match("accuracy", 0.5, 0.5, None, None)
    assert values_match("accuracy", 0.50, 0.505, 0.0, 0.01)
    assert not values_match("steps", 16, 17, 0.5, 5)  # structural counts stay exact under --tolerance
    assert values_match("x", float("nan"), float("nan"), 0.1, 0.1)
    assert not values_match("x", float("nan"), 1.0, 0.1, 0.1)


def test_metrics_file_missing_on_one_side(tmp_path):
    a = _project(tmp_path / "a", {}, {"results/eval/kd-none.json": {"n": 8}})
    b = _project(tmp_path / "b", {}, {})
    assert compare_metrics(a, b) == [("results/eval/kd-none.json", "(file)", True, False)]


def test_kd_compare_cli_names_the_first_difference(tmp_path):
    """`kd compare A B`: the command that shows two runs (say, before and after a code move) are byte-identical."""
    import subprocess
    import sys

    lock = _lock(prepare=[("data/prepared", "1.dir")], report=[("reports/index.md", "2")])
    a = _project(tmp_path / "a", lock, {"metrics/strict/acc.json": {"acc": 0.5}})
    b = _project(tmp_path / "b", lock, {"metrics/strict/acc.json": {"acc": 0.5}})
    c = _project(tmp_path / "c", _lock(prepare=[("data/prepared", "1.dir")], report=[("reports/index.md", "3")]),
                 {"metrics/strict/acc.json": {"acc": 0.5}})

    def kd_compare(x, y):
        return subprocess.run([sys.executable, "-m", "kd.tools.cli", "compare", str(x), str(y)],
                              capture_output=True, text=True)
    same, diff = kd_compare(a, b), kd_compare(a, c)
    assert same.returncode == 0 and same.stdout.rstrip().endswith("OK: two runs identical"), same.stdout
    assert diff.returncode == 1 and "FAILED: output reports/index.md of stage report differs" in diff.stdout

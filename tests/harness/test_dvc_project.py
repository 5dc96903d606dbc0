"""kd.harness.dvc_project: a fresh copy of the project holds no stage output and has its own DVC cache."""

from __future__ import annotations

from pathlib import Path

from kd.harness.dvc_project import make_copy, output_prefixes, project_files, tool_env

ROOT = Path(__file__).resolve().parents[2]


def test_copy_has_no_outputs_and_its_own_cache():
    files = project_files(ROOT)
    prefixes = output_prefixes(ROOT)
    assert "dvc.lock" in prefixes and "results/distill/" in prefixes and "models/" in prefixes
    # reports/bench.json is `kd bench`'s committed record, not a stage output
    assert not [f for f in files if f == "dvc.lock" or f.startswith(("metrics/", "results/", "reports/", "models/", "data/"))
                and f != "reports/bench.json"]
    assert "dvc.yaml" in files and "kd/harness/verify.py" in files and "tests/data/gsm8k/train.jsonl" in files


def test_make_copy_uses_its_own_cache_and_the_profile(tmp_path):
    root = make_copy(ROOT, tmp_path / "project")
    from kd.config.profiles import render

    assert (root / "params.yaml").read_text() == render("tiny", ROOT)  # base + the tiny override
    import subprocess

    cache = subprocess.run(["dvc", "cache", "dir"], cwd=root, env=tool_env(), capture_output=True, text=True,
                           check=True).stdout.strip()
    assert Path(cache) == root / ".dvc" / "cache"
    assert not (root / "dvc.lock").exists()

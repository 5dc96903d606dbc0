"""`kd verify --quick` through the CLI: the invalidation table and the code-deps check pass on this project, and the
temporary copy is removed. (Its parts are tested where they live: tests/harness/test_run_compare.py, test_invalidation.py,
test_code_deps.py, test_dvc_project.py.)

The full `kd verify` (two tiny pipeline runs, ~3-5 min on 2 CPU cores) is CI's job (.ci/run), not the unit suite's;
tests/integration/test_faults.py compares real stage outputs across runs."""

from __future__ import annotations

import subprocess
import sys
from pathlib import Path

import pytest

from kd.harness.dvc_project import tool_env
from kd.harness.invalidation import INVALIDATION

ROOT = Path(__file__).resolve().parents[2]


@pytest.mark.slow
def test_kd_verify_quick_passes_on_this_project(tmp_path):
    """The hand-written table against the real dvc.yaml, through the CLI: every change re-runs exactly its stages,
    every stage declares the kd modules it imports."""
    res = subprocess.run([sys.executable, "-m", "kd.tools.cli", "verify", "--quick", "--workdir", str(tmp_path)],
                         cwd=ROOT, env=tool_env(), capture_output=True, text=True, timeout=600)
    out = res.stdout + res.stderr
    assert res.returncode == 0, out[-4000:]
    assert "Invalidation (change" in out and "Code deps" in out
    assert out.count(" ok") >= len(INVALIDATION)
    assert not list(tmp_path.iterdir()), "the temporary copy is removed"

"""Stage scripts run in the test process: the same code DVC runs, without a subprocess."""

from __future__ import annotations

import importlib.util
import os
from pathlib import Path

ROOT = Path(__file__).resolve().parents[1]


def in_process(root: Path, name: str, *args: str) -> None:
    """Run stages/<name>.py's command in `root`, from a freshly loaded module (no state shared between tests)."""
    spec = importlib.util.spec_from_file_location(f"stage_{name}_in_process", ROOT / "stages" / f"{name}.py")
    mod = importlib.util.module_from_spec(spec)
    spec.loader.exec_module(mod)
    cwd = os.getcwd()
    os.chdir(root)
    try:
        mod.main.main(args=list(args), standalone_mode=False)
    finally:
        os.chdir(cwd)

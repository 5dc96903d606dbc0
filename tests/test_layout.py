"""The package stays a library of single-purpose modules: no kd/*.py over MAX_LINES lines (a module that grows past
it is doing more than one job: split it, as kd/verify.py, kd/models.py and kd/tune.py were)."""

from __future__ import annotations

from pathlib import Path

KD = Path(__file__).resolve().parents[1] / "kd"
MAX_LINES = 400


def test_no_kd_module_exceeds_the_line_limit():
    sizes = {p.name: len(p.read_text(encoding="utf-8").splitlines()) for p in sorted(KD.rglob("*.py"))}
    assert len(sizes) > 20 and "verify.py" in sizes  # the glob found the package
    too_long = {name: n for name, n in sizes.items() if n > MAX_LINES}
    assert not too_long, f"kd modules over {MAX_LINES} lines (split them by job): {too_long}"

"""The layout is the architecture: kd/ is packages by job (no flat modules besides __init__), no module over MAX_LINES
lines (a module that grows past it is doing more than one job: split it, as kd/harness/verify.py,
kd/models/registry.py and kd/tools/tune/study.py were), and tests mirror the package: tests/<package>/test_<module>.py,
the end-to-end, hostile and CI suites under tests/integration/."""

from __future__ import annotations

from pathlib import Path

ROOT = Path(__file__).resolve().parents[1]
KD = ROOT / "kd"
MAX_LINES = 400
# test files named after a concern, not a module, in the package whose code they exercise (name -> why)
CONCERNS = {
    "train/test_alignment.py": "the original code's three alignment defects, across train/inputs and teacher/signal",
    "config/test_gpu_profiles.py": "the GPU profiles (config/profiles' data) against the paper's settings",
}


def test_kd_is_packages_by_job():
    flat = sorted(p.name for p in KD.glob("*.py") if p.name != "__init__.py")
    assert not flat, f"modules directly under kd/ (put each in the package of its job): {flat}"
    packages = sorted(p.name for p in KD.iterdir() if (p / "__init__.py").exists())
    assert {"core", "config", "data", "models", "generation", "teacher", "train", "eval", "report", "harness",
            "tools"} <= set(packages), packages
    for pkg in KD.rglob("__init__.py"):  # every package says what it holds
        assert pkg.parent == KD or pkg.read_text(encoding="utf-8").startswith('"""'), pkg


def test_no_kd_module_exceeds_the_line_limit():
    sizes = {str(p.relative_to(KD)): len(p.read_text(encoding="utf-8").splitlines()) for p in sorted(KD.rglob("*.py"))}
    assert len(sizes) > 20 and "harness/verify.py" in sizes  # the glob found the package
    too_long = {name: n for name, n in sizes.items() if n > MAX_LINES}
    assert not too_long, f"kd modules over {MAX_LINES} lines (split them by job): {too_long}"


def test_tests_mirror_the_package():
    tests = ROOT / "tests"
    for f in sorted(tests.rglob("test_*.py")):
        rel = f.relative_to(tests)
        if len(rel.parts) == 1:
            assert rel.name == "test_layout.py", f"{rel}: put it in tests/<package>/ or tests/integration/"
            continue
        pkg = rel.parts[0]
        if pkg == "integration":
            continue
        assert (KD / pkg / "__init__.py").exists(), f"tests/{rel}: kd/{pkg}/ is not a package"
        name = rel.name.removeprefix("test_").removesuffix(".py")
        target = KD.joinpath(*rel.parts[:-1])
        assert (target / f"{name}.py").exists() or (target / name).is_dir() or rel.as_posix() in CONCERNS, \
            f"tests/{rel}: no kd/{pkg}/{name}.py (name it after the module it tests, or list its concern in CONCERNS)"

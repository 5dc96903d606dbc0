"""requirements.lock agrees with pyproject.toml and with the installed environment (CI runs this after
`scripts/bootstrap` installed from the lock). Regenerate with `bash scripts/lock` when one of these fails."""

from __future__ import annotations

import re
import tomllib
from importlib import metadata
from pathlib import Path

import pytest
from packaging.requirements import Requirement
from packaging.utils import canonicalize_name

ROOT = Path(__file__).resolve().parents[2]
LOCK = ROOT / "requirements.lock"
FIX = "run `bash scripts/lock` and commit requirements.lock"


def parse_lock(text: str) -> dict[str, dict]:
    """name -> {version, hashes} from pip-compile's output (a pin line, then `--hash=` continuation lines)."""
    pins: dict[str, dict] = {}
    current = None
    for line in text.splitlines():
        m = re.match(r"^([A-Za-z0-9][A-Za-z0-9._\-]*)==([^\s\\;]+)", line)
        if m:
            current = pins.setdefault(canonicalize_name(m.group(1)), {"version": m.group(2), "hashes": []})
        elif current is not None and (h := re.search(r"--hash=sha256:([0-9a-f]{64})", line)):
            current["hashes"].append(h.group(1))
        elif not line.startswith(" "):
            current = None
    return pins


@pytest.fixture(scope="module")
def lock() -> dict[str, dict]:
    assert LOCK.exists(), f"requirements.lock is missing: {FIX}"
    return parse_lock(LOCK.read_text(encoding="utf-8"))


def declared() -> list[Requirement]:
    project = tomllib.loads((ROOT / "pyproject.toml").read_text(encoding="utf-8"))["project"]
    return [Requirement(r) for r in [*project["dependencies"], *project["optional-dependencies"]["dev"]]]


def test_every_pyproject_requirement_is_pinned_in_the_lock(lock):
    bad = []
    for req in declared():
        if req.marker is not None and not req.marker.evaluate():
            continue
        pin = lock.get(canonicalize_name(req.name))
        if pin is None:
            bad.append(f"{req}: not in the lock")
        elif not req.specifier.contains(pin["version"], prereleases=True):
            bad.append(f"{req}: the lock pins {pin['version']}")
    assert not bad, f"requirements.lock disagrees with pyproject.toml ({FIX}):\n" + "\n".join(bad)


def test_every_pin_has_a_hash_and_was_written_by_pip_compile(lock):
    text = LOCK.read_text(encoding="utf-8")
    assert "pip-compile" in text.split("\n\n")[0] and "--generate-hashes" in text, f"not pip-compile's output: {FIX}"
    assert not [n for n, p in lock.items() if not p["hashes"]], f"pins without a hash: {FIX}"
    assert len(lock) > 50  # the whole dependency tree, not just the direct requirements


def test_torch_pin_is_the_declared_cpu_build(lock):
    want = [ln for ln in (ROOT / "lock/torch-cpu.txt").read_text().splitlines() if ln.startswith("torch==")]
    assert want == [f"torch=={lock['torch']['version']}"], f"lock/torch-cpu.txt and the lock disagree: {FIX}"


def test_the_lock_is_closed_under_the_installed_packages_dependencies(lock):
    """Every dependency of every locked package is locked too (else `--require-hashes` would fail on a fresh
    machine), read from the installed distributions' metadata."""
    missing = []
    for name in lock:
        try:
            dist = metadata.distribution(name)
        except metadata.PackageNotFoundError:
            continue  # not installed here (a GPU machine with KD_TORCH, say): nothing to read
        for raw in dist.requires or []:
            req = Requirement(raw)
            if req.marker is not None and not req.marker.evaluate({"extra": ""}):
                continue
            if canonicalize_name(req.name) not in lock:
                missing.append(f"{name} needs {req}")
    assert not missing, f"the lock is not closed ({FIX}):\n" + "\n".join(missing)


def test_installed_versions_are_the_locked_ones(lock):
    """What `scripts/bootstrap` installed is what the lock says (torch may differ under KD_TORCH: a GPU build)."""
    off = []
    for name, pin in lock.items():
        try:
            have = metadata.version(name)
        except metadata.PackageNotFoundError:
            continue
        if have != pin["version"] and not (name == "torch" and have.split("+")[0] == pin["version"].split("+")[0]):
            off.append(f"{name}: installed {have}, locked {pin['version']}")
    assert not off, "the environment is not the locked one (`bash scripts/bootstrap`):\n" + "\n".join(off)


def test_parse_lock_reads_continuation_hashes():
    text = ("#\n# header\n#\nfoo-bar==1.2 \\\n    --hash=sha256:" + "a" * 64 + " \\\n    --hash=sha256:" + "b" * 64
            + "\n    # via x\nbaz==3.0 ; python_version >= '3' \\\n    --hash=sha256:" + "c" * 64 + "\n")
    assert parse_lock(text) == {"foo-bar": {"version": "1.2", "hashes": ["a" * 64, "b" * 64]},
                                "baz": {"version": "3.0", "hashes": ["c" * 64]}}

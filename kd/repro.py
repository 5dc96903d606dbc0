"""`kd repro [DVC ARGS]`: validate, snapshot every stage output, `dvc repro`; after a failure put back the outputs.

DVC deletes a stage's outputs before running it: a stage that then fails would leave you without them (the cached
ones can be restored with `dvc checkout`, the `cache: false` ones, metrics and reports, cannot). So `kd repro`
first runs `preflight` (params, strategies, model specs, a local dataset, tokenizers of materialised models: each
a cheap check that names the key or file), snapshots every stage output (hard links + sha256), and only then runs
`dvc repro`; if a stage still fails, every stage that did not complete gets its outputs back byte for byte
(verified by hash; anything that could not be restored is named), consistent with dvc.lock. A file lock keeps a
second `kd repro` from snapshotting or restoring under a running one.
"""

from __future__ import annotations

import contextlib
import os
import shutil
import subprocess
import sys
import tempfile
from dataclasses import dataclass, field
from pathlib import Path
from typing import Callable

from kd.dvc_project import read_lock, stage_outputs, tool_env
from kd.errors import KdError
from kd.preflight import preflight


@dataclass
class Snapshot:
    """Every file under every stage output as it was before `dvc repro`: a hard link (a copy across devices) in
    `dir`, with its sha256, size and mtime. DVC and kd.io replace files (unlink, rename), never write into them, so a
    hard link keeps the old bytes; that is checked at restore time, by hash."""
    dir: Path
    outputs: dict[str, list[str]]                       # stage -> output paths that existed
    files: dict[str, tuple[str, int, int]] = field(default_factory=dict)  # file -> (sha256, size, mtime_ns)


def _files_under(path: Path) -> list[Path]:
    if path.is_file():
        return [path]
    return sorted(p for p in path.rglob("*") if p.is_file() and not p.is_symlink()) if path.is_dir() else []


def _link_or_copy(src: Path, dst: Path) -> None:
    dst.parent.mkdir(parents=True, exist_ok=True)
    try:
        os.link(src, dst)
    except OSError:
        shutil.copy2(src, dst)


def take_snapshot(root: Path, snap_dir: Path) -> Snapshot:
    from kd.io import sha256_file

    snap = Snapshot(snap_dir, {})
    for stage, outs in stage_outputs(root).items():
        kept = [o for o in outs if (root / o).exists()]
        if kept:
            snap.outputs[stage] = kept
        for o in kept:
            for f in _files_under(root / o):
                rel = str(f.relative_to(root))
                if rel in snap.files:
                    continue
                _link_or_copy(f, snap_dir / rel)
                st = (snap_dir / rel).stat()
                snap.files[rel] = (sha256_file(snap_dir / rel), st.st_size, st.st_mtime_ns)
    return snap


def _same(root: Path, snap: Snapshot, out: str) -> bool:
    """Does output `out` hold exactly the snapshot's files, byte for byte?"""
    from kd.io import sha256_file

    if not (root / out).exists():
        return False
    want = {f: h for f, (h, _, _) in snap.files.items() if f == out or f.startswith(out + "/")}
    have = [str(p.relative_to(root)) for p in _files_under(root / out)]
    if set(have) != set(want) or (root / out).is_file() != (out in want):
        return False
    return all(sha256_file(root / f) == want[f] for f in have)


def restore_outputs(root: Path, snap: Snapshot, lock_before: dict, lock_after: dict) -> tuple[list[str], list[str]]:
    """After a failed `dvc repro`: every stage that did not complete (its dvc.lock entry is unchanged) gets each of
    its outputs back exactly as the snapshot has it, verified by sha256. Stages that completed keep their new
    outputs (dvc.lock describes those). Returns (restored outputs, 'output: why' for what could not be restored)."""
    from kd.io import sha256_file

    restored, failed = [], []
    for stage, outs in snap.outputs.items():
        if stage in lock_after and lock_after.get(stage) != lock_before.get(stage):
            continue  # ran to the end in this repro: its new outputs are the ones dvc.lock records
        for out in outs:
            if _same(root, snap, out):
                continue
            files = {f: v for f, v in snap.files.items() if f == out or f.startswith(out + "/")}
            broken = [f for f, (_, size, mtime) in files.items()
                      if (lambda st: (st.st_size, st.st_mtime_ns) != (size, mtime))((snap.dir / f).stat())]
            if broken:  # a process wrote into a file in place: the snapshot's link changed with it
                failed.append(f"{out}: {broken[0]} was overwritten in place during the run")
                continue
            try:
                dst = root / out
                if dst.is_dir() and not dst.is_symlink():
                    shutil.rmtree(dst)
                elif dst.exists() or dst.is_symlink():
                    dst.unlink()
                for f in files:
                    _link_or_copy(snap.dir / f, root / f)
                if (root / out).is_dir() is False and not files:
                    (root / out).mkdir(parents=True, exist_ok=True)  # an output folder that was empty
            except OSError as e:
                failed.append(f"{out}: {e.strerror or e}")
                continue
            wrong = next((f for f, (h, _, _) in files.items() if sha256_file(root / f) != h), None)
            if wrong:
                failed.append(f"{out}: {wrong} does not hash as it did before the run")
            else:
                restored.append(out)
    return restored, failed


@contextlib.contextmanager
def repro_lock(root: Path):
    """One `kd repro` per project at a time: a second one would snapshot or restore files under a running stage.
    An OS file lock (fcntl): released by the kernel if the holder dies, so a killed run never leaves it stuck."""
    import fcntl

    path = root / ".dvc" / "tmp" / "kd-repro.lock" if (root / ".dvc").is_dir() else root / ".kd-repro.lock"
    path.parent.mkdir(parents=True, exist_ok=True)
    with open(path, "a+") as f:
        try:
            fcntl.flock(f.fileno(), fcntl.LOCK_EX | fcntl.LOCK_NB)
        except BlockingIOError:
            f.seek(0)
            holder = f.read().strip() or "another process"
            raise KdError(f"another `kd repro` is running in {root} ({holder}); wait for it to finish") from None
        f.seek(0)
        f.truncate()
        f.write(f"pid {os.getpid()}\n")
        f.flush()
        try:
            yield
        finally:
            f.seek(0)
            f.truncate()
            fcntl.flock(f.fileno(), fcntl.LOCK_UN)


def repro(root: Path, dvc_args: list[str], echo: Callable[[str], None] = print,
          env: dict[str, str] | None = None) -> int:
    """`kd repro`: preflight, snapshot every stage output, `dvc repro *dvc_args`; after a failure put back, byte
    for byte, the outputs of every stage that did not complete, and say exactly what could not be put back."""
    root = Path(root).resolve()
    with repro_lock(root):
        preflight(root)
        echo("kd repro: params, strategies, data and models check out; running dvc repro")
        env = env or tool_env()
        lock_before = read_lock(root) if (root / "dvc.lock").exists() else {}
        tmp_parent = root / ".dvc" / "tmp" if (root / ".dvc" / "tmp").is_dir() else None
        snap_dir = Path(tempfile.mkdtemp(prefix=".kd-repro-", suffix=".tmp", dir=tmp_parent))
        try:
            snap = take_snapshot(root, snap_dir)
            # DVC's CLI with the workaround for its crash on dry runs over not-yet-produced deps (kd/dvc_compat.py)
            res = subprocess.run([sys.executable, "-m", "kd.dvc_compat", "repro", *dvc_args], cwd=root, env=env)
            if res.returncode == 0:
                return 0
            lock_after = read_lock(root) if (root / "dvc.lock").exists() else {}
            restored, failed = restore_outputs(root, snap, lock_before, lock_after)
            msg = f"kd repro: `dvc repro` failed (exit {res.returncode}); "
            msg += (f"restored the previous outputs, byte for byte (sha256 checked): {', '.join(restored)}"
                    if restored else "every output of the stages that did not finish is as it was")
            echo(msg)
            if failed:
                echo("kd repro: could NOT restore: " + "; ".join(failed))
            return res.returncode
        finally:
            shutil.rmtree(snap_dir, ignore_errors=True)

"""`kd repro [DVC ARGS]`: validate, snapshot every stage output, `dvc repro`; after a failure put back the outputs.

DVC deletes a stage's outputs before running it: a stage that then fails would leave you without them (the cached
ones can be restored with `dvc checkout`, the `cache: false` ones, metrics and reports, cannot). So `kd repro`
first runs `preflight` (params, strategies, model specs, a local dataset, tokenizers of materialised models: each
a cheap check that names the key or file), snapshots every stage output (hard links + sha256), and only then runs
`dvc repro`; if a stage still fails, every stage that did not complete gets its outputs back byte for byte
(verified by hash; anything that could not be restored is named), consistent with dvc.lock. An interrupt (Ctrl-C,
SIGTERM, SIGHUP) is passed to DVC and then restores the same way. A file lock, held by the `dvc repro` process too,
keeps a second `kd repro` from snapshotting or restoring under a running one, even after `kd repro` was killed; the
snapshots such a killed run leaves are removed by the next one. Every path goes through kd/core/guard.py.
"""

from __future__ import annotations

import contextlib
import os
import re
import shutil
import signal
import stat
import subprocess
import sys
import tempfile
from dataclasses import dataclass, field
from pathlib import Path
from typing import Callable

from kd.core.errors import KdError
from kd.core.guard import KD_TMP, check_layout, guard
from kd.harness.dvc_project import read_lock, stage_outputs, tool_env
from kd.harness.preflight import preflight


@dataclass
class Snapshot:
    """Every file under every stage output as it was before `dvc repro`: a hard link (a copy across devices) in
    `dir`, with its sha256, size and mtime. DVC and kd.core.io replace files (unlink, rename), never write into them, so a
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
    from kd.core.io import sha256_file

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
    from kd.core.io import sha256_file

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
    from kd.core.io import sha256_file

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
                dst = guard(root / out, root, "restore")
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


LOCK_NAME = "kd-repro.lock"
SNAP_PREFIX = ".kd-repro-"
_OURS = re.compile(r"\A(pid \d+[^\n]{0,200}\n?)?\Z")  # what kd writes into its lock file, and nothing else


@contextlib.contextmanager
def repro_lock(root: Path):
    """One `kd repro` per project at a time: a second one would snapshot or restore files under a running one.
    An OS file lock (fcntl.flock) on .dvc/tmp/kd-repro.lock, opened without following a link (O_NOFOLLOW) and never
    truncated unless it holds only what kd writes there. Yields the file descriptor: `repro` passes it to the
    `dvc repro` process, so the lock is held as long as DVC runs, even when `kd repro` itself is killed."""
    import fcntl

    base = root / KD_TMP if (root / ".dvc").is_dir() else root
    path = base / LOCK_NAME if base != root else root / ".kd-repro.lock"
    guard(path, root, "lock")
    path.parent.mkdir(parents=True, exist_ok=True)
    try:
        fd = os.open(path, os.O_RDWR | os.O_CREAT | os.O_NOFOLLOW | os.O_CLOEXEC, 0o644)
    except OSError as e:
        raise KdError(f"{path}: cannot open kd's lock file ({e.strerror}); a symlink there is refused: remove it"
                      ) from None
    try:
        st = os.fstat(fd)
        if not stat.S_ISREG(st.st_mode) or st.st_nlink != 1 or st.st_size > 256:
            raise KdError(f"{path}: not kd's lock file (a {'hard-linked ' if st.st_nlink != 1 else ''}file kd did not "
                          "write); remove it and re-run")
        try:
            fcntl.flock(fd, fcntl.LOCK_EX | fcntl.LOCK_NB)
        except BlockingIOError:
            holder = os.pread(fd, 256, 0).decode("utf-8", "replace").strip() or "another process"
            raise KdError(f"another `kd repro` is running in {root} ({holder}); wait for it to finish") from None
        if not _OURS.match(os.pread(fd, 257, 0).decode("utf-8", "replace")):
            raise KdError(f"{path}: not kd's lock file (holds text kd did not write); remove it and re-run")
        _note(fd, f"pid {os.getpid()} (kd repro)")
        try:
            yield fd
        finally:
            _note(fd, "")
            fcntl.flock(fd, fcntl.LOCK_UN)
    finally:
        os.close(fd)


def _note(fd: int, text: str) -> None:
    """Who holds the lock, for the message a second `kd repro` prints (the file only ever holds this line)."""
    os.ftruncate(fd, 0)
    os.pwrite(fd, (text + "\n").encode() if text else b"", 0)


def clean_stale_snapshots(root: Path) -> list[str]:
    """Snapshots left by a `kd repro` that was killed (SIGKILL, power loss): called under the lock, so no running
    `kd repro` owns them. Returns their names."""
    base = root / KD_TMP
    gone = []
    for d in sorted(base.glob(SNAP_PREFIX + "*.tmp")) if base.is_dir() else []:
        if d.is_dir() and not d.is_symlink():
            shutil.rmtree(guard(d, root, "delete"), ignore_errors=True)
            gone.append(d.name)
    return gone


_STOP = (signal.SIGINT, signal.SIGTERM, signal.SIGHUP)


def _run_dvc(cmd: list[str], root: Path, env: dict[str, str], lock_fd: int) -> tuple[int, int | None]:
    """`dvc repro` in its own process group, holding the lock's descriptor. SIGINT / SIGTERM / SIGHUP to `kd repro`
    (Ctrl-C in the terminal reaches only `kd repro`'s group) are passed to DVC's whole group, then `kd repro` waits
    for it to stop (SIGKILL after 60 s) so that the restore runs over a quiet project. Returns (exit code, signal)."""
    got: list[int] = []
    proc = subprocess.Popen(cmd, cwd=root, env=env, pass_fds=(lock_fd,), process_group=0)
    _note(lock_fd, f"pid {os.getpid()} (kd repro), dvc repro pid {proc.pid}")

    def forward(signum, _frame):
        got.append(signum)
        with contextlib.suppress(ProcessLookupError, PermissionError):
            os.killpg(proc.pid, signum)

    saved = {s: signal.signal(s, forward) for s in _STOP}
    try:
        while True:
            try:
                code = proc.wait(timeout=60 if got else None)
                break
            except subprocess.TimeoutExpired:
                with contextlib.suppress(ProcessLookupError, PermissionError):
                    os.killpg(proc.pid, signal.SIGKILL)
    finally:
        for s, h in saved.items():
            signal.signal(s, h)
    return code, (got[0] if got else None)


def repro(root: Path, dvc_args: list[str], echo: Callable[[str], None] = print,
          env: dict[str, str] | None = None) -> int:
    """`kd repro`: preflight, snapshot every stage output, `dvc repro *dvc_args`; after a failure or an interrupt
    (SIGINT, SIGTERM, SIGHUP) put back, byte for byte, the outputs of every stage that did not complete, and say
    exactly what could not be put back. Exit code: DVC's, or 128 + the signal after an interrupt."""
    root = Path(root).resolve()
    check_layout(root)  # no output, work or lock location leads outside the project (before the lock opens)
    with repro_lock(root) as lock_fd:
        stale = clean_stale_snapshots(root)
        if stale:
            echo(f"kd repro: removed {len(stale)} snapshot(s) a killed `kd repro` left in {KD_TMP}")
        preflight(root)
        echo("kd repro: params, strategies, data and models check out; running dvc repro")
        env = env or tool_env()
        lock_before = read_lock(root) if (root / "dvc.lock").exists() else {}
        tmp_parent = root / KD_TMP if (root / KD_TMP).is_dir() else None
        snap_dir = Path(tempfile.mkdtemp(prefix=SNAP_PREFIX, suffix=".tmp", dir=tmp_parent))
        try:
            snap = take_snapshot(root, snap_dir)
            # DVC's CLI with the workaround for its crash on dry runs over not-yet-produced deps (kd/harness/dvc_compat.py)
            code, sig = _run_dvc([sys.executable, "-m", "kd.harness.dvc_compat", "repro", *dvc_args], root, env, lock_fd)
            if code == 0 and sig is None:
                return 0
            lock_after = read_lock(root) if (root / "dvc.lock").exists() else {}
            restored, failed = restore_outputs(root, snap, lock_before, lock_after)
            what = (f"interrupted ({signal.Signals(sig).name})" if sig is not None
                    else f"`dvc repro` failed (exit {code})")
            msg = f"kd repro: {what}; "
            msg += (f"restored the previous outputs, byte for byte (sha256 checked): {', '.join(restored)}"
                    if restored else "every output of the stages that did not finish is as it was")
            echo(msg)
            if failed:
                echo("kd repro: could NOT restore: " + "; ".join(failed))
            return 128 + sig if sig is not None else code
        finally:
            shutil.rmtree(snap_dir, ignore_errors=True)

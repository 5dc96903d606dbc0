"""Atomic, deterministic file I/O. Every stage output goes through here (temp file, then rename),
so a killed stage never leaves a half-written file that DVC could cache."""

from __future__ import annotations

import contextlib
import errno
import hashlib
import json
import os
import re
import shutil
import tempfile
from pathlib import Path
from typing import Any, Iterable, Iterator

import yaml

from kd.core.errors import ArtefactError, KdError


@contextlib.contextmanager
def atomic_path(path: str | os.PathLike) -> Iterator[Path]:
    """Yield a temporary path beside `path`; on success it is renamed onto `path` (file or dir)."""
    from kd.core.guard import guard

    path = Path(guard(path))  # inside the project after symlinks, or an absolute place named outside it
    path.parent.mkdir(parents=True, exist_ok=True)
    try:
        tmp = Path(tempfile.mkdtemp(prefix=f".{path.name}.", suffix=".tmp", dir=path.parent)) / path.name
    except OSError as e:
        _raise_if_full(e, path)
        raise
    try:
        yield tmp
        if path.is_dir() and not path.is_symlink():
            os.replace(path, tmp.parent / ".previous")  # a rename, not a delete: a kill here keeps the old folder
        os.replace(tmp, path)
    except Exception as e:  # noqa: BLE001 - OSError, or a writer's own error wrapping one (safetensors)
        _raise_if_full(e, path)
        raise
    finally:
        shutil.rmtree(tmp.parent, ignore_errors=True)


def remove_tree(path: str | os.PathLike) -> None:
    """Delete a work folder kd made: through the path guard, so a planted symlink never leads a delete outside."""
    from kd.core.guard import guard

    shutil.rmtree(guard(path, what="delete"), ignore_errors=True)


_FULL = {errno.ENOSPC, errno.EDQUOT, errno.EFBIG}
_OS_ERROR = re.compile(r"\(os error (\d+)\)")  # how safetensors' Rust writer reports an I/O error: no OSError


def _full_errno(e: BaseException) -> int | None:
    """The errno when `e` is a full disk, quota or file-size limit: an OSError's, or one a writer quotes."""
    n = e.errno if isinstance(e, OSError) else (int(m.group(1)) if (m := _OS_ERROR.search(str(e))) else None)
    return n if n in _FULL else None


def _raise_if_full(e: BaseException, path: Path) -> None:
    """A full disk (or quota, or file-size limit) while writing an output: one clear error naming it."""
    if (n := _full_errno(e)) is not None:
        raise KdError(f"{path}: could not write it ({os.strerror(n)}): the disk is full or a size limit was reached. "
                      "Nothing half-written was kept and the previous version, if any, is untouched; free space "
                      "and re-run") from None


def write_text(path: str | os.PathLike, text: str) -> None:
    with atomic_path(path) as tmp:
        with open(tmp, "w", encoding="utf-8") as f:
            f.write(text)
            f.flush()
            os.fsync(f.fileno())


def dumps_json(obj: Any) -> str:
    # sorted keys + fixed separators: byte-stable across runs
    return json.dumps(obj, indent=2, sort_keys=True, ensure_ascii=False) + "\n"


def write_json(path: str | os.PathLike, obj: Any) -> None:
    write_text(path, dumps_json(obj))


def write_jsonl(path: str | os.PathLike, rows: Iterable[dict]) -> None:
    write_text(path, "".join(json.dumps(r, sort_keys=True, ensure_ascii=False) + "\n" for r in rows))


def read_json(path: str | os.PathLike) -> Any:
    path = Path(path)
    if not path.exists():
        raise ArtefactError(f"{path}: missing (run the stage that produces it: `dvc repro`)")
    try:
        return json.loads(path.read_text(encoding="utf-8"))
    except json.JSONDecodeError as e:
        raise ArtefactError(f"{path}: not valid JSON ({e})") from None


def read_jsonl(path: str | os.PathLike) -> list[dict]:
    path = Path(path)
    if not path.exists():
        raise ArtefactError(f"{path}: missing (run the stage that produces it: `dvc repro`)")
    with open(path, encoding="utf-8") as f:
        return [row for _, row in iter_jsonl(f, str(path))]


def iter_jsonl(lines: Iterable[str], where: str, error: type[KdError] = ArtefactError) -> Iterator[tuple[int, dict]]:
    """(line number, object) for every non-blank line; raises `error` naming `where:line` at the first line that is
    not a JSON object."""
    for n, line in enumerate(lines, 1):
        if not line.strip():
            continue
        try:
            row = json.loads(line)
        except json.JSONDecodeError as e:
            raise error(f"{where}:{n}: not valid JSON ({e})") from None
        if not isinstance(row, dict):
            raise error(f"{where}:{n}: expected a JSON object per line")
        yield n, row


def sha256_file(path: str | os.PathLike, chunk: int = 1 << 20) -> str:
    h = hashlib.sha256()
    with open(path, "rb") as f:
        while block := f.read(chunk):
            h.update(block)
    return h.hexdigest()


def sha256_bytes(data: bytes) -> str:
    return hashlib.sha256(data).hexdigest()


def save_safetensors(tensors: dict, path: str | os.PathLike, metadata: dict[str, str] | None = None) -> None:
    from safetensors.torch import save_file

    with atomic_path(path) as tmp:
        save_file({k: v.contiguous() for k, v in tensors.items()}, str(tmp), metadata=metadata)


# --------------------------------------------------------------------------------------------- YAML, env

YAML_MAX_BYTES = 1 << 20  # params.yaml / strategies.yaml are hand-written: a megabyte is already absurd


class StrictSafeLoader(yaml.SafeLoader):
    """SafeLoader that refuses what a hand-written config never needs and an attacker loves: anchors and aliases
    (a "billion laughs" expands a few lines into gigabytes) and duplicate keys (the last one would silently win)."""

    def compose_node(self, parent, index):
        event = self.peek_event()
        if isinstance(event, yaml.AliasEvent) or getattr(event, "anchor", None) is not None:
            raise yaml.MarkedYAMLError(None, None, "anchors and aliases (&name / *name) are not allowed",
                                       event.start_mark)
        return super().compose_node(parent, index)

    def construct_mapping(self, node, deep=False):
        seen = set()
        for key_node, _ in node.value:
            key = self.construct_object(key_node, deep=True)
            try:
                dup = key in seen
            except TypeError:  # an unhashable key: PyYAML reports it below
                break
            if dup:
                raise yaml.MarkedYAMLError(None, None, f"duplicate key {key!r}", key_node.start_mark)
            seen.add(key)
        return super().construct_mapping(node, deep=deep)


def read_yaml(path: str | os.PathLike, missing: str) -> Any:
    """Parse a hand-written YAML file strictly (safe types only, no aliases, no duplicate keys, at most 1 MiB).
    Every problem is one KdError line naming the file, line and column. `missing`: what to do when it is absent."""
    import stat

    path = Path(path)
    try:
        mode = path.stat().st_mode
    except OSError:
        raise KdError(f"{path}: missing ({missing})") from None
    if not stat.S_ISREG(mode):
        kind = ("a folder" if stat.S_ISDIR(mode) else "a FIFO (named pipe)" if stat.S_ISFIFO(mode)
                else "a device or socket")
        raise KdError(f"{path}: is {kind}, not a regular file ({missing})")
    if path.stat().st_size > YAML_MAX_BYTES:
        raise KdError(f"{path}: {path.stat().st_size} bytes; a config file may be at most {YAML_MAX_BYTES} bytes")
    try:
        text = path.read_text(encoding="utf-8")
    except UnicodeDecodeError as e:
        raise KdError(f"{path}: not UTF-8 text ({e.reason} at byte {e.start})") from None
    try:
        return yaml.load(text, Loader=StrictSafeLoader)  # noqa: S506 - a SafeLoader subclass
    except yaml.YAMLError as e:
        mark = getattr(e, "problem_mark", None)  # one line: where, and what (PyYAML's str() spans several)
        where = f"line {mark.line + 1}, column {mark.column + 1}: " if mark else ""
        raise KdError(f"{path}: not valid YAML ({where}{getattr(e, 'problem', None) or e})") from None
    except RecursionError:
        raise KdError(f"{path}: nested too deeply to be a config file") from None
    except (ValueError, OverflowError) as e:  # e.g. an integer of thousands of digits
        raise KdError(f"{path}: a value cannot be read ({str(e).split(';')[0]})") from None


def cache_root() -> Path:
    """$KD_CACHE (default ~/.cache/kd-prime): where downloads are kept. Checked to be a writable folder, so a
    mistake fails here in one line instead of deep inside pip or a download."""
    raw = os.environ.get("KD_CACHE")
    path = Path(raw).expanduser() if raw else Path.home() / ".cache" / "kd-prime"
    where = f"KD_CACHE={raw}" if raw else f"the download cache {path}"
    if raw is not None and not raw.strip():
        raise KdError("KD_CACHE is set but empty; unset it or point it at a writable folder")
    if path.exists() and not path.is_dir():
        raise KdError(f"{where} is a file, not a folder; point KD_CACHE at a writable folder")
    try:
        path.mkdir(parents=True, exist_ok=True)
    except OSError as e:
        raise KdError(f"{where}: cannot create it ({e.strerror}); point KD_CACHE at a writable folder") from None
    try:  # a real write: os.access says yes to root even on a read-only file system
        with tempfile.TemporaryFile(dir=path):
            pass
    except OSError as e:
        raise KdError(f"{where} is not writable ({e.strerror}); point KD_CACHE at a writable folder") from None
    return path

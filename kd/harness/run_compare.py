"""Two finished runs of the same project compared: dvc.lock stage by stage (the hash of every output; a differing
folder is opened to name its first differing file) and every metrics file value by value, exactly or within a
tolerance."""

from __future__ import annotations

import json
import math
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any

from kd.harness.dvc_project import read_lock

# What `kd verify --tolerance` allows between two runs (printed with the result). Structural counts stay exact.
DEFAULT_RTOL = 1e-2
DEFAULT_ATOL = 1e-2
EXACT_KEYS = {"n", "steps", "examples", "epochs", "trainable_params", "skipped"}


def out_hash(out: dict) -> str:
    return str(out.get("md5") or out.get("etag") or out.get("checksum") or out.get("hash"))


@dataclass
class StageRow:
    stage: str
    outs: list[str]
    identical: bool
    differing: list[str] = field(default_factory=list)  # "path" or "path: file inside it"


def _file_hashes(folder: Path) -> dict[str, str]:
    from kd.core.io import sha256_file

    return {str(p.relative_to(folder)): sha256_file(p) for p in sorted(folder.rglob("*")) if p.is_file()}


def _first_diff_inside(a: Path, b: Path) -> str:
    """For a differing output folder: the first file (sorted) that differs or exists on one side only."""
    if not (a.is_dir() and b.is_dir()):
        return ""
    ha, hb = _file_hashes(a), _file_hashes(b)
    for name in sorted(set(ha) | set(hb)):
        if ha.get(name) != hb.get(name):
            side = "" if name in ha and name in hb else (" (only in run A)" if name in ha else " (only in run B)")
            return name + side
    return ""


def compare_locks(lock_a: dict, lock_b: dict, root_a: Path | None = None, root_b: Path | None = None) -> list[StageRow]:
    """One row per stage (run A's order, then any stage only B has); outputs compared by their DVC hash."""
    rows = []
    for stage in list(lock_a) + [s for s in lock_b if s not in lock_a]:
        if stage not in lock_a or stage not in lock_b:
            rows.append(StageRow(stage, [], False, [f"(stage only in run {'A' if stage in lock_a else 'B'})"]))
            continue
        outs_a = {o["path"]: o for o in lock_a[stage].get("outs", [])}
        outs_b = {o["path"]: o for o in lock_b[stage].get("outs", [])}
        diff = []
        for path in list(outs_a) + [p for p in outs_b if p not in outs_a]:
            if path not in outs_a or path not in outs_b or out_hash(outs_a[path]) != out_hash(outs_b[path]):
                inner = _first_diff_inside(root_a / path, root_b / path) if root_a and root_b else ""
                diff.append(f"{path}/{inner}" if inner else path)
        rows.append(StageRow(stage, sorted(set(outs_a) | set(outs_b)), not diff, diff))
    return rows


def flatten(obj: Any, prefix: str = "") -> dict[str, Any]:
    if isinstance(obj, dict):
        out: dict[str, Any] = {}
        for k in sorted(obj):
            out.update(flatten(obj[k], f"{prefix}.{k}" if prefix else str(k)))
        return out
    if isinstance(obj, list):
        out = {}
        for i, v in enumerate(obj):
            out.update(flatten(v, f"{prefix}[{i}]"))
        return out
    return {prefix: obj}


def metrics_files(root: Path) -> list[str]:
    """The headline metrics (metrics/) and the per-stage details behind them (results/)."""
    return sorted(str(p.relative_to(root)) for d in ("metrics", "results") if (root / d).is_dir()
                  for p in (root / d).rglob("*.json"))


def values_match(key: str, a: Any, b: Any, rtol: float | None, atol: float | None) -> bool:
    """Exact equality (type included: 1 and 1.0 differ) unless tolerances are given; then numbers may differ by
    atol + rtol*|b|, except the structural counts in EXACT_KEYS."""
    if rtol is None or key.rsplit(".", 1)[-1] in EXACT_KEYS:
        return type(a) is type(b) and a == b
    num = (int, float)
    if isinstance(a, num) and isinstance(b, num) and not isinstance(a, bool) and not isinstance(b, bool):
        if math.isnan(a) or math.isnan(b):
            return math.isnan(a) and math.isnan(b)
        return abs(a - b) <= (atol or 0.0) + rtol * abs(b)
    return a == b


def compare_metrics(root_a: Path, root_b: Path, rtol: float | None = None,
                    atol: float | None = None) -> list[tuple[str, str, Any, Any]]:
    """(file, key, value A, value B) for every metric that differs (beyond the tolerance, if one is given)."""
    diffs = []
    files = sorted(set(metrics_files(root_a)) | set(metrics_files(root_b)))
    for name in files:
        pa, pb = root_a / name, root_b / name
        if not pa.exists() or not pb.exists():
            diffs.append((name, "(file)", pa.exists(), pb.exists()))
            continue
        fa, fb = (flatten(json.loads(p.read_text(encoding="utf-8"))) for p in (pa, pb))
        for key in sorted(set(fa) | set(fb)):
            if key not in fa or key not in fb or not values_match(key, fa[key], fb[key], rtol, atol):
                diffs.append((name, key, fa.get(key, "(missing)"), fb.get(key, "(missing)")))
    return diffs


def compare_projects(root_a: Path, root_b: Path, tolerance: tuple[float, float] | None = None
                     ) -> tuple[list[StageRow], list[tuple[str, str, Any, Any]], str | None]:
    """Two finished runs: (stage rows, metric differences, the first difference in words or None)."""
    stage_rows = compare_locks(read_lock(root_a), read_lock(root_b), root_a, root_b)
    rtol, atol = tolerance if tolerance else (None, None)
    metric_diffs = compare_metrics(root_a, root_b, rtol, atol)
    first = None
    if metric_diffs:
        f, k, a, b = metric_diffs[0]
        first = f"metric {f} {k}: {a!r} (run A) vs {b!r} (run B)"
    bad = next((r for r in stage_rows if not r.identical), None)
    if bad and not tolerance:  # outputs come first: a metric difference follows from one
        first = f"output {bad.differing[0]} of stage {bad.stage} differs between two runs"
    return stage_rows, metric_diffs, first

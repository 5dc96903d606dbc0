"""`kd verify` (CI): is the pipeline reproducible, and does each change re-run exactly the stages it must?

  1. copies the project twice into temporary folders (kd.harness.dvc_project.make_copy): the files git tracks plus untracked,
     not-ignored ones (your working tree, uncommitted edits included), never a stage output or dvc.lock; params.yaml
     is the profile (kd.config.profiles); each copy gets its own git repository and a fresh, empty DVC cache;
  2. runs `dvc repro` in each, one after the other, with different PYTHONHASHSEEDs and paths (so a set-order or an
     absolute path leaking into an output shows up);
  3. compares dvc.lock stage by stage (the hash of every output) and every metrics file value by value; a differing
     folder is opened to name the first differing file (kd.harness.run_compare);
  4. checks invalidation: applies each change of kd.harness.invalidation.INVALIDATION (hand-written: change -> stages that
     must re-run) to copy A and asks DVC which stages are now out of date (`dvc status`: the stages a change reaches
     directly; the rest follow from their deps); and checks that every kd module a stage imports is a declared dep
     (kd.harness.code_deps; CODE_DEPS_OK lists the deliberate exceptions).
  It prints the tables and exits 1 naming the first difference (2 for a usage/setup error).
"""

from __future__ import annotations

import os
import shutil
import tempfile
import time
from dataclasses import dataclass
from pathlib import Path
from typing import Any, Callable

from kd.harness.code_deps import CodeDepRow, check_code_deps
from kd.harness.dvc_project import ROOT, VerifyError, make_copy, placeholder_outputs, read_lock, run, tool_env
from kd.harness.invalidation import InvalidationRow, check_invalidation
from kd.harness.run_compare import EXACT_KEYS, StageRow, compare_projects


@dataclass
class Verdict:
    ok: bool
    first_difference: str | None
    stage_rows: list[StageRow]
    metric_diffs: list[tuple[str, str, Any, Any]]
    invalidation: list[InvalidationRow]
    code_deps: list[CodeDepRow]
    tolerance: tuple[float, float] | None
    seconds: dict[str, float]


def _table(headers: list[str], rows: list[list[str]]) -> str:
    widths = [max(len(h), *(len(r[i]) for r in rows)) if rows else len(h) for i, h in enumerate(headers)]
    line = lambda cells: "  ".join(c.ljust(w) for c, w in zip(cells, widths)).rstrip()  # noqa: E731
    return "\n".join([line(headers), line(["-" * w for w in widths])] + [line(r) for r in rows])


def render(v: Verdict) -> str:
    out = []
    if v.stage_rows:
        ident = "within tolerance" if v.tolerance else "identical"
        rows = [[r.stage, ", ".join(r.outs) or "-", "yes" if r.identical else "NO: " + ", ".join(r.differing)]
                for r in v.stage_rows]
        out += ["Stage outputs, run A vs run B (dvc.lock hashes):",
                _table(["stage", "outputs", "identical?"], rows), ""]
        if v.tolerance:
            out.append(f"--tolerance: outputs need not be bit-identical; metrics compared with rtol={v.tolerance[0]}, "
                       f"atol={v.tolerance[1]} (counts {', '.join(sorted(EXACT_KEYS))} exactly).")
        if v.metric_diffs:
            out.append(f"Metrics that differ ({'beyond the tolerance' if v.tolerance else 'bit for bit'}):")
            out += [f"  {f} {k}: {a!r} vs {b!r}" for f, k, a, b in v.metric_diffs[:20]]
        else:
            out.append(f"Metrics: every value in metrics/**/*.json and results/**/*.json {ident}.")
        out.append("")
    if v.invalidation:
        rows = []
        for r in v.invalidation:
            verdict = "ok" if r.ok else "FAIL"
            if r.missing:
                verdict += f" missing: {_stage_list(r.missing)}"
            if r.extra:
                verdict += f" extra: {_stage_list(r.extra)}"
            if r.ok and r.actual & r.tolerated:
                verdict += f" (+{len(r.actual & r.tolerated)} tolerated)"
            rows.append([r.change, _stage_list(r.expected), verdict])
        out += ["Invalidation (change -> stages `dvc status` must report out of date):",
                _table(["change", "expected", "actual"], rows), ""]
    if v.code_deps:
        rows = [[r.stage, "ok" if not r.missing else "MISSING " + ", ".join(r.missing),
                 ", ".join(r.unused) or "-"] for r in v.code_deps]
        out += ["Code deps (kd modules each stage imports vs. its declared deps):",
                _table(["stage", "imported modules declared?", "declared, not imported"], rows), ""]
    timing = ", ".join(f"{k} {s:.0f} s" for k, s in v.seconds.items())
    done = "two runs identical" if v.stage_rows and not v.tolerance else \
        "two runs within tolerance" if v.stage_rows else "no runs (--quick)"
    deps = "; stage deps are exact" if v.code_deps else ""
    out.append(("OK: " if v.ok else "FAILED: ") + (v.first_difference or f"{done}{deps}")
               + (f"  ({timing})" if timing else ""))
    return "\n".join(out)


def _stage_list(stages: set[str]) -> str:
    """Compact: distill@none, distill@teacher -> distill@{none,teacher}."""
    groups: dict[str, list[str]] = {}
    for s in sorted(stages):
        base, _, item = s.partition("@")
        groups.setdefault(base, []).append(item)
    parts = []
    for base, items in groups.items():
        items = [i for i in items if i]
        parts.append(base if not items else f"{base}@{items[0]}" if len(items) == 1
                     else f"{base}@{{{','.join(items)}}}")
    return ", ".join(parts) or "(none)"


def _has_gpu(extra_env: dict[str, str] | None) -> bool:
    if {**os.environ, **(extra_env or {})}.get("CUDA_VISIBLE_DEVICES") == "":
        return False
    try:
        import torch

        return bool(torch.cuda.is_available())
    except Exception:  # noqa: BLE001 - no torch, no GPU
        return False


def verify(src: Path = ROOT, profile: str = "tiny", tolerance: tuple[float, float] | None = None,
           workdir: Path | None = None, keep: bool = False, invalidation: bool = True, reproduce: bool = True,
           echo: Callable[[str], None] = print, extra_env: dict[str, str] | None = None) -> Verdict:
    """Run the whole check; see the module docstring."""
    if reproduce and tolerance is None and _has_gpu(extra_env):
        echo("note: a GPU is visible; bit-for-bit equality is guaranteed on CPU only (see docs/reproducibility.md). "
             "Use --tolerance on GPU, or CUDA_VISIBLE_DEVICES= to check the CPU path.")
    base = Path(tempfile.mkdtemp(prefix="kd-verify-", dir=workdir))
    seconds: dict[str, float] = {}
    stage_rows: list[StageRow] = []
    metric_diffs: list = []
    inval: list[InvalidationRow] = []
    first = None
    try:
        roots = []
        for label, hashseed in (("A", "1"), ("B", "2")) if reproduce else (("A", "1"),):
            root = base / f"run-{label}" / "project"
            env = tool_env({"PYTHONHASHSEED": hashseed, **(extra_env or {})}, root=root)
            make_copy(src, root, profile, env)
            roots.append(root)
            if not reproduce:
                break
            echo(f"run {label}: dvc repro in {root} ...")
            t0 = time.perf_counter()
            log = root.parent / "repro.log"
            res = run(["dvc", "repro"], root, env, log=log, check=False)
            seconds[f"run {label}"] = time.perf_counter() - t0
            if res.returncode != 0:
                tail = "\n  ".join((res.stdout + res.stderr).strip().splitlines()[-25:])
                raise VerifyError(f"run {label}: `dvc repro` failed (exit {res.returncode}); log {log}:\n  {tail}")
            echo(f"run {label}: {len(read_lock(root))} stages in {seconds[f'run {label}']:.0f} s")
        if reproduce:
            stage_rows, metric_diffs, first = compare_projects(roots[0], roots[1], tolerance)
        if not reproduce:  # invalidation only: an up-to-date project without running anything
            placeholder_outputs(roots[0], tool_env(extra_env, root=roots[0]))
        code = check_code_deps(roots[0])
        if invalidation:
            t0 = time.perf_counter()
            inval = check_invalidation(roots[0])
            seconds["invalidation"] = time.perf_counter() - t0
            worst = next((r for r in inval if not r.ok), None)
            if worst and first is None:
                what = (f"missing dep: {', '.join(sorted(worst.missing))} not re-run" if worst.missing else
                        f"extra dep: {', '.join(sorted(worst.extra))} re-run")
                first = f"invalidation of `{worst.change}`: {what}"
        bad_code = next((r for r in code if r.missing), None)
        if bad_code and first is None:
            first = f"stage {bad_code.stage} imports {', '.join(bad_code.missing)} but does not declare it in dvc.yaml"
        return Verdict(first is None, first, stage_rows, metric_diffs, inval, code, tolerance, seconds)
    finally:
        if keep:
            echo(f"kept {base}")
        else:
            shutil.rmtree(base, ignore_errors=True)

"""`kd verify --committed`: re-run a sample of the expensive stages in a fresh clone and compare with the
committed artefacts.

1. clones the repository's committed HEAD into a temp folder (uncommitted edits are not part of "committed");
2. `dvc pull --with-deps <stages>` there: the committed outputs of the sampled stages and everything upstream,
   from the project's DVC remote, or, when none is configured, read-only from this checkout's DVC cache;
3. keeps a copy of the sampled stages' committed outputs, then `dvc repro -f --single-item <stage>` for each;
4. compares output by output. Same bytes: identical. Different bytes where the re-run's environment fingerprint
   (environment/<stage>.json) equals the committed one: a reproducibility defect (exit 1). Different bytes on a
   different environment: a drift report (token agreement of the responses; accuracies with their Wilson
   intervals, paired McNemar p), exit 0: expected drift, measured, not a failure and not a silent rewrite.
The clone and its outputs are then deleted (`--keep` keeps them): nothing is committed or written back.
"""

from __future__ import annotations

import json
import shutil
import tempfile
import time
from dataclasses import dataclass, field
from pathlib import Path
from typing import Callable

from kd.core.environment import ENV_DIR, fingerprint_of
from kd.core.errors import KdError
from kd.harness.dvc_project import ROOT, VerifyError, read_lock, run, tool_env

DEFAULT_STAGES = ("teacher@{first_strategy}", "eval_student@student")


@dataclass
class StageCheck:
    stage: str
    identical: bool
    same_environment: bool | None  # None: nothing recorded on one side
    committed_fp: str | None = None
    rerun_fp: str | None = None
    differing: list[str] = field(default_factory=list)
    drift: dict | None = None
    seconds: float = 0.0

    @property
    def verdict(self) -> str:
        if self.identical:
            return "identical"
        if self.same_environment is None:
            return "drift (committed environment unknown)"
        return "DIFFERS (same environment: a defect)" if self.same_environment else "drift (other environment)"


def _env_file(paths: list[str]) -> str | None:
    """The stage's environment/<name>.json, as its dvc.lock outs name it (eval_kd@none: eval-kd-none.json)."""
    return next((p for p in paths if p.startswith(f"{ENV_DIR}/")), None)


def _stage_outs(lock: dict, stage: str) -> list[str]:
    if stage not in lock:
        raise KdError(f"kd verify --committed: stage {stage!r} is not in the committed dvc.lock "
                      f"(allowed: {', '.join(sorted(lock))})")
    return [o["path"] for o in lock[stage].get("outs", [])]


def _files(path: Path) -> dict[str, bytes]:
    if path.is_file():
        return {"": path.read_bytes()}
    return {str(p.relative_to(path)): p.read_bytes() for p in sorted(path.rglob("*")) if p.is_file()} \
        if path.is_dir() else {}


def _rows(path: Path) -> dict[int, dict]:
    rows = [json.loads(x) for x in path.read_text(encoding="utf-8").splitlines() if x.strip()]
    return {r["id"]: r for r in rows}


def _sequence(row: dict) -> list:
    return row["response_ids"] if "response_ids" in row else row.get("response", "").split()


def drift_report(committed: dict[int, dict], rerun: dict[int, dict]) -> dict:
    """Token agreement and accuracies of two sets of per-question rows (teacher responses or eval samples):
    responses compared token by token (token ids for the teacher, words for eval's text) up to the first
    divergence; accuracies with 95 % Wilson intervals and the paired exact McNemar p-value."""
    from kd.eval.stats import paired_comparison, wilson_interval

    ids = sorted(set(committed) & set(rerun))
    if not ids:
        raise KdError("drift report: the committed and re-run outputs share no question id")
    same = agree = total = 0
    first_div = []
    for i in ids:
        a, b = _sequence(committed[i]), _sequence(rerun[i])
        k = next((j for j, (x, y) in enumerate(zip(a, b)) if x != y), min(len(a), len(b)))
        same += a == b
        agree += k
        total += max(len(a), len(b))
        if a != b:
            first_div.append(k)
    out = {"n": len(ids), "identical_responses": same, "token_agreement": agree / total if total else 1.0,
           "median_first_divergence": sorted(first_div)[len(first_div) // 2] if first_div else None}
    for kind in ("strict", "flexible"):
        key = f"correct_{kind}"
        if not all(key in committed[i] and key in rerun[i] for i in ids):
            continue
        ca = {i: bool(committed[i][key]) for i in ids}
        cb = {i: bool(rerun[i][key]) for i in ids}
        p = paired_comparison(ca, cb)
        ka, kb = sum(ca.values()), sum(cb.values())
        lo, hi = wilson_interval(ka, len(ids))
        out[kind] = {"committed": p["accuracy_a"], "committed_ci95": [lo, hi], "rerun": p["accuracy_b"],
                     "rerun_ci95": list(wilson_interval(kb, len(ids))), "difference": p["accuracy_b"] - p["accuracy_a"],
                     "rerun_inside_committed_ci": lo <= p["accuracy_b"] <= hi, "mcnemar_p": p["mcnemar_p"]}
    return out


def _rows_file(folder: Path) -> Path | None:
    for name in ("responses.jsonl", "samples.jsonl"):
        if (folder / name).is_file():
            return folder / name
    return None


def _source_for_pull(src: Path, clone: Path, env: dict) -> str:
    """The clone's DVC remote: the project's default remote when it has one; else this checkout's cache, read
    only (a DVC 3 cache has a remote's layout)."""
    res = run(["dvc", "remote", "default"], clone, env, check=False)
    if res.returncode == 0 and res.stdout.strip():
        return f"remote {res.stdout.strip()}"
    cache = run(["dvc", "cache", "dir"], src, env).stdout.strip()
    run(["dvc", "remote", "add", "--local", "-d", "kd-source-cache", cache], clone, env)
    return f"the checkout's DVC cache {cache}"


def verify_committed(src: Path = ROOT, stages: list[str] | None = None, workdir: Path | None = None,
                     keep: bool = False, echo: Callable[[str], None] = print) -> list[StageCheck]:
    src = Path(src).resolve()
    base = Path(tempfile.mkdtemp(prefix="kd-verify-committed-", dir=workdir))
    clone = base / "clone"
    try:
        env = tool_env(root=clone)
        run(["git", "clone", "-q", str(src), str(clone)], base, env)
        lock = read_lock(clone)
        if stages is None:
            from kd.config.params import load_config

            first = load_config(clone / "params.yaml").prompting.strategies[0]
            stages = [s.format(first_strategy=first) for s in DEFAULT_STAGES]
        outs = {s: _stage_outs(lock, s) for s in stages}
        where = _source_for_pull(src, clone, env)
        echo(f"clone of HEAD in {clone}; pulling {', '.join(stages)} and their inputs from {where} ...")
        pulled = run(["dvc", "pull", "-q", "--with-deps", *stages], clone, env, check=False,
                     timeout=3600).returncode == 0
        if not pulled:  # a fresh clone with no remote holding the outputs: compare hashes (dvc.lock) and metrics
            echo("could not pull the committed outputs (no DVC remote holds them): recomputing their inputs; "
                 "outputs are compared by their dvc.lock hashes, accuracies by the committed metrics")
        kept = base / "committed"
        for s, paths in outs.items():
            for p in paths:  # what the clone has: pulled outputs, and git-tracked metrics / environment files
                if (clone / p).exists():
                    dest = kept / p
                    dest.parent.mkdir(parents=True, exist_ok=True)
                    (shutil.copytree if (clone / p).is_dir() else shutil.copy2)(clone / p, dest)
        checks = []
        for s in stages:
            if not pulled:  # its outputs gone, `dvc repro` must run it (and whatever upstream is missing)
                for p in outs[s]:
                    if (clone / p).is_dir():
                        shutil.rmtree(clone / p)
                    elif (clone / p).exists():
                        (clone / p).unlink()
            cmd = ["dvc", "repro", "-f", "--single-item", s] if pulled else ["dvc", "repro", s]
            echo(f"{' '.join(cmd)} ...")
            t0 = time.perf_counter()
            res = run(cmd, clone, env, check=False, timeout=4 * 3600)
            if res.returncode != 0:
                tail = "\n  ".join((res.stdout + res.stderr).strip().splitlines()[-20:])
                raise VerifyError(f"`{' '.join(cmd)}` failed in the clone:\n  {tail}")
            checks.append(_compare(s, outs[s], kept, clone, lock, read_lock(clone), time.perf_counter() - t0))
        return checks
    finally:
        if keep:
            echo(f"kept {base}")
        else:
            shutil.rmtree(base, ignore_errors=True)


def _hashes(lock: dict, stage: str) -> dict[str, str]:
    from kd.harness.run_compare import out_hash

    return {o["path"]: out_hash(o) for o in lock.get(stage, {}).get("outs", [])}


def _compare(stage: str, paths: list[str], kept: Path, clone: Path, lock_a: dict, lock_b: dict,
             seconds: float) -> StageCheck:
    differing = []
    ha, hb = _hashes(lock_a, stage), _hashes(lock_b, stage)
    for p in paths:
        if ha.get(p) == hb.get(p):
            continue
        a, b = _files(kept / p), _files(clone / p)
        inner = [f"{p}/{n}".rstrip("/") for n in sorted(set(a) | set(b)) if a.get(n) != b.get(n)] if a else []
        differing += inner or [p]
    env = _env_file(paths)
    fp_a, fp_b = (fingerprint_of(json.loads((r / env).read_text())) if env and (r / env).is_file() else None
                  for r in (kept, clone))
    same_env = None if fp_a is None or fp_b is None else fp_a == fp_b
    # the environment file itself differs exactly when the environment does: not an output difference
    outputs_differ = [d for d in differing if d != env]
    check = StageCheck(stage, not outputs_differ, same_env, fp_a, fp_b, outputs_differ, None, seconds)
    if outputs_differ:
        rows = next((p for p in paths if (kept / p).is_dir() and _rows_file(kept / p)), None)
        if rows is not None:
            check.drift = drift_report(_rows(_rows_file(kept / rows)), _rows(_rows_file(clone / rows)))
        else:  # committed bytes not at hand: accuracies from the committed metrics file, unpaired
            m = next((p for p in paths if p.startswith("results/") and (kept / p).is_file()), None)
            if m is not None:
                check.drift = metrics_drift(json.loads((kept / m).read_text()), json.loads((clone / m).read_text()))
    return check


def metrics_drift(committed: dict, rerun: dict) -> dict:
    """Accuracy committed vs re-run from two metrics files ({n, accuracy_strict, accuracy_flexible}), with 95 %
    Wilson intervals; used when the committed per-question outputs could not be pulled."""
    from kd.eval.stats import wilson_interval

    n_a, n_b = int(committed["n"]), int(rerun["n"])
    out: dict = {"n": n_b, "per_question": False}
    for kind in ("strict", "flexible"):
        a, b = committed.get(f"accuracy_{kind}"), rerun.get(f"accuracy_{kind}")
        if a is None or b is None:
            continue
        lo, hi = wilson_interval(round(a * n_a), n_a)
        out[kind] = {"committed": a, "committed_ci95": [lo, hi], "rerun": b,
                     "rerun_ci95": list(wilson_interval(round(b * n_b), n_b)), "difference": b - a,
                     "rerun_inside_committed_ci": lo <= b <= hi, "mcnemar_p": None}
    return out


def render(checks: list[StageCheck]) -> str:
    lines = ["stage                 verdict                                committed env  re-run env    seconds"]
    for c in checks:
        lines.append(f"{c.stage:<21} {c.verdict:<38} {c.committed_fp or '-':<14} {c.rerun_fp or '-':<13} "
                     f"{c.seconds:.0f}")
    for c in checks:
        if c.differing:
            lines.append(f"\n{c.stage}: differing {', '.join(c.differing[:5])}"
                         + (f" (+{len(c.differing) - 5} more)" if len(c.differing) > 5 else ""))
        if c.drift:
            d = c.drift
            if "token_agreement" in d:
                lines.append(f"  responses identical {d['identical_responses']}/{d['n']}, token agreement "
                             f"{d['token_agreement']:.1%}, median first divergence at token "
                             f"{d['median_first_divergence']}")
            else:
                lines.append("  (committed per-question outputs not pulled: accuracies from the metrics files)")
            for kind in ("strict", "flexible"):
                if kind in d:
                    k = d[kind]
                    lines.append(f"  {kind:<8} committed {k['committed']:.1%} [{k['committed_ci95'][0]:.1%}, "
                                 f"{k['committed_ci95'][1]:.1%}]  re-run {k['rerun']:.1%} [{k['rerun_ci95'][0]:.1%}, "
                                 f"{k['rerun_ci95'][1]:.1%}]  diff {k['difference']:+.1%}  "
                                 f"{'inside' if k['rerun_inside_committed_ci'] else 'OUTSIDE'} the committed "
                                 f"interval" + (f", McNemar p={k['mcnemar_p']:.3g}" if k["mcnemar_p"] is not None else ""))
    if any(not c.identical and c.same_environment for c in checks):
        lines.append("\nFAILED: outputs differ although the environment fingerprint matches the committed one")
    elif all(c.identical for c in checks):
        lines.append("\nOK: the re-run outputs are byte-identical to the committed ones")
    else:
        lines.append("\nDRIFT: this machine's environment differs from the one that made the committed results "
                     "(see environment/*.json); the differences above are measured, nothing was rewritten. "
                     "`dvc pull` gives the committed artefacts without recomputing.")
    return "\n".join(lines)


def exit_code(checks: list[StageCheck]) -> int:
    return 1 if any(not c.identical and c.same_environment for c in checks) else 0

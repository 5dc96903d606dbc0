"""`kd pr-report BASE [HEAD]`: what changed between two commits of the project, and whether it is beyond noise.

Built only from what git holds at the two revisions (`git show REV:path`; no model runs, no DVC cache, no network):
  - params.yaml and strategies.yaml: which params changed (what `dvc params diff BASE HEAD` lists);
  - dvc.lock: which stages re-ran (their lock entry differs), were added or removed, and whether the committed
    dvc.lock was written with the committed params (a stale lock means the results are not from those params);
  - results/eval/<arm>.jsonl (one row per question, written by the eval stages): per arm, accuracy with its 95 %
    Wilson interval at each revision, the change, and the exact McNemar test on the questions both revisions
    scored (kd.eval.stats: the p-value, and the smallest difference those questions detect with 80 % power at the
    observed disagreement). Questions only one revision scored are counted and listed, never silently dropped;
  - results/teacher/<s>.json: the teacher per strategy; metrics/environment.json and environment/*.json: the
    environment fingerprint, a change said in words;
  - reports/distill/*/plots/metrics/train/loss.tsv: the training loss curves.
The Markdown goes to stdout; the two plots (PNG, byte-stable: kd.report.plots) to --plots DIR, linked from it. The
same two revisions give the same bytes (commits are named by their hash; nothing depends on the time or machine).
"""

from __future__ import annotations

import json
import subprocess
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any

import yaml

from kd.core.errors import ArtefactError, KdError

KINDS = ("strict", "flexible")  # the one HEAD's report.primary_metric names decides "beyond noise"
EVAL_DIR = "results/eval"
TEACHER_DIR = "results/teacher"
LOSS_TSV = "plots/metrics/train/loss.tsv"
DISTILL_REPORTS = "reports/distill"
PARAMS_FILES = ("params.yaml", "strategies.yaml")
ALPHA = 0.05
MAX_IDS = 10  # question ids listed in the text, per arm


# ------------------------------------------------------------------------------------------------ git


def _git(root: Path, *args: str, check: bool = True) -> subprocess.CompletedProcess:
    try:
        res = subprocess.run(["git", *args], cwd=root, capture_output=True)
    except OSError as e:
        raise KdError(f"git: could not run it ({e}); kd pr-report reads the two revisions from git") from None
    if check and res.returncode != 0:
        raise KdError(f"git {' '.join(args)}: {res.stderr.decode(errors='replace').strip() or 'failed'}")
    return res


@dataclass
class Rev:
    """One committed revision: its files, read through git."""
    name: str        # as given (BASE / HEAD)
    sha: str
    root: Path
    files: set[str] = field(default_factory=set)

    @classmethod
    def open(cls, root: Path, name: str, role: str) -> "Rev":
        if not name or name.startswith("-"):
            raise KdError(f"{role} {name!r}: not a revision (give a commit, branch or tag, e.g. origin/main)")
        res = _git(root, "rev-parse", "--verify", "--quiet", f"{name}^{{commit}}", check=False)
        if res.returncode != 0:
            raise KdError(f"{role} {name!r}: not a commit in this repository (a shallow clone? CI checkouts need "
                          "the history: actions/checkout with fetch-depth: 0, GIT_DEPTH: 0 on GitLab)")
        sha = res.stdout.decode().strip()
        listing = _git(root, "ls-tree", "-r", "-z", "--name-only", sha).stdout.decode("utf-8", "replace")
        return cls(name, sha, root, {f for f in listing.split("\0") if f})

    @property
    def short(self) -> str:
        return self.sha[:10]

    def where(self, path: str) -> str:
        return f"{self.name}:{path}"

    def read(self, path: str) -> str | None:
        """The file's text at this revision; None when the revision has no such file."""
        if path not in self.files:
            return None
        return _git(self.root, "show", f"{self.sha}:{path}").stdout.decode("utf-8")

    def yaml(self, path: str) -> Any:
        text = self.read(path)
        if text is None:
            return None
        try:
            return yaml.safe_load(text)
        except yaml.YAMLError as e:
            raise ArtefactError(f"{self.where(path)}: not valid YAML ({' '.join(str(e).split())})") from None

    def json(self, path: str) -> Any:
        text = self.read(path)
        if text is None:
            return None
        try:
            return json.loads(text)
        except json.JSONDecodeError as e:
            raise ArtefactError(f"{self.where(path)}: not valid JSON ({e})") from None

    def glob(self, prefix: str, suffix: str) -> list[str]:
        """Names (the part between prefix and suffix) of the files directly under `prefix` ending in `suffix`."""
        out = []
        for f in self.files:
            if f.startswith(prefix) and f.endswith(suffix) and "/" not in f[len(prefix):]:
                out.append(f[len(prefix):len(f) - len(suffix)])
        return sorted(out)


# ------------------------------------------------------------------------------------------------ params


def flatten(obj: Any, prefix: str = "") -> dict[str, Any]:
    """Nested dicts -> {"a.b.c": leaf}; lists are leaves (as `dvc params diff` shows them)."""
    if isinstance(obj, dict):
        out: dict[str, Any] = {}
        for k, v in obj.items():
            out.update(flatten(v, f"{prefix}{k}."))
        return out
    return {prefix[:-1]: obj} if prefix else {}


def params_diff(base: Rev, head: Rev) -> list[tuple[str, Any, Any]]:
    """(file:key, old, new) for every changed, added (old None) or removed (new None) param, sorted."""
    rows = []
    for f in PARAMS_FILES:
        a, b = flatten(base.yaml(f) or {}), flatten(head.yaml(f) or {})
        for k in sorted(set(a) | set(b)):
            if a.get(k, _MISSING) != b.get(k, _MISSING):
                rows.append((f"{f}:{k}" if f != "params.yaml" else k, a.get(k), b.get(k)))
    return rows


_MISSING = object()


# ------------------------------------------------------------------------------------------------ dvc.lock


def lock_stages(rev: Rev) -> dict[str, dict]:
    lock = rev.yaml("dvc.lock")
    if lock is None:
        return {}
    if not isinstance(lock, dict) or not isinstance(lock.get("stages", {}), dict):
        raise ArtefactError(f"{rev.where('dvc.lock')}: not a DVC lock file (no `stages` mapping)")
    return lock.get("stages") or {}


def stage_changes(base: dict[str, dict], head: dict[str, dict]) -> dict[str, list[str]]:
    """Stages whose dvc.lock entry differs (they re-ran: a dep, param or the command changed, and so did or could
    their outputs), added, removed and unchanged."""
    return {"reran": sorted(s for s in set(base) & set(head) if base[s] != head[s]),
            "added": sorted(set(head) - set(base)), "removed": sorted(set(base) - set(head)),
            "unchanged": sorted(s for s in set(base) & set(head) if base[s] == head[s])}


def stale_params(rev: Rev, stages: dict[str, dict]) -> list[tuple[str, str, Any, Any]]:
    """(stage, key, locked value, committed value) where the committed dvc.lock was not written with the committed
    params: the committed results are then not the results of those params (run `dvc repro` and commit)."""
    current = {f: flatten(rev.yaml(f) or {}) for f in PARAMS_FILES}
    out = []
    for s, entry in sorted(stages.items()):
        for f, values in sorted((entry.get("params") or {}).items()):
            have = current.get(f)
            if have is None or not isinstance(values, dict):
                continue
            for k, v in sorted(flatten(values).items()):
                # a locked section (e.g. `distill`) is flattened the same way as the params file
                if k in have and have[k] != v:
                    out.append((s, k, v, have[k]))
    return out


def arm_stages(stages: dict[str, dict]) -> dict[str, str]:
    """arm -> the stage whose outputs hold results/eval/<arm>.jsonl (or its .json)."""
    out = {}
    for s, entry in stages.items():
        for o in entry.get("outs") or []:
            p = o.get("path", "") if isinstance(o, dict) else ""
            for suffix in (".jsonl", ".json"):
                if p.startswith(f"{EVAL_DIR}/") and p.endswith(suffix) and "/" not in p[len(EVAL_DIR) + 1:]:
                    out[p[len(EVAL_DIR) + 1:-len(suffix)]] = s
    return out


# ------------------------------------------------------------------------------------------------ per question


def questions(rev: Rev, arm: str) -> dict[int, dict] | None:
    """results/eval/<arm>.jsonl at `rev`, by id; None when that revision has no per-question file for the arm."""
    from kd.eval.questions import read_question_rows

    path = f"{EVAL_DIR}/{arm}.jsonl"
    text = rev.read(path)
    return None if text is None else read_question_rows(text.splitlines(), rev.where(path))


def _accuracy(rows: dict[int, dict] | None, summary: dict | None, kind: str) -> dict | None:
    """k, n, accuracy and Wilson interval: from the per-question rows, else from results/eval/<arm>.json."""
    from kd.eval.stats import wilson_interval

    if rows is not None:
        k, n = sum(r[f"correct_{kind}"] for r in rows.values()), len(rows)
    elif isinstance(summary, dict) and isinstance(summary.get(f"correct_{kind}"), int) and summary.get("n"):
        k, n = summary[f"correct_{kind}"], summary["n"]
    else:
        return None
    lo, hi = wilson_interval(int(k), int(n))
    return {"k": int(k), "n": int(n), "acc": k / n, "lo": lo, "hi": hi}


def compare_arm(arm: str, base: Rev, head: Rev) -> dict:
    """One arm at both revisions: accuracy per kind at each, and the paired test on the shared questions."""
    from kd.eval.stats import paired_comparison

    qa, qb = questions(base, arm), questions(head, arm)
    sa, sb = base.json(f"{EVAL_DIR}/{arm}.json"), head.json(f"{EVAL_DIR}/{arm}.json")
    out: dict[str, Any] = {"arm": arm, "in_base": qa is not None or sa is not None,
                           "in_head": qb is not None or sb is not None, "per_question": qa is not None and qb is not None}
    out["acc"] = {kind: (_accuracy(qa, sa, kind), _accuracy(qb, sb, kind)) for kind in KINDS}
    if not out["per_question"]:
        return out
    shared = sorted(set(qa) & set(qb))
    out["only_base"], out["only_head"] = sorted(set(qa) - set(qb)), sorted(set(qb) - set(qa))
    out["shared"] = len(shared)
    out["answers_changed"] = sum(1 for i in shared
                                 if any(qa[i].get(k) != qb[i].get(k) for k in set(qa[i]) | set(qb[i])))
    out["paired"] = {}
    if shared:
        for kind in KINDS:
            key = f"correct_{kind}"
            # a = HEAD, b = BASE: only_a = questions HEAD got right and BASE wrong; difference = HEAD - BASE
            out["paired"][kind] = paired_comparison({i: qb[i][key] for i in shared}, {i: qa[i][key] for i in shared})
    return out


# ------------------------------------------------------------------------------------------------ the rest


def teacher_rows(rev: Rev) -> dict[str, dict]:
    out = {}
    for s in rev.glob(f"{TEACHER_DIR}/", ".json"):
        t = rev.json(f"{TEACHER_DIR}/{s}.json")
        if isinstance(t, dict):
            out[s] = t
    return out


def environment(rev: Rev) -> dict:
    """{"headline": metrics/environment.json's fingerprint, "stages": {stage: fingerprint}}."""
    head = rev.json("metrics/environment.json")
    stages = {}
    for s in rev.glob("environment/", ".json"):
        e = rev.json(f"environment/{s}.json")
        if isinstance(e, dict) and isinstance(e.get("fingerprint"), str):
            stages[s] = e["fingerprint"]
    fp = head.get("fingerprint") if isinstance(head, dict) else None
    return {"headline": fp if isinstance(fp, str) else None, "stages": stages}


def loss_curves(rev: Rev) -> dict[str, list[tuple[float, float]]]:
    """Training run name (a strategy, or finetune) -> [(step, loss)] from its committed dvclive TSV."""
    out = {}
    names = sorted({f[len(DISTILL_REPORTS) + 1:].split("/", 1)[0] for f in rev.files
                    if f.startswith(f"{DISTILL_REPORTS}/") and f.endswith(f"/{LOSS_TSV}")})
    for name in names:
        path = f"{DISTILL_REPORTS}/{name}/{LOSS_TSV}"
        if path not in rev.files:
            continue
        pts = []
        lines = (rev.read(path) or "").splitlines()
        for n, line in enumerate(lines[1:], 2):
            cells = line.split("\t")
            try:
                pts.append((float(cells[0]), float(cells[1])))
            except (IndexError, ValueError):
                raise ArtefactError(f"{rev.where(path)}:{n}: expected `step<TAB>loss`") from None
        out[name] = pts
    return out


def arm_order(base: Rev, head: Rev) -> list[str]:
    """Every arm either revision evaluated: the experiment's order (kd.config.arms, HEAD's strategies), then the rest."""
    from kd.config.arms import arm_names

    have = set()
    for rev in (base, head):
        have |= set(rev.glob(f"{EVAL_DIR}/", ".jsonl")) | set(rev.glob(f"{EVAL_DIR}/", ".json"))
    strategies = []
    for rev in (head, base):
        p = rev.yaml("params.yaml")
        s = ((p or {}).get("prompting") or {}).get("strategies") if isinstance(p, dict) else None
        if isinstance(s, list):
            strategies += [x for x in s if isinstance(x, str) and x not in strategies]
    order = [a for a in arm_names(strategies) if a in have]
    return order + sorted(have - set(order))


def analyse(root: str | Path, base_name: str, head_name: str = "HEAD") -> dict:
    root = Path(root)
    if _git(root, "rev-parse", "--is-inside-work-tree", check=False).returncode != 0:
        raise KdError(f"{root}: not a git repository (kd pr-report compares two commits)")
    base, head = Rev.open(root, base_name, "BASE"), Rev.open(root, head_name, "HEAD")
    lb, lh = lock_stages(base), lock_stages(head)
    arms = [compare_arm(a, base, head) for a in arm_order(base, head)]
    stage_of = {**arm_stages(lb), **arm_stages(lh)}
    changes = stage_changes(lb, lh)
    for a in arms:
        s = stage_of.get(a["arm"])
        a["stage"] = s
        a["reran"] = s is not None and s in set(changes["reran"]) | set(changes["added"])
    hp = head.yaml("params.yaml")
    primary = ((hp or {}).get("report") or {}).get("primary_metric") if isinstance(hp, dict) else None
    primary = primary if primary in KINDS else "strict"  # the report's metric named before the run (kd/config/params.py)
    tested = {a["arm"]: a["paired"][primary]["mcnemar_p"] for a in arms if a.get("paired")}
    from kd.eval.stats import holm

    beyond = {k: p <= ALPHA for k, p in holm(tested).items()} if tested else {}
    for a in arms:
        a["beyond_noise"] = beyond.get(a["arm"])
    return {"base": base, "head": head, "kinds": (primary, *[k for k in KINDS if k != primary]), "params": params_diff(base, head), "stages": changes,
            "stale": {"base": stale_params(base, lb), "head": stale_params(head, lh)}, "arms": arms,
            "teacher": (teacher_rows(base), teacher_rows(head)), "env": (environment(base), environment(head)),
            "loss": (loss_curves(base), loss_curves(head)), "has_lock": (bool(lb), bool(lh))}


def write_plots(an: dict, out: Path, prefix: str) -> dict[str, str]:
    """Write accuracy.png and loss.png into `out` (atomically, as one folder); {name: link} for the page."""
    from kd.core.io import atomic_path
    from kd.report.pr_plots import plot_accuracy, plot_loss

    files = {}
    acc = plot_accuracy(an)
    if acc is not None:
        files["accuracy"] = acc
    loss = plot_loss(an)
    if loss is not None:
        files["loss"] = loss
    with atomic_path(out) as tmp:
        tmp.mkdir()
        for name, data in files.items():
            (tmp / f"{name}.png").write_bytes(data)
    return {name: f"{prefix}{name}.png" for name in files}


PLOT_FILES = {"accuracy.png", "loss.png"}


def check_plots_dir(path: str | Path) -> Path:
    """--plots: a folder this command owns (it is replaced as a whole): refuse '.', a file, or a folder holding
    anything but its own PNGs, before any work, so nothing of the user's is lost."""
    p = Path(path)
    if str(path).strip() in (".", "..", "/") or p.resolve() == Path.cwd().resolve() or p.resolve() in Path.cwd().resolve().parents:
        raise KdError(f"--plots {path}: must be a folder of its own (e.g. pr-report), not the current folder "
                      "or above it: it is replaced as a whole")
    if p.exists() and not p.is_dir():
        raise KdError(f"--plots {path}: exists and is not a folder (give a new folder name, e.g. pr-report)")
    if p.is_dir():
        other = sorted(f.name for f in p.iterdir() if f.name not in PLOT_FILES)
        if other:
            raise KdError(f"--plots {path}: holds other files (e.g. {other[0]}); kd pr-report replaces the folder "
                          "as a whole, so it must be new or hold only accuracy.png / loss.png")
    return p


def pr_report(root: str | Path, base: str, head: str = "HEAD", plots_dir: str | Path | None = "pr-report") -> str:
    """The report's Markdown; plots written under `plots_dir` (relative to the current folder; None: no plots)."""
    an = analyse(root, base, head)
    plots = {}
    if plots_dir is not None:
        d = Path(plots_dir)
        plots = write_plots(an, d, "" if str(d) in ("", ".") else f"{d.as_posix().rstrip('/')}/")
    from kd.report.pr_render import render

    return render(an, plots)

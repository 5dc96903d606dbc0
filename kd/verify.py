"""Reproducibility and reliability checks: `kd verify` (CI) and `kd repro` (validate, then `dvc repro`).

`kd verify`
  1. copies the project twice into temporary folders: the files git tracks plus untracked, not-ignored ones (your
     working tree, uncommitted edits included), never a stage output or dvc.lock; params.yaml is
     the profile (kd.profiles); each copy gets its own git repository and a fresh, empty DVC cache;
  2. runs `dvc repro` in each, one after the other, with different PYTHONHASHSEEDs and paths (so a set-order or an
     absolute path leaking into an output shows up);
  3. compares dvc.lock stage by stage (the hash of every output) and every metrics file value by value; a differing
     folder is opened to name the first differing file;
  4. checks invalidation: applies each change of INVALIDATION (hand-written: change -> stages that must re-run) to
     copy A and asks DVC which stages are now out of date (`dvc status`: the stages a change reaches directly; the
     rest follow from their deps); and checks that every kd module a stage imports is a declared dep (CODE_DEPS_OK
     lists the deliberate exceptions).
  It prints the tables and exits 1 naming the first difference (2 for a usage/setup error).

`kd repro [DVC ARGS]`
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
import fnmatch
import json
import math
import os
import re
import shutil
import subprocess
import sys
import tempfile
import time
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any, Callable, Iterable

import yaml

from kd.errors import KdError

ROOT = Path(__file__).resolve().parents[1]

# What `kd verify --tolerance` allows between two runs (printed with the result). Structural counts stay exact.
DEFAULT_RTOL = 1e-2
DEFAULT_ATOL = 1e-2
EXACT_KEYS = {"n", "steps", "examples", "epochs", "trainable_params", "skipped"}


class VerifyError(KdError):
    """Setup failed (copy, git, dvc): not a reproducibility verdict."""


# ------------------------------------------------------------------------------------------ environment


def tool_env(extra: dict[str, str] | None = None, root: Path | None = None) -> dict[str, str]:
    """Environment for git/dvc/stage subprocesses: this interpreter's bin first on PATH (so `python` and `dvc` are
    the venv's), no analytics, a git identity, offline hub. With `root`, that project's `kd` comes first on
    PYTHONPATH: stage scripts would otherwise import the installed kd-prime (an editable install points at the
    checkout it was installed from), not the copy's code that DVC hashes."""
    env = dict(os.environ)
    if root is not None:
        env["PYTHONPATH"] = os.pathsep.join([str(root), *filter(None, [env.get("PYTHONPATH")])])
    env["PATH"] = f"{Path(sys.executable).parent}{os.pathsep}{env.get('PATH', '')}"
    env.update({"DVC_NO_ANALYTICS": "1", "HF_HUB_OFFLINE": "1", "TOKENIZERS_PARALLELISM": "false",
                "GIT_AUTHOR_NAME": "kd verify", "GIT_AUTHOR_EMAIL": "kd@verify",
                "GIT_COMMITTER_NAME": "kd verify", "GIT_COMMITTER_EMAIL": "kd@verify",
                "GIT_CONFIG_NOSYSTEM": "1"})
    env.pop("VIRTUAL_ENV_PROMPT", None)
    if extra:
        env.update(extra)
    return env


def run(cmd: list[str], cwd: Path, env: dict[str, str], log: Path | None = None, check: bool = True,
        timeout: float | None = None) -> subprocess.CompletedProcess:
    """Run an argument list (never a shell string); on failure raise VerifyError with the output's tail."""
    res = subprocess.run(cmd, cwd=cwd, env=env, capture_output=True, text=True, timeout=timeout)
    if log is not None:
        with open(log, "a", encoding="utf-8") as f:
            f.write(f"$ {' '.join(cmd)}\n{res.stdout}{res.stderr}\n")
    if check and res.returncode != 0:
        tail = (res.stdout + res.stderr).strip().splitlines()[-25:]
        raise VerifyError(f"`{' '.join(cmd)}` failed in {cwd} (exit {res.returncode}):\n  " + "\n  ".join(tail))
    return res


# ------------------------------------------------------------------------------------------ project copy


def output_prefixes(root: Path) -> list[str]:
    """Paths (files, or folders ending in /) that stages produce, from dvc.yaml: never copied into a fresh project."""
    data = yaml.safe_load((root / "dvc.yaml").read_text(encoding="utf-8")) or {}
    out = {"dvc.lock", ".kd-work/"}
    for stage in (data.get("stages") or {}).values():
        body = stage.get("do", stage)
        for kind in ("outs", "metrics", "plots"):
            for entry in body.get(kind) or []:
                path = next(iter(entry)) if isinstance(entry, dict) else entry
                if "${" in path:  # templated: everything under the folder before the first ${
                    path = path[:path.index("${")].rsplit("/", 1)[0] + "/"
                out.add(path)
    return sorted(out)


def project_files(root: Path) -> list[str]:
    """Files of the project as a user has it: git-tracked + untracked-not-ignored, minus stage outputs."""
    try:
        names = subprocess.run(["git", "ls-files", "-co", "--exclude-standard", "-z"], cwd=root,
                               capture_output=True, text=True, check=True).stdout.split("\0")
    except (OSError, subprocess.CalledProcessError):
        raise VerifyError(f"{root}: not a git checkout; `kd verify` copies the files git knows about") from None
    skip = output_prefixes(root)

    def produced(name: str) -> bool:
        return any(name == p or (p.endswith("/") and name.startswith(p)) or name.startswith(p + "/")
                   for p in skip)

    return sorted(n for n in names if n and not produced(n) and (root / n).is_file() and not n.startswith(".git/"))


def make_copy(src: Path, dest: Path, profile: str | None = "tiny", env: dict[str, str] | None = None,
              params: dict | None = None) -> Path:
    """A fresh project at `dest`: the project's files, params.yaml from the profile (kd.profiles; or `params`), a git
    repo with one commit (dvclive wants one) and an empty DVC cache inside the copy."""
    env = env or tool_env()
    dest.mkdir(parents=True, exist_ok=True)
    for name in project_files(src):
        (dest / name).parent.mkdir(parents=True, exist_ok=True)
        shutil.copy2(src / name, dest / name)
    if params is not None:
        (dest / "params.yaml").write_text(yaml.safe_dump(params, sort_keys=False), encoding="utf-8")
    elif profile is not None:
        from kd.profiles import render

        (dest / "params.yaml").write_text(render(profile, src), encoding="utf-8")
    run(["git", "init", "-q"], dest, env)
    if not (dest / ".dvc").is_dir():
        run(["dvc", "init", "-q"], dest, env)
    run(["dvc", "config", "--local", "core.analytics", "false"], dest, env)
    run(["dvc", "config", "--local", "cache.dir", str(dest / ".dvc" / "cache")], dest, env)
    run(["git", "add", "-A"], dest, env)
    run(["git", "commit", "-qm", "kd verify: project copy"], dest, env)
    return dest


def placeholder_outputs(root: Path, env: dict[str, str] | None = None) -> None:
    """Make the project look fully run without running anything: every stage dep and output that does not exist
    becomes a placeholder file or folder, then `dvc commit -f` records them in dvc.lock. For checks that need an
    up-to-date project but not real outputs (invalidation, bad-input and restore tests), in seconds."""
    from dvc.repo import Repo

    def make(path: Path, text: str) -> None:
        if path.exists():
            return
        if path.suffix:
            path.parent.mkdir(parents=True, exist_ok=True)
            path.write_text(text, encoding="utf-8")
        else:
            path.mkdir(parents=True, exist_ok=True)
            (path / "placeholder").write_text(text, encoding="utf-8")

    with Repo(str(root)) as repo:
        for stage in repo.index.stages:
            for dep in stage.deps:
                make(Path(dep.fs_path), "placeholder\n")
            for out in stage.outs:
                make(Path(out.fs_path), "{}\n" if Path(out.fs_path).suffix == ".json" else "placeholder\n")
    run(["dvc", "commit", "-f", "-q"], root, env or tool_env())


# ------------------------------------------------------------------------------------------ comparison


def read_lock(root: Path) -> dict[str, dict]:
    path = root / "dvc.lock"
    if not path.exists():
        raise VerifyError(f"{path}: missing (did `dvc repro` run?)")
    return (yaml.safe_load(path.read_text(encoding="utf-8")) or {}).get("stages", {})


def _out_hash(out: dict) -> str:
    return str(out.get("md5") or out.get("etag") or out.get("checksum") or out.get("hash"))


@dataclass
class StageRow:
    stage: str
    outs: list[str]
    identical: bool
    differing: list[str] = field(default_factory=list)  # "path" or "path: file inside it"


def _file_hashes(folder: Path) -> dict[str, str]:
    from kd.io import sha256_file

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
            if path not in outs_a or path not in outs_b or _out_hash(outs_a[path]) != _out_hash(outs_b[path]):
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
    return sorted(str(p.relative_to(root)) for p in (root / "metrics").rglob("*.json")) if (root / "metrics").is_dir() \
        else []


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


# ------------------------------------------------------------------------------------------ invalidation


@dataclass(frozen=True)
class Change:
    """One edit to a fresh, up-to-date project and the stages it must invalidate directly.

    target: a params.yaml key (dotted), `strategies.yaml:<name>` (that strategy's template) or a file path (a comment
    line is appended). expect: stage patterns that must be out of date afterwards (`distill@*` = every strategy;
    `eval@kd-*` = every kd- model). tolerated: stages that also go out of date because DVC can only declare params
    per stage, not per matrix item (reported, not a failure). Anything else out of date is an extra dep; anything
    expected but up to date a missing one."""
    target: str
    value: Any = None
    expect: tuple[str, ...] = ()
    tolerated: tuple[str, ...] = ()
    why: str = ""


S_ALL = ("teacher@*", "logits@*", "distill@*")
EVAL_STUDENTS = ("eval_student@*", "eval_finetune", "eval_kd@*")  # every arm over the student's weights
EVAL_ALL = ("eval_teacher", *EVAL_STUDENTS)
TRAIN_ALL = ("distill@*", "finetune")
ATTN_ALL = ("attention_student", "attention_finetune", "attention_kd@*")  # every student arm's attention
# Hand-written, from what each stage's code reads (not from dvc.yaml: the point is to catch a dep missing there).
INVALIDATION: list[Change] = [
    Change("seed", 7, ("prepare", *S_ALL, "finetune", *EVAL_ALL, *ATTN_ALL, "report"),
           why="splits, generation, LoRA init, data order"),
    Change("alpha", 0.3, ("distill@*", "report")),
    Change("temperature", 2.0, ("distill@*", "report")),
    Change("prepare.source", "jsonl:tests/data/gsm8k/", ("prepare",)),
    Change("prepare.transfer_size", 6, ("prepare",)),
    Change("prepare.validation_size", 3, ("prepare",)),
    Change("prepare.eval_size", 6, ("prepare",)),
    Change("tests/data/gsm8k/train.jsonl", None, ("prepare",), why="the jsonl source of the tiny profile"),
    Change("prompting.instruction", "Answer with '#### <number>'.",
           ("teacher@*", *TRAIN_ALL, *EVAL_ALL, *ATTN_ALL, "report")),
    Change("strategies.yaml:teacher", "Teach: {question}", ("teacher@teacher",),
           why="only the teacher@<s> of the edited strategy"),
    Change("strategies.yaml:gold_hint", "Hint {answer}: {question}", (), why="a strategy the profile does not run"),
    Change("teacher.model", "tiny-student", ("model@teacher", "teacher@*", "report")),
    Change("teacher.dtype", "float32", ("model@teacher", "teacher@*", "logits@*", "eval_teacher", "report")),
    Change("teacher.max_new_tokens", 12, ("teacher@*", "report")),
    Change("teacher.batch_size", 2, ("teacher@*",), why="left padding changes bf16 numerics"),
    Change("teacher.quantization", "bnb-4bit", ("teacher@*", "logits@*"), why="the stages that load the teacher"),
    Change("teacher.trust_remote_code", True, ("model@teacher", "teacher@*", "logits@*", "eval_teacher", "report"),
           why="the report states it"),
    Change("student.model", "tiny-teacher", ("model@student", *TRAIN_ALL, "report")),
    Change("student.dtype", "float32", ("model@student", *TRAIN_ALL, *EVAL_STUDENTS, *ATTN_ALL, "report")),
    Change("logits.format", "full", ("logits@*", "report")),
    Change("logits.top_k", 8, ("logits@*",), why="read only for format topk, but part of the stage's params"),
    Change("logits.shard_rows", 2, ("logits@*",)),
    Change("distill.loss", "forward_kl", ("distill@*", "report")),
    Change("distill.hard_target", "gold", ("distill@*", "report")),
    Change("distill.response_filter", "finished", ("distill@*", "report")),
    Change("distill.epochs", 1, (*TRAIN_ALL, "report")),
    Change("distill.lr", 0.01, (*TRAIN_ALL, "report")),
    Change("distill.lora.r", 2, (*TRAIN_ALL, "report")),
    Change("distill.checkpoint_every", 2, TRAIN_ALL, why="part of the resume fingerprint"),
    Change("distill.momentum", 0.5, (*TRAIN_ALL, "report")),
    Change("eval.limit", 4, EVAL_ALL),
    Change("eval.max_new_tokens", 12, (*EVAL_ALL, "report")),
    Change("eval.batch_size", 2, EVAL_ALL),
    Change("report.attention_prompts", 1, (*ATTN_ALL, "report")),
    Change("tune.n_trials", 5, (), why="kd tune's own section: no stage reads it"),
    Change("kd/tune.py", None, (), why="kd tune only; its results reach the pipeline through kd tune --apply"),
    Change("kd/loss.py", None, TRAIN_ALL),
    Change("kd/answers.py", None, ("prepare", "teacher@*")),
    Change("kd/tasks/gsm8k_kd.yaml", None, ("prepare", "teacher@*", *EVAL_ALL),
           why="eval's task, and the answer filters kd/answers.py reads from it"),
    Change("kd/models.yaml", None, ("model@*",)),
    Change("kd/attention.py", None, ATTN_ALL),
    Change("compute.portable", True, (*S_ALL, "finetune", *EVAL_ALL, *ATTN_ALL),
           why="ISA caps for every stage that runs model math"),
    Change("kd/environment.py", None, (*S_ALL, "finetune", *EVAL_ALL, "report")),
    Change("kd/portable.py", None, (*S_ALL, "finetune", *EVAL_ALL, *ATTN_ALL)),
]

# kd modules a stage may import without declaring them: shared plumbing that validates input or writes files the same
# way for every stage. Declaring them everywhere would make any edit to them re-run the whole (hours-long) pipeline;
# their behaviour is pinned by the unit tests and by `kd verify`'s two-run comparison instead.
# kd/names.py only accepts or refuses a name (it never changes an output), like params.py's validation.
CODE_DEPS_OK = {"kd/__init__.py", "kd/errors.py", "kd/io.py", "kd/params.py", "kd/cli_util.py", "kd/names.py"}
# Per stage: modules its imports reach that cannot change its output (module -> why). Empty: every stage declares
# exactly what it imports.
STAGE_CODE_DEPS_OK: dict[str, dict[str, str]] = {}


def expand(patterns: Iterable[str], stages: Iterable[str]) -> set[str]:
    stages = list(stages)
    out = set()
    for pat in patterns:
        hits = fnmatch.filter(stages, pat)
        if not hits and "*" not in pat:
            hits = [pat]  # a named stage that does not exist: reported as missing
        out.update(hits)
    return out


def _set_key(data: dict, dotted: str, value: Any) -> None:
    keys = dotted.split(".")
    node = data
    for k in keys[:-1]:
        node = node[k]
    if keys[-1] not in node:
        raise VerifyError(f"invalidation table: params.yaml has no key {dotted!r}")
    node[keys[-1]] = value


@contextlib.contextmanager
def applied(root: Path, change: Change):
    """Apply `change` to the project at `root`; restore the edited file's bytes afterwards."""
    if change.target.startswith("strategies.yaml:"):
        path, name = root / "strategies.yaml", change.target.split(":", 1)[1]
    elif "/" in change.target or change.target.endswith((".py", ".yaml", ".jsonl")):
        path, name = root / change.target, None
    else:
        path, name = root / "params.yaml", None
    original = path.read_bytes()
    try:
        if path.name == "params.yaml":
            data = yaml.safe_load(original)
            _set_key(data, change.target, change.value)
            path.write_text(yaml.safe_dump(data, sort_keys=False), encoding="utf-8")
        elif name is not None:
            data = yaml.safe_load(original)
            data[name]["template"] = change.value
            path.write_text(yaml.safe_dump(data, sort_keys=False), encoding="utf-8")
        elif path.suffix == ".jsonl":
            rows = original.decode("utf-8").splitlines(keepends=True)
            path.write_bytes("".join(rows[1:] + rows[:1]).encode("utf-8"))  # same rows, other order
        else:
            path.write_bytes(original + b"\n# kd verify: invalidation probe\n")
        yield
    finally:
        path.write_bytes(original)


def stale_stages(root: Path) -> set[str]:
    """Stages `dvc status` reports out of date (directly: their own deps, params or outs changed)."""
    from dvc.repo import Repo

    with Repo(str(root)) as repo:  # keys are "<path to dvc.yaml>:<stage>" when cwd is elsewhere
        return {name.rsplit("dvc.yaml:", 1)[-1] for name in repo.status()}


@dataclass
class InvalidationRow:
    change: str
    expected: set[str]
    actual: set[str]
    tolerated: set[str]

    @property
    def missing(self) -> set[str]:
        return self.expected - self.actual

    @property
    def extra(self) -> set[str]:
        return self.actual - self.expected - self.tolerated

    @property
    def ok(self) -> bool:
        return not self.missing and not self.extra


def check_invalidation(root: Path, changes: list[Change] | None = None) -> list[InvalidationRow]:
    """Apply each change to an up-to-date project and compare the stages DVC reports out of date with the table."""
    before = stale_stages(root)
    if before:
        raise VerifyError(f"{root}: not up to date before the invalidation check ({', '.join(sorted(before))})")
    stages = list(read_lock(root))
    rows = []
    for change in INVALIDATION if changes is None else changes:
        with applied(root, change):
            actual = stale_stages(root)
        label = change.target + ("" if change.value is None else f" -> {change.value!r}")
        rows.append(InvalidationRow(label, expand(change.expect, stages), actual, expand(change.tolerated, stages)))
    after = stale_stages(root)
    if after:
        raise VerifyError(f"{root}: the invalidation probes left {', '.join(sorted(after))} out of date")
    return rows


# ------------------------------------------------------------------------------------------ code deps


def _imports(path: Path, root: Path) -> set[str]:
    """kd modules (as repo-relative .py paths) that `path` imports anywhere (top level or inside functions)."""
    import ast

    tree = ast.parse(path.read_text(encoding="utf-8"), filename=str(path))
    found: set[str] = set()

    def add(module: str) -> None:
        parts = module.split(".")
        if parts[0] != "kd":
            return
        for i in range(2, len(parts) + 1):  # kd.tasks.x -> kd/tasks/x.py or kd/tasks/__init__.py
            f = root.joinpath(*parts[:i]).with_suffix(".py")
            if f.exists():
                found.add(str(f.relative_to(root)))

    for node in ast.walk(tree):
        if isinstance(node, ast.Import):
            for a in node.names:
                add(a.name)
        elif isinstance(node, ast.ImportFrom) and node.module and node.level == 0:
            add(node.module)
            for a in node.names:
                add(f"{node.module}.{a.name}")
    return found


def stage_imports(script: Path, root: Path) -> set[str]:
    """The kd modules a stage script reaches, following imports transitively but not through CODE_DEPS_OK."""
    seen: set[str] = set()
    todo = [script]
    while todo:
        for mod in _imports(todo.pop(), root):
            if mod not in seen:
                seen.add(mod)
                if mod not in CODE_DEPS_OK:
                    todo.append(root / mod)
    return seen


@dataclass
class CodeDepRow:
    stage: str
    script: str
    missing: list[str]      # imported, not declared
    unused: list[str]       # declared kd/*.py that the script never imports


def check_code_deps(root: Path) -> list[CodeDepRow]:
    """For each stage of dvc.yaml: its script's transitive kd imports vs. the .py deps it declares."""
    data = yaml.safe_load((root / "dvc.yaml").read_text(encoding="utf-8"))
    rows = []
    for name, stage in data["stages"].items():
        body = stage.get("do", stage)
        m = re.match(r"python -m (stages\.\w+)", body["cmd"])
        if not m:
            continue
        script = m.group(1).replace(".", "/") + ".py"
        deps = {d for d in body.get("deps", []) if isinstance(d, str)}
        imported = stage_imports(root / script, root)
        missing = sorted(imported - deps - CODE_DEPS_OK - set(STAGE_CODE_DEPS_OK.get(name, {})))
        unused = sorted(d for d in deps if d.startswith("kd/") and d.endswith(".py") and d not in imported)
        if script not in deps:
            missing.insert(0, script)
        rows.append(CodeDepRow(name, script, missing, unused))
    return rows


# ------------------------------------------------------------------------------------------ kd verify


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
            out.append(f"Metrics: every value in metrics/**/*.json {ident}.")
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
    out.append(("OK: " if v.ok else "FAILED: ") + (v.first_difference or f"{done}; stage deps are exact")
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


# ------------------------------------------------------------------------------------------ kd repro


def preflight(root: Path = Path("."), params_path: str | Path = "params.yaml") -> dict:
    """Every check that is cheap and needs no model: params (types, ranges, choices, unknown keys), strategies.yaml
    templates, model specs, the dataset when it is local (rows parse, answers parse, sizes fit), and the teacher and
    student tokenizers when both folders are already materialised from the current specs. Raises KdError naming the
    key or file; returns the validated params."""
    from kd.params import load_params

    root = Path(root)
    p = load_params(root / params_path, root=root)
    src = p["prepare"]["source"]
    from kd.models import load_registry

    registry = load_registry()
    if src.startswith("pypi:") or any(registry.get(p[r]["model"], {}).get("source") not in (None, "random")
                                      for r in ("teacher", "student")):
        from kd.io import cache_root

        cache_root()  # $KD_CACHE: a download will need it
    if src.startswith("pypi:"):
        from kd.data import pinned_sha256

        pinned_sha256(src[len("pypi:"):])  # only pinned wheels are ever opened
    if src.startswith("jsonl:"):
        from kd.data import load_source, make_splits

        cfg = p["prepare"]
        make_splits(load_source(src, root), cfg["transfer_size"], cfg["validation_size"], cfg["eval_size"],
                    p["seed"], src)
    specs = {}
    for role in ("teacher", "student"):
        summary = root / "models" / role / "kd_model.json"
        with contextlib.suppress(OSError, ValueError):
            specs[role] = json.loads(summary.read_text(encoding="utf-8")).get("spec")
    if specs.get("teacher") == p["teacher"]["model"] and specs.get("student") == p["student"]["model"]:
        from kd.vocab import check_same_vocab

        try:
            check_same_vocab(root / "models/teacher", root / "models/student",
                             trust_remote_code=p["teacher"]["trust_remote_code"] and p["student"]["trust_remote_code"])
        except KdError as e:
            raise KdError(f"params `teacher.model` / `student.model`: {e}") from None
    from kd.prompting import check_context

    check_context(p, root, current_only=True)  # instruction/templates vs the materialised models' context sizes
    return p


def stage_outputs(root: Path) -> dict[str, list[str]]:
    """stage name -> its outputs (cached or not), relative to the project root."""
    from dvc.repo import Repo

    base = root.resolve()
    with Repo(str(root)) as repo:
        return {s.addressing: sorted(str(Path(o.fs_path).relative_to(base)) for o in s.outs)
                for s in repo.index.stages}


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
            # `dvc repro` with upstream's fix for dry runs over not-yet-produced deps (kd/dvc_compat.py)
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

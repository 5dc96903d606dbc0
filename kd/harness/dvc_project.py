"""A DVC project seen from outside, as `kd verify`, `kd repro` and the tests drive it: the environment for git/dvc
subprocesses, running a command, a fresh copy of the project (its own git repo and DVC cache), placeholder outputs,
and what dvc.lock / `dvc status` / dvc.yaml say about its stages."""

from __future__ import annotations

import os
import shutil
import subprocess
import sys
from pathlib import Path

import yaml

from kd.core.errors import KdError
from kd.core.paths import SOURCE_ROOT

ROOT = SOURCE_ROOT


def project_root() -> Path:
    """The project a `kd` command acts on: the current folder when it holds dvc.yaml, else the checkout kd runs from."""
    return Path.cwd() if (Path.cwd() / "dvc.yaml").exists() else ROOT


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
    """A fresh project at `dest`: the project's files, params.yaml from the profile (kd.config.profiles; or `params`), a git
    repo with one commit (dvclive wants one) and an empty DVC cache inside the copy."""
    env = env or tool_env()
    dest.mkdir(parents=True, exist_ok=True)
    from kd.core.guard import VALIDATED

    # stage outputs are not copied, except stage validate's: committed, as a clone has it (stages/validate.py)
    for name in [*project_files(src), *([str(VALIDATED)] if (src / VALIDATED).is_file() else [])]:
        (dest / name).parent.mkdir(parents=True, exist_ok=True)
        shutil.copy2(src / name, dest / name)
    if params is not None:
        (dest / "params.yaml").write_text(yaml.safe_dump(params, sort_keys=False), encoding="utf-8")
    elif profile is not None:
        from kd.config.profiles import render

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


# ------------------------------------------------------------------------------------------ what DVC records


def read_lock(root: Path) -> dict[str, dict]:
    path = root / "dvc.lock"
    if not path.exists():
        raise VerifyError(f"{path}: missing (did `dvc repro` run?)")
    try:
        data = yaml.safe_load(path.read_text(encoding="utf-8")) or {}
    except (yaml.YAMLError, UnicodeDecodeError) as e:
        mark = getattr(e, "problem_mark", None)
        where = f" (line {mark.line + 1}, column {mark.column + 1})" if mark else ""
        raise VerifyError(f"{path}: not valid YAML{where}; put back the committed one (`git checkout dvc.lock`) "
                          "or re-run the stages it records (`dvc repro`)") from None
    if not isinstance(data, dict) or not isinstance(data.get("stages", {}), dict):
        raise VerifyError(f"{path}: not a DVC lock file (no `stages:` mapping); `git checkout dvc.lock` puts it back")
    return data.get("stages", {})


def stale_stages(root: Path) -> set[str]:
    """Stages `dvc status` reports out of date (directly: their own deps, params or outs changed)."""
    from dvc.repo import Repo

    with Repo(str(root)) as repo:  # keys are "<path to dvc.yaml>:<stage>" when cwd is elsewhere
        return {name.rsplit("dvc.yaml:", 1)[-1] for name in repo.status()}


def stage_outputs(root: Path) -> dict[str, list[str]]:
    """stage name -> its outputs (cached or not), relative to the project root."""
    from dvc.repo import Repo

    base = root.resolve()
    with Repo(str(root)) as repo:
        return {s.addressing: sorted(str(Path(o.fs_path).relative_to(base)) for o in s.outs)
                for s in repo.index.stages}

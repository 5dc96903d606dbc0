"""Stage scripts run in the test process: the same code DVC runs, without a subprocess."""

from __future__ import annotations

import functools
import importlib.util
import os
import shutil
import subprocess
import sys
from pathlib import Path

import yaml

from kd.config.profiles import load as load_profile

ROOT = Path(__file__).resolve().parents[1]


def load_stage(name: str, tag: str):
    """A fresh module object of stages/<name>.py (named stage_<name>_<tag>): tests patch its loaders freely."""
    spec = importlib.util.spec_from_file_location(f"stage_{name}_{tag}", ROOT / "stages" / f"{name}.py")
    mod = importlib.util.module_from_spec(spec)
    spec.loader.exec_module(mod)
    return mod


@functools.cache
def cached_stage(name: str, tag: str):
    """load_stage, once per (name, tag): a test module's own copy of a stage module, shared by its tests."""
    return load_stage(name, tag)


def in_process(root: Path, name: str, *args: str) -> None:
    """Run stages/<name>.py's command in `root`, from a freshly loaded module (no state shared between tests)."""
    mod = load_stage(name, "in_process")
    cwd = os.getcwd()
    os.chdir(root)
    try:
        mod.main.main(args=list(args), standalone_mode=False)
    finally:
        os.chdir(cwd)


def run_cmd(cmd: list[str], cwd: Path, env: dict) -> str:
    """Run a command (DVC, git) in a project copy; fail the test with its output's tail when it fails."""
    res = subprocess.run(cmd, cwd=cwd, env=env, capture_output=True, text=True)
    assert res.returncode == 0, f"{' '.join(cmd)} failed:\n{res.stdout[-3000:]}\n{res.stderr[-3000:]}"
    return res.stdout + res.stderr


def tiny_copy(root: Path, strategies: list[str], edit=None) -> dict:
    """A copy of the project's files in `root` with the tiny profile's params (`strategies`; `edit(params)` may
    change them); returns the params written."""
    files = subprocess.run(["git", "ls-files", "-co", "--exclude-standard"], cwd=ROOT, capture_output=True,
                           text=True, check=True).stdout.split()
    for f in files:
        if not f.startswith(("metrics/", "reports/", "dvc.lock")) and (ROOT / f).is_file():
            (root / f).parent.mkdir(parents=True, exist_ok=True)
            shutil.copy2(ROOT / f, root / f)
    params = load_profile("tiny", ROOT)
    params["prompting"]["strategies"] = strategies
    if edit:
        edit(params)
    (root / "params.yaml").write_text(yaml.safe_dump(params, sort_keys=False))
    return params


def dvc_project(root: Path, strategies: list[str]) -> tuple[Path, dict, str]:
    """A git + DVC copy of the project on the tiny profile with `strategies`, after a real `dvc repro`, committed.
    Returns (root, env for DVC/git commands, the repro's output)."""
    tiny_copy(root, strategies)
    env = {**os.environ, "PATH": f"{Path(sys.executable).parent}{os.pathsep}{os.environ['PATH']}",
           "DVC_NO_ANALYTICS": "1", "GIT_AUTHOR_NAME": "t", "GIT_AUTHOR_EMAIL": "t@t",
           "GIT_COMMITTER_NAME": "t", "GIT_COMMITTER_EMAIL": "t@t"}
    run_cmd(["git", "init", "-q"], root, env)
    if not (root / ".dvc").exists():
        run_cmd(["dvc", "init", "-q"], root, env)
    run_cmd(["dvc", "config", "core.analytics", "false"], root, env)
    run_cmd(["git", "add", "-A"], root, env)
    run_cmd(["git", "commit", "-qm", "project"], root, env)  # dvclive refuses a repo without commits
    out = run_cmd(["dvc", "repro"], root, env)
    run_cmd(["git", "add", "-A"], root, env)
    run_cmd(["git", "commit", "-qm", "tiny run"], root, env)
    return root, env, out


def fresh_clone(tmp: Path) -> tuple[Path, dict]:
    """A git repository holding the project with the tiny profile and no outputs, and a fresh clone of it."""
    from kd.harness.dvc_project import make_copy, tool_env

    env = tool_env()
    make_copy(ROOT, tmp / "origin", profile="tiny", env=env)
    run_cmd(["git", "clone", "-q", str(tmp / "origin"), str(tmp / "clone")], tmp, env)
    clone = tmp / "clone"
    return clone, tool_env(root=clone)  # `python -m kd...` and the stages import the clone's kd

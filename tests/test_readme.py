"""The README cannot drift: every `dvc ...` and `kd ...` command in its fenced code blocks runs here, on a fresh
`git clone` of the tiny profile with nothing computed, and must exit 0, unless SKIP lists it with the reason (it
runs the pipeline or needs a GPU). So a new README command is tested by default; a SKIP entry the README no longer
has fails too."""

from __future__ import annotations

import re
import shlex
import subprocess
import sys
from pathlib import Path

import pytest

from test_dvc_interface import fresh_clone

ROOT = Path(__file__).resolve().parents[1]
pytestmark = pytest.mark.slow

# command (as written in the README, comments and `&&` split off) -> why it is not run here
SKIP = {
    "dvc repro": "runs the whole pipeline (the real default: 1.6 GB, ~30 min; tests/test_pipeline.py runs the tiny one)",
    "kd verify": "two full tiny pipeline runs (~3-5 min); CI runs it (.ci/run)",
    "kd verify --tolerance": "two full pipeline runs, meant for a GPU",
    "kd repro": "runs the whole pipeline (kd repro --dry is run)",
    "dvc exp run -S alpha=0.61 -S temperature=2.0": "runs distill, eval and report (tests/test_pipeline.py runs "
                                                    "`dvc exp run -S alpha=0.3` on the tiny profile)",
    "dvc exp run -S alpha=0.61": "re-runs distill, eval_kd, attention_kd and report of the real default (its output is "
                                 "shown; tests/test_pipeline.py runs `dvc exp run -S alpha=0.3` on the tiny profile)",
    "dvc repro logits@none model@student": "runs stages (tests/test_tune.py builds a tiny project in-process)",
    "kd bench": "a benchmark (minutes); tests/test_bench.py runs it on the tiny pair",
    "kd bench --profile tiny --threads 1": "a benchmark (minutes); tests/test_bench.py runs it on the tiny pair",
    "kd verify --committed": "re-runs sampled stages of the committed default against its committed outputs (real "
                             "models; tests/test_shared_artefacts.py runs it on a tiny project)",
    "kd tune": "needs teacher signal and student; trains (tests/test_tune.py runs tiny studies)",
    "kd tune --apply": "needs a study's metrics/tune.json (tests/test_tune.py applies one and checks dvc status)",
    "dvc queue start -j 2": "runs the queued experiments' pipelines (tests/test_tune.py checks the queueing)",
    "dvc exp run --run-all -j 1": "runs the queued experiments (tests/test_queue.py runs two on the tiny profile)",
    "dvc metrics diff alpha-02 alpha-09": "needs the two experiments run (tests/test_queue.py)",
    "dvc exp apply alpha-09": "needs the experiment run (tests/test_queue.py)",
}


def readme_commands(text: str) -> list[str]:
    """`dvc`/`kd` commands of the README's fenced code blocks, in order: one per line or per `&&` segment, comments
    dropped; output shown in a block (lines not starting with a command) is ignored."""
    cmds = []
    for block in re.findall(r"^```[^\n]*\n(.*?)^```", text, flags=re.M | re.S):
        for line in block.splitlines():
            line = re.sub(r"(^|\s)#.*$", "", line.strip().removeprefix("$ ")).strip()
            for part in (p.strip() for p in line.split("&&")):
                if re.match(r"(dvc|kd)\s", part + " "):
                    cmds.append(part)
    return cmds


def test_readme_commands_are_found():
    cmds = readme_commands((ROOT / "README.md").read_text())
    assert "dvc metrics show" in cmds and "kd profile tiny" in cmds, cmds
    assert readme_commands("```bash\n$ dvc dag   # graph\nkd validate && dvc status\n```\n") == \
        ["dvc dag", "kd validate", "dvc status"]


def _as_argv(cmd: str) -> list[str]:
    argv = shlex.split(cmd)
    # this checkout's code: `python -m` (the venv's `kd` is an editable install of another checkout)
    return [sys.executable, "-m", "kd.cli", *argv[1:]] if argv[0] == "kd" else argv


def test_every_readme_command_runs_on_a_fresh_clone(tmp_path):
    cmds = readme_commands((ROOT / "README.md").read_text())
    root, env = fresh_clone(tmp_path)
    failed = []
    for cmd in dict.fromkeys(cmds):  # each distinct command once, in README order
        if cmd in SKIP:
            continue
        res = subprocess.run(_as_argv(cmd), cwd=root, env=env, capture_output=True, text=True, timeout=600)
        if res.returncode != 0:
            failed.append(f"$ {cmd}  (exit {res.returncode})\n{(res.stdout + res.stderr)[-1500:]}")
        # every command starts from the clone as a reader has it (`kd profile cpu` must not affect the next one)
        subprocess.run(["git", "checkout", "-q", "--", "."], cwd=root, env=env, check=True)
    assert not failed, "README commands that fail on a fresh clone:\n" + "\n".join(failed)
    assert not (root / "models").exists(), "a README command ran a stage"


def test_skip_list_names_only_readme_commands():
    cmds = set(readme_commands((ROOT / "README.md").read_text()))
    assert not set(SKIP) - cmds, f"SKIP lists commands no longer in the README: {sorted(set(SKIP) - cmds)}"

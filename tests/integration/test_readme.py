"""The README and the docs/ pages cannot drift: every `dvc ...` and `kd ...` command in their fenced code blocks runs
here, on a fresh `git clone` of the tiny profile with nothing computed, and must exit 0, unless SKIP lists it with
the reason (it runs the pipeline, needs a remote or a GPU). So a new command is tested by default; a SKIP entry no
page has fails too. Also: the README stays a newcomer's page (<= 200 lines, every docs/ page linked), every relative
link and anchor resolves, and the README's stage -> code table matches dvc.yaml (stages, scripts, deps)."""

from __future__ import annotations

import re
import shlex
import subprocess
import sys
from pathlib import Path

import pytest

from stage_runner import fresh_clone

ROOT = Path(__file__).resolve().parents[2]
DOCS = ["README.md", *sorted(p.relative_to(ROOT).as_posix() for p in (ROOT / "docs").glob("*.md"))]

# command (as written in the README, comments and `&&` split off) -> why it is not run here
SKIP = {
    "kd pr-report main": "needs a branch `main` with an earlier run (tests/integration/test_ci.py runs pr-report on two tiny commits)",
    "kd pr-report HEAD~1 HEAD > report.md": "a shell redirection of pr-report (tests/report/test_pr.py, tests/integration/test_ci.py)",
    "kd pr-report v1 v2 --plots figs": "needs two tagged runs (tests/report/test_pr.py writes --plots)",
    "kd verify --quick": "a full tiny pipeline run and the invalidation check (~3-5 min); CI runs `kd verify`",
    "dvc repro": "runs the whole pipeline (the real default: 1.6 GB, ~30 min; tests/integration/test_pipeline.py runs the tiny one)",
    "kd verify": "two full tiny pipeline runs (~3-5 min); CI runs it (.ci/run)",
    "kd verify --tolerance": "two full pipeline runs, meant for a GPU",
    "kd repro": "runs the whole pipeline (kd repro --dry is run)",
    "dvc exp run -S alpha=0.61 -S temperature=2.0": "runs distill, eval and report (tests/integration/test_pipeline.py runs "
                                                    "`dvc exp run -S alpha=0.3` on the tiny profile)",
    "dvc exp run -S alpha=0.61": "re-runs distill, eval_kd, attention_kd and report of the real default (its output is "
                                 "shown; tests/integration/test_pipeline.py runs `dvc exp run -S alpha=0.3` on the tiny profile)",
    "dvc repro logits@none model@student": "runs stages (tests/tools/test_tune.py builds a tiny project in-process)",
    "kd bench": "a benchmark (minutes); tests/tools/test_bench.py runs it on the tiny pair",
    "kd bench --profile tiny --threads 1": "a benchmark (minutes); tests/tools/test_bench.py runs it on the tiny pair",
    "kd bench --only-dtypes": "a benchmark (a minute at the real shapes); tests/tools/test_bench.py runs item 8 small",
    "kd verify --committed": "re-runs sampled stages of the committed default against its committed outputs (real "
                             "models; tests/integration/test_shared_artefacts.py runs it on a tiny project)",
    "kd tune": "needs teacher signal and student; trains (tests/tools/test_tune.py runs tiny studies)",
    "kd tune --apply": "needs a study's metrics/tune.json (tests/tools/test_tune.py applies one and checks dvc status)",
    "dvc queue start -j 2": "runs the queued experiments' pipelines (tests/tools/test_tune.py checks the queueing)",
    "dvc exp run --run-all -j 1": "runs the queued experiments (tests/integration/test_queue.py runs two on the tiny profile)",
    "dvc metrics diff alpha-02 alpha-09": "needs the two experiments run (tests/integration/test_queue.py)",
    "dvc exp apply alpha-09": "needs the experiment run (tests/integration/test_queue.py)",
    "kd verify --keep": "two full tiny pipeline runs, like `kd verify` (CI runs that)",
    "kd verify --committed --stage eval_teacher --keep": "re-runs a stage of the committed default (real models; "
                                                         "tests/integration/test_shared_artefacts.py runs --committed on a tiny "
                                                         "project)",
    "dvc push": "needs a configured remote and computed outputs (tests/integration/test_shared_artefacts.py pushes and pulls)",
    "dvc pull": "needs a configured remote holding the outputs (tests/integration/test_shared_artefacts.py)",
    "kd verify --skip-invalidation --keep --workdir /tmp/before": "two full tiny runs at another commit (like `kd verify`)",
    "kd verify --skip-invalidation --keep --workdir /tmp/after": "two full tiny runs (like `kd verify`)",
    "kd compare /tmp/before/kd-verify-*/run-A/project /tmp/after/kd-verify-*/run-A/project":
        "needs the two kept runs above (tests/harness/test_run_compare.py runs kd compare on two projects)",
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


def all_commands() -> list[str]:
    """The commands of the README and of every docs/ page, each distinct command once, in page order."""
    return list(dict.fromkeys(c for page in DOCS for c in readme_commands((ROOT / page).read_text())))


def test_readme_commands_are_found():
    cmds = all_commands()
    assert "dvc metrics show" in cmds and "kd profile tiny" in cmds and "kd repro --dry" in cmds, cmds
    assert "kd tune" in cmds and "dvc queue status" in cmds, cmds  # docs/tuning.md, docs/dvc.md were read
    assert readme_commands("```bash\n$ dvc dag   # graph\nkd validate && dvc status\n```\n") == \
        ["dvc dag", "kd validate", "dvc status"]


def _as_argv(cmd: str) -> list[str]:
    argv = shlex.split(cmd)
    # this checkout's code: `python -m` (the venv's `kd` is an editable install of another checkout)
    return [sys.executable, "-m", "kd.tools.cli", *argv[1:]] if argv[0] == "kd" else argv


@pytest.mark.slow
def test_every_readme_command_runs_on_a_fresh_clone(tmp_path):
    cmds = all_commands()
    root, env = fresh_clone(tmp_path)
    failed = []
    for cmd in cmds:
        if cmd in SKIP:
            continue
        res = subprocess.run(_as_argv(cmd), cwd=root, env=env, capture_output=True, text=True, timeout=600)
        if res.returncode != 0:
            failed.append(f"$ {cmd}  (exit {res.returncode})\n{(res.stdout + res.stderr)[-1500:]}")
        # every command starts from the clone as a reader has it (`kd profile cpu` must not affect the next one)
        subprocess.run(["git", "checkout", "-q", "--", "."], cwd=root, env=env, check=True)
    assert not failed, "README/docs commands that fail on a fresh clone:\n" + "\n".join(failed)
    assert not (root / "models").exists(), "a README command ran a stage"


def test_skip_list_names_only_readme_commands():
    cmds = set(all_commands())
    assert not set(SKIP) - cmds, f"SKIP lists commands no page has any more: {sorted(set(SKIP) - cmds)}"


# --------------------------------------------------------------------------------------- the pages themselves

def test_readme_is_short_and_links_every_docs_page():
    text = (ROOT / "README.md").read_text()
    assert len(text.splitlines()) <= 200, "README.md over 200 lines: move the depth to a docs/ page"
    unlinked = [p for p in DOCS[1:] if f"]({p})" not in text]
    assert not unlinked, f"docs pages the README does not link: {unlinked}"


def _slug(heading: str) -> str:
    """GitHub's anchor for a heading: lower case, punctuation other than - and _ dropped, spaces -> -."""
    return re.sub(r"[^\w\- ]", "", heading.strip().lower()).replace(" ", "-")


def _anchors(text: str) -> set[str]:
    text = re.sub(r"^```.*?^```", "", text, flags=re.M | re.S)  # a `# comment` in a code block is no heading
    return {_slug(h) for h in re.findall(r"^#{1,6} (.+)$", text, flags=re.M)}


def test_relative_links_and_anchors_resolve():
    broken = []
    for page in DOCS:
        text = (ROOT / page).read_text()
        for target in re.findall(r"\]\(([^)\s]+)\)", text):
            if re.match(r"[a-z]+:", target):
                continue  # https:, mailto:
            path, _, anchor = target.partition("#")
            dest = (ROOT / page).parent / path if path else ROOT / page
            if not dest.exists():
                broken.append(f"{page}: {target} (no such file)")
            elif anchor and dest.suffix == ".md" and anchor not in _anchors(dest.read_text()):
                broken.append(f"{page}: {target} (no such heading)")
    assert not broken, "\n".join(broken)


def _stage_code_table() -> list[tuple[set[str], str, list[str]]]:
    """The README's stage -> code table: (stage names, script, kd files) per row."""
    text = (ROOT / "README.md").read_text()
    table = text[text.index("<!-- stage-code-table -->"):text.index("<!-- /stage-code-table -->")]
    rows = []
    for line in table.splitlines()[3:]:  # the marker, the header, the rule
        stages, script, code = (c.strip() for c in line.strip("|").split("|")[:3])
        rows.append(({re.sub(r"@.*", "", s) for s in re.findall(r"`([^`]+)`", stages)},
                     script.strip("`"), re.findall(r"`([^`]+)`", code)))
    return rows


def test_stage_code_table_matches_dvc_yaml():
    """Every stage of dvc.yaml has a row; a row's script is what the stage's cmd runs, and every code file it
    names is a dep of each of its stages, so a renamed or moved module fails here."""
    import yaml

    stages = yaml.safe_load((ROOT / "dvc.yaml").read_text())["stages"]
    rows = _stage_code_table()
    named = [s for names, _, _ in rows for s in names]
    assert sorted(named) == sorted(stages), f"table rows vs dvc.yaml stages: {sorted(named)} != {sorted(stages)}"
    wrong = []
    for names, script, code in rows:
        assert code, f"row {sorted(names)} names no code"
        for name in names:
            stage = stages[name].get("do", stages[name])
            module = re.match(r"python -m (\S+)", stage["cmd"]).group(1)
            deps = {d for d in stage.get("deps", []) if isinstance(d, str)}
            if script != module.replace(".", "/") + ".py":
                wrong.append(f"{name}: script {script}, but its cmd runs {module}")
            wrong += [f"{name}: {f} is not one of its deps in dvc.yaml" for f in code if f not in deps]
    assert not wrong, "\n".join(wrong)

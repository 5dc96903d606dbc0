"""`kd select` on the tiny profile: both measurements run on the validation split, record their evidence for the
profile, and never read the eval split (it is deleted for the test)."""

import json
import os
from pathlib import Path

import pytest
from click.testing import CliRunner
from stage_runner import in_process  # stages/<name>.py run in this process

from kd.config.profiles import load as load_profile
from kd.harness.dvc_project import make_copy
from kd.tools.cli import cli

ROOT = Path(__file__).resolve().parents[2]
pytestmark = pytest.mark.slow


@pytest.fixture(scope="module")
def project(tmp_path_factory):
    p = load_profile("tiny", ROOT)
    p["prompting"]["strategies"] = ["none"]
    root = make_copy(ROOT, tmp_path_factory.mktemp("select") / "project", params=p)
    for args in (("prepare",), ("model", "teacher"), ("model", "student"), ("teacher", "none"), ("logits", "none")):
        in_process(root, *args)
    (root / "data/prepared/eval.jsonl").unlink()  # the eval split must not be needed (nor read) to select
    return root


def _run(root, *args):
    cwd = os.getcwd()
    os.chdir(root)
    try:
        return CliRunner().invoke(cli, list(args), catch_exceptions=False)
    finally:
        os.chdir(cwd)


def test_select_instruction_and_targets(project):
    res = _run(project, "select", "instruction")
    assert res.exit_code == 0, res.output
    assert "set prompting.instruction to" in res.output
    res = _run(project, "select", "targets", "none")
    assert res.exit_code == 0, res.output
    sel = json.loads((project / "selection/tiny.json").read_text())
    assert sel["profile"] == "tiny" and sel["n"] == 4  # the tiny profile's validation size
    assert [b["title"].split(":")[0] for b in sel["blocks"]] == ["Answer-format instruction", "Training targets"]
    targets = sel["blocks"][1]["rows"]
    assert [(r[0], r[1]) for r in targets] == [("gold", "all"), ("teacher", "all"), ("gold", "finished"),
                                              ("gold", "correct")]
    assert all(float(r[3]) > 0 for r in targets)  # a real NLL per pair
    assert "Instruction:" in sel["decision"] and "Targets:" in sel["decision"]
    assert not (project / "data/prepared/eval.jsonl").exists()


def test_select_rejects_unknown_strategy(project):
    from kd.core.errors import KdError

    with pytest.raises(KdError, match=r"'\.\./\.\./etc' is not in prompting.strategies \(allowed: none\)"):
        _run(project, "select", "targets", "../../etc")


def test_select_recipe_moves_the_student_and_records_the_evidence(project):
    """Issue 19: every candidate recipe trains a student exactly as distill@none would, on the validation split only;
    the evidence (update size, validation NLL before and after) is recorded and the chosen recipe is one measured."""
    res = _run(project, "select", "recipe", "none")
    assert res.exit_code == 0, res.output
    assert "set distill.optimizer:" in res.output
    sel = json.loads((project / "selection/tiny.json").read_text())
    block = next(b for b in sel["blocks"] if b["title"].startswith("Training recipe"))
    rows = block["rows"]
    assert len(rows) == 6  # five one-epoch candidates, then the best with two epochs
    assert all(float(r[3]) > 0 for r in rows)  # every candidate moved the adapter
    assert len({r[4] for r in rows}) == 1  # one base student, measured once
    lr_big = [r for r in rows if r[0] == "adamw" and r[1] == "1e-3" and r[2] == "1"][0]
    lr_small = [r for r in rows if r[0] == "sgd" and r[1] == "1e-3"][0]
    assert float(lr_big[3]) > 10 * float(lr_small[3])  # AdamW moves the LoRA weights far more than SGD at 1e-3
    assert "Recipe:" in sel["decision"]
    assert not (project / "data/prepared/eval.jsonl").exists()

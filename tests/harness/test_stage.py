"""kd/harness/stage.py: the frame every stage script shares (params, argument check, launch, seed, finish)."""

from __future__ import annotations

import json
import shutil

import pytest
import yaml

from kd.config.profiles import load as load_profile
from kd.core.errors import KdError, ParamError
from kd.harness.stage import Stage
from stage_runner import ROOT


@pytest.fixture
def project(tmp_path, monkeypatch):
    (tmp_path / "params.yaml").write_text(yaml.safe_dump(load_profile("tiny", ROOT), sort_keys=False))
    shutil.copy(ROOT / "strategies.yaml", tmp_path / "strategies.yaml")
    monkeypatch.chdir(tmp_path)
    return tmp_path


def test_the_argument_is_checked_against_params_before_anything(project):
    with pytest.raises(ParamError, match=r"`prompting.strategies` does not list 'socratic'.*none, teacher"):
        Stage("teacher", "socratic")
    with pytest.raises(KdError, match="not a safe strategy name"):
        Stage("teacher", "../prepared")
    with pytest.raises(ParamError, match=r"`arm` does not list 'kd-x'"):
        Stage("eval", "kd-x", kind="arm", allowed=lambda c: ["student"], key="arm")
    assert not (project / "environment").exists()


def test_params_are_the_validated_typed_ones(project):
    st = Stage("teacher", "none")
    assert st.c.teacher.max_new_tokens == load_profile("tiny", ROOT)["teacher"]["max_new_tokens"]
    assert st.label == "teacher@none" and Stage("finetune").label == "finetune"
    (project / "params.yaml").write_text((project / "params.yaml").read_text().replace("alpha: 0.6", "alpha: 1.6", 1))
    with pytest.raises(ParamError, match="`alpha` is out of range: 1.6"):
        Stage("finetune")


def test_one_process_is_not_relaunched_and_seeding_is_the_params_seed(project):
    import torch

    st = Stage("logits", "none")
    assert st.launch(1) == (0, 1)
    st.seed()
    a = torch.rand(3)
    torch.manual_seed(st.c.seed)
    assert torch.equal(a, torch.rand(3))


def test_finish_records_the_environment_and_prints_one_line(project, capsys):
    Stage("attention", "student", kind="arm", allowed=lambda c: ["student"], key="arm").finish("12 layers")
    env = json.loads((project / "environment/attention-student.json").read_text())
    assert env["stage"] == "attention-student" and "fingerprint" in env
    out = capsys.readouterr().out
    assert out.startswith("attention@student: 12 layers (") and out.rstrip().endswith(" s)")
    Stage("report").finish("done", environment=False)
    assert not (project / "environment/report.json").exists()

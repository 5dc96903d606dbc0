"""The GPU profiles are ready to run: on a fresh clone, `kd profile <name>` then `dvc repro --dry` validates every
param and plans every stage here, offline, without downloading anything (the hub models and GSM8K are only
fetched when a stage really runs)."""

import re
import subprocess
import sys

import pytest
import yaml

from stage_runner import fresh_clone

pytestmark = pytest.mark.slow


@pytest.mark.parametrize("profile", ["paper", "gpu"])
def test_profile_dry_run_plans_every_stage_offline(tmp_path, profile):
    root, env = fresh_clone(tmp_path)
    env = {**env, "HF_HUB_OFFLINE": "1", "HF_DATASETS_OFFLINE": "1", "PIP_NO_INDEX": "1"}

    def run(*argv):
        res = subprocess.run([sys.executable, "-m", *argv], cwd=root, env=env, capture_output=True, text=True,
                             timeout=600)
        assert res.returncode == 0, f"{argv} failed:\n{res.stdout[-3000:]}\n{res.stderr[-3000:]}"
        return res.stdout + res.stderr

    run("kd.tools.cli", "profile", profile, "--force")
    p = yaml.safe_load((root / "params.yaml").read_text())
    assert p["profile"] == profile
    run("kd.tools.cli", "validate")
    out = run("kd.harness.dvc_compat", "repro", "--dry")
    planned = set(re.findall(r"Running stage '([^']+)'", out))
    per_strategy = {f"{stage}@{s}" for stage in ("teacher", "logits", "distill", "eval_kd")
                    for s in p["prompting"]["strategies"]}
    assert per_strategy | {"prepare", "model@teacher", "model@student", "finetune", "report"} <= planned, out
    assert not (root / "models").exists() and not (root / "data").exists()   # planned, nothing ran or downloaded

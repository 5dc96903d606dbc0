"""kd.invalidation: the hand-written table against the real dvc.yaml; it catches a missing and an extra dep, and every
probe puts the edited file back."""

from __future__ import annotations

from pathlib import Path

import pytest
import yaml

from kd.dvc_project import make_copy, placeholder_outputs
from kd.invalidation import INVALIDATION, Change, check_invalidation, expand
from kd.verify import Verdict, render

ROOT = Path(__file__).resolve().parents[1]


@pytest.fixture(scope="module")
def placeholder_project(tmp_path_factory):
    root = make_copy(ROOT, tmp_path_factory.mktemp("inval") / "project")
    placeholder_outputs(root)
    return root


def test_expand_patterns():
    stages = ["distill@none", "distill@teacher", "eval@teacher", "eval@kd-none", "report"]
    assert expand(["distill@*", "eval@kd-*", "report"], stages) == {"distill@none", "distill@teacher", "eval@kd-none",
                                                                   "report"}
    assert expand(["nope@x"], stages) == {"nope@x"}  # reported as missing, not silently dropped


def _edit_dvc_yaml(root: Path, stage: str, key: str, remove: str | None = None, add: str | None = None) -> None:
    data = yaml.safe_load((root / "dvc.yaml").read_text())
    body = data["stages"][stage].get("do", data["stages"][stage])
    if remove:
        body[key].remove(remove)
    if add:
        body[key].append(add)
    (root / "dvc.yaml").write_text(yaml.safe_dump(data, sort_keys=False))


@pytest.mark.slow
def test_invalidation_catches_a_missing_and_an_extra_dep(tmp_path):
    root = make_copy(ROOT, tmp_path / "project")
    _edit_dvc_yaml(root, "distill", "deps", remove="kd/loss.py")   # a missing dep
    _edit_dvc_yaml(root, "logits", "params", add="alpha")           # an extra one
    placeholder_outputs(root)
    rows = {r.change: r for r in check_invalidation(root, [c for c in INVALIDATION
                                                           if c.target in ("kd/loss.py", "alpha", "temperature")])}
    assert rows["kd/loss.py"].missing == {"distill@none", "distill@teacher"}
    assert rows["alpha -> 0.3"].extra == {"logits@none", "logits@teacher"}
    assert rows["temperature -> 2.0"].ok
    text = render(Verdict(False, None, [], [], list(rows.values()), [], None, {}))
    assert "FAIL missing: distill@{none,teacher}" in text and "FAIL extra: logits@{none,teacher}" in text


def test_invalidation_probe_restores_the_file(placeholder_project):
    root = placeholder_project
    before = (root / "strategies.yaml").read_bytes()
    rows = check_invalidation(root, [Change("strategies.yaml:teacher", "X {question}", ("teacher@teacher",))])
    assert rows[0].ok and rows[0].actual == {"teacher@teacher"}
    assert (root / "strategies.yaml").read_bytes() == before

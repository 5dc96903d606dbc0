"""kd.harness.invalidation: the hand-written table against the real dvc.yaml; it catches a missing and an extra dep, and every
probe puts the edited file back."""

from __future__ import annotations

from pathlib import Path

import pytest
import yaml

from kd.harness.dvc_project import make_copy, placeholder_outputs
from kd.harness.invalidation import (
    DOC,
    DOC_BEGIN,
    DOC_END,
    EVAL_ALL,
    INVALIDATION,
    Change,
    check_invalidation,
    doc_with_table,
    expand,
    render_table,
)
from kd.harness.verify import Verdict, render

ROOT = Path(__file__).resolve().parents[2]


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
    _edit_dvc_yaml(root, "distill", "deps", remove="kd/train/loss.py")   # a missing dep
    _edit_dvc_yaml(root, "logits", "params", add="alpha")           # an extra one
    placeholder_outputs(root)
    rows = {r.change: r for r in check_invalidation(root, [c for c in INVALIDATION
                                                           if c.target in ("kd/train/loss.py", "alpha", "temperature")])}
    assert rows["kd/train/loss.py"].missing == {"distill@none", "distill@teacher"}
    assert rows["alpha -> 0.3"].extra == {"logits@none", "logits@teacher"}
    assert rows["temperature -> 2.0"].ok
    text = render(Verdict(False, None, [], [], list(rows.values()), [], None, {}))
    assert "FAIL missing: distill@{none,teacher}" in text and "FAIL extra: logits@{none,teacher}" in text


def test_invalidation_probe_restores_the_file(placeholder_project):
    root = placeholder_project
    before = (root / "strategies.yaml").read_bytes()
    rows = check_invalidation(root, [Change("strategies.yaml:teacher", "X {question}", ("teacher@teacher",))])
    assert rows[0].ok and rows[0].actual == {"teacher@teacher", "validate"}  # validate: tolerated, re-runs nothing
    assert (root / "strategies.yaml").read_bytes() == before


def test_doc_table_is_generated_from_the_table():
    """docs/reproducibility.md shows exactly kd.harness.invalidation.INVALIDATION (`kd invalidation-table --write`)."""
    text = (ROOT / DOC).read_text(encoding="utf-8")
    assert doc_with_table(text) == text, "docs/reproducibility.md: the invalidation table is stale; run " \
                                         "`kd invalidation-table --write`"
    for c in INVALIDATION:
        assert f"`{c.target}`" in render_table(), c.target


def test_doc_table_rows_and_write(tmp_path, monkeypatch):
    from click.testing import CliRunner

    from kd.core.errors import KdError
    from kd.tools.cli import cli

    rows = render_table([Change("a.x", 1, ("distill@*", "report")), Change("a.y", 2, ("distill@*", "report")),
                         Change("s", 3, EVAL_ALL,
                                ("attention_kd@*",), why="a | b <c>"), Change("t", 4)]).splitlines()
    assert rows[2:] == [r"| `a.x`, `a.y` | distill@\*, report |  |",
                        r"| `s` | eval_\*; tolerated: attention_kd@\* | a \| b \<c> |",
                        "| `t` | nothing |  |"]
    (tmp_path / "docs").mkdir()
    (tmp_path / "dvc.yaml").write_text("stages: {}\n")
    stale = f"# title\n\n{DOC_BEGIN}\n| old | table |\n{DOC_END}\n\nafter\n"
    (tmp_path / DOC).write_text(stale)
    monkeypatch.chdir(tmp_path)
    res = CliRunner().invoke(cli, ["invalidation-table", "--write"])
    assert res.exit_code == 0, res.output
    assert (tmp_path / DOC).read_text() == f"# title\n\n{DOC_BEGIN}\n{render_table()}{DOC_END}\n\nafter\n"
    assert CliRunner().invoke(cli, ["invalidation-table"]).output == render_table()
    with pytest.raises(KdError, match="markers"):
        doc_with_table("no markers here")

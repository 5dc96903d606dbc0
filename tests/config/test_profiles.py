"""Profiles as overrides of one base (kd/config/profiles.py): the merge, its comments, and names that are never paths."""

import shutil
from pathlib import Path

import pytest
import yaml

from kd.config.params import validate
from kd.config.profiles import load, render
from kd.core.errors import KdError, ParamError

ROOT = Path(__file__).resolve().parents[2]


def test_committed_params_is_the_cpu_profile():
    """params.yaml is exactly what `kd profile cpu` writes (so the embedded default and its profile cannot drift)."""
    assert (ROOT / "params.yaml").read_text(encoding="utf-8") == render("cpu", ROOT)


@pytest.mark.parametrize("name", ["cpu", "paper", "tiny"])
def test_every_profile_validates_and_overrides_only_what_differs(name):
    p = load(name, ROOT)
    assert p["profile"] == name
    validate(p, root=ROOT)
    base = yaml.safe_load((ROOT / "profiles/base.yaml").read_text())
    over = yaml.safe_load((ROOT / f"profiles/{name}.yaml").read_text())

    def leaves(d, pre=""):
        for k, v in d.items():
            yield from leaves(v, f"{pre}{k}.") if isinstance(v, dict) else [(pre + k, v)]

    merged, b, o = dict(leaves(p)), dict(leaves(base)), dict(leaves(over))
    assert merged.keys() == b.keys()  # every key comes from the base, in its order
    assert {k for k in merged if merged[k] != b[k]} <= o.keys()  # a difference is an override
    assert all(merged[k] == v for k, v in o.items())


def test_comments_come_from_the_base_unless_overridden():
    tiny = render("tiny", ROOT)
    assert tiny.startswith("# tiny: ") and "# Written by `kd profile tiny` from profiles/base.yaml" in tiny
    lines = {ln.split(":")[0].strip(): ln for ln in tiny.splitlines() if not ln.lstrip().startswith("#")}
    assert "# two keep the tiny run short" in lines["strategies"]  # the override's comment
    assert "# reverse_kl (the paper's) | forward_kl | jsd" in lines["loss"]  # the base's, not overridden
    assert "# gold (the paper's" in lines["hard_target"] and "hard_target: teacher" in lines["hard_target"]
    assert "quantization: null" in lines["quantization"]  # null stays spelled out
    assert "\n\nteacher:\n" in tiny  # sections keep their blank lines


def _project(tmp_path: Path) -> Path:
    shutil.copytree(ROOT / "profiles", tmp_path / "profiles")
    return tmp_path


def test_an_override_key_the_base_lacks_is_named(tmp_path):
    root = _project(tmp_path)
    (root / "profiles/typo.yaml").write_text("profile: typo\ndistill:\n  lrr: 0.1\n")
    with pytest.raises(ParamError) as e:
        render("typo", root)
    assert "distill.lrr" in str(e.value) and "profiles/typo.yaml" in str(e.value) and "distill.lr" in str(e.value)
    (root / "profiles/typo.yaml").write_text("profile: other\n")
    with pytest.raises(ParamError, match="`profile` in profiles/typo.yaml must be 'typo'"):
        render("typo", root)
    (root / "profiles/typo.yaml").write_text("profile: typo\ndistill: 3\n")
    with pytest.raises(ParamError, match="`distill` in profiles/typo.yaml must be a mapping"):
        render("typo", root)


@pytest.mark.parametrize("bad", ["base", "../profiles/tiny", "/etc/passwd", "tiny.yaml", "nope", "Tiny"])
def test_names_that_are_not_profiles_are_refused(bad):
    with pytest.raises(KdError) as e:
        render(bad, ROOT)
    assert str(e.value).endswith("(allowed: cpu, gpu, paper, tiny)"), str(e.value)

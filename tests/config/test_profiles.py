"""Profiles as overrides of one base (kd/config/profiles.py): the merge, its comments, and names that are never paths."""

import shutil
from pathlib import Path

import pytest
import yaml

from kd.config.params import validate
from kd.config.profiles import _chain, load, render
from kd.core.errors import KdError, ParamError

ROOT = Path(__file__).resolve().parents[2]


def test_committed_params_is_the_cpu_profile():
    """params.yaml is exactly what `kd profile cpu` writes (so the embedded default and its profile cannot drift)."""
    assert (ROOT / "params.yaml").read_text(encoding="utf-8") == render("cpu", ROOT)


@pytest.mark.parametrize("name", ["cpu", "cpu-long", "paper", "tiny"])
def test_every_profile_validates_and_overrides_only_what_differs(name):
    p = load(name, ROOT)
    assert p["profile"] == name
    validate(p, root=ROOT)
    base = yaml.safe_load((ROOT / "profiles/base.yaml").read_text())

    def leaves(d, pre=""):
        for k, v in d.items():
            yield from leaves(v, f"{pre}{k}.") if isinstance(v, dict) else [(pre + k, v)]

    o = {}
    for _, over in _chain(name, ROOT):  # the profile's file and the ones it extends, furthest first: the nearest wins
        o.update(leaves(over))
    merged, b = dict(leaves(p)), dict(leaves(base))
    assert merged.keys() == b.keys()  # every key comes from the base, in its order
    assert {k for k in merged if merged[k] != b[k]} <= o.keys()  # a difference is an override
    assert all(merged[k] == v for k, v in o.items())


def test_cpu_long_is_cpu_with_more_eval_questions():
    """`extends` carries every cpu override (recipe, instruction) into cpu-long: the two differ only where it says."""
    cpu, long = load("cpu", ROOT), load("cpu-long", ROOT)
    assert long["prepare"]["eval_size"] > cpu["eval"]["limit"] and long["eval"]["limit"] is None
    cpu["profile"], cpu["prepare"]["eval_size"], cpu["eval"]["limit"] = "cpu-long", 192, None
    assert long == cpu
    text = render("cpu-long", ROOT)
    assert text.startswith("# cpu-long: ") and "profiles/base.yaml + profiles/cpu.yaml + profiles/cpu-long.yaml" in text


@pytest.mark.parametrize("parent, problem", [("child", "a cycle (child -> child)"), ("base", "the base applies"),
                                             ("../profiles/cpu", "is not"), ("nope", "does not exist")])
def test_extends_names_a_profile_and_never_loops(tmp_path, parent, problem):
    root = _project(tmp_path)
    (root / "profiles/child.yaml").write_text(f"profile: child\nextends: {parent}\n")
    with pytest.raises(KdError) as e:
        render("child", root)
    assert problem in str(e.value), str(e.value)


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
    assert str(e.value).endswith("(allowed: cpu, cpu-long, gpu, paper, tiny)"), str(e.value)

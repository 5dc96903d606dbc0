"""Bad input: every case fails in seconds, before any model loads, with one message naming the key or file and
what is allowed, and leaves every output already produced as it was.

Each case runs three ways on a project whose every stage output exists (placeholders recorded in dvc.lock):
  * `kd.harness.preflight.preflight` (what `kd repro` runs before DVC touches anything),
  * the stage that owns the input, in this process, with every model loader booby-trapped,
and a few also as `kd repro` / stage subprocesses (exit 2, one `error:` line, no traceback).
Property-based tests (hypothesis) cover the params validator and the GSM8K answer parser."""

from __future__ import annotations

import copy
import hashlib
import json
import math
import re
import subprocess
import sys
import time
from dataclasses import dataclass
from pathlib import Path
from typing import Any, Callable

import pytest
import yaml
from hypothesis import HealthCheck, given, settings
from hypothesis import strategies as st
from stage_runner import cached_stage

from kd.config.params import validate
from kd.config.profiles import load as load_profile
from kd.core.errors import KdError, ParamError
from kd.data.answers import extract_flexible, extract_strict, normalise, parse_gold, score
from kd.harness.dvc_project import make_copy, placeholder_outputs, read_lock, tool_env
from kd.harness.preflight import preflight

ROOT = Path(__file__).resolve().parents[2]

# every case three ways, some as `kd repro` / stage subprocesses, and property-based tests (minutes)
pytestmark = pytest.mark.slow
TINY = load_profile("tiny", ROOT)
EDITABLE = ["params.yaml", "strategies.yaml", "tests/data/gsm8k/train.jsonl", "tests/data/gsm8k/test.jsonl"]
OUTPUT_ROOTS = ["data", "models", "metrics", "results", "reports", "dvc.lock"]


# ------------------------------------------------------------------------------------------------ project


@pytest.fixture(scope="module")
def project(tmp_path_factory):
    root = make_copy(ROOT, tmp_path_factory.mktemp("bad") / "project", profile="tiny")
    placeholder_outputs(root)
    return root


def digest(root: Path) -> dict[str, str]:
    out = {}
    for name in OUTPUT_ROOTS:
        p = root / name
        for f in ([p] if p.is_file() else sorted(x for x in p.rglob("*") if x.is_file()) if p.exists() else []):
            out[str(f.relative_to(root))] = hashlib.sha256(f.read_bytes()).hexdigest()
    return out


@pytest.fixture
def proj(project):
    """The module's project; the files a case edits are put back afterwards, and outputs must be untouched."""
    saved = {n: (project / n).read_bytes() for n in EDITABLE}
    before = digest(project)
    yield project
    for n, data in saved.items():
        (project / n).write_bytes(data)
    assert digest(project) == before, "a failing case changed or removed an output"


def stage_module(name: str):
    return cached_stage(name, "under_test")


def _trap(*a, **k):
    raise AssertionError("a model or tokenizer was loaded before the input was checked")


@pytest.fixture
def no_models(monkeypatch):
    """Any model/tokenizer load fails the test: input checks must come first."""
    import transformers

    import kd.models.loading

    for name in ("load_model", "load_tokenizer"):
        monkeypatch.setattr(kd.models.loading, name, _trap)
    for cls in (transformers.AutoModelForCausalLM, transformers.AutoTokenizer):
        monkeypatch.setattr(cls, "from_pretrained", _trap)
    return monkeypatch


def run_stage(root: Path, monkeypatch, name: str, *args: str) -> str:
    mod = stage_module(name)
    for attr in ("load_model", "load_tokenizer"):
        if hasattr(mod, attr):
            monkeypatch.setattr(mod, attr, _trap)
    monkeypatch.chdir(root)
    t0 = time.perf_counter()
    with pytest.raises(KdError) as e:
        mod.main.main(args=list(args), standalone_mode=False)
    assert time.perf_counter() - t0 < 10, "a bad input took more than seconds to fail"
    return str(e.value)


# ------------------------------------------------------------------------------------------------ cases


def setp(key: str, value: Any) -> Callable[[Path], None]:
    def edit(root: Path) -> None:
        p = yaml.safe_load((root / "params.yaml").read_text())
        node = p
        *path, last = key.split(".")
        for k in path:
            node = node[k]
        node[last] = value
        (root / "params.yaml").write_text(yaml.safe_dump(p, sort_keys=False))
    return edit


def delp(key: str) -> Callable[[Path], None]:
    def edit(root: Path) -> None:
        p = yaml.safe_load((root / "params.yaml").read_text())
        node = p
        *path, last = key.split(".")
        for k in path:
            node = node[k]
        del node[last]
        (root / "params.yaml").write_text(yaml.safe_dump(p, sort_keys=False))
    return edit


def write(rel: str, text: str) -> Callable[[Path], None]:
    return lambda root: (root / rel).write_text(text)


def template(name: str, text: str) -> Callable[[Path], None]:
    def edit(root: Path) -> None:
        s = yaml.safe_load((root / "strategies.yaml").read_text())
        s[name] = {"template": text}
        (root / "strategies.yaml").write_text(yaml.safe_dump(s, sort_keys=False))
    return edit


def dataset_row(split: str, line: int, text: str) -> Callable[[Path], None]:
    def edit(root: Path) -> None:
        f = root / f"tests/data/gsm8k/{split}.jsonl"
        rows = f.read_text().splitlines()
        rows[line - 1] = text
        f.write_text("\n".join(rows) + "\n")
    return edit


def answer(split: str, line: int, new: str) -> Callable[[Path], None]:
    def edit(root: Path) -> None:
        f = root / f"tests/data/gsm8k/{split}.jsonl"
        rows = [json.loads(x) for x in f.read_text().splitlines()]
        rows[line - 1]["answer"] = new
        f.write_text("".join(json.dumps(r) + "\n" for r in rows))
    return edit


@dataclass
class Case:
    id: str
    edit: Callable[[Path], None]
    stage: tuple[str, ...]        # the stage that owns the input: script name + args
    expect: tuple[str, ...]       # fragments of the one message (the key or file, what is allowed)


D = ("distill", "none")
T = ("teacher", "none")
L = ("logits", "none")
P = ("prepare",)
E = ("eval", "student")
R = ("report",)
CASES = [
    # --- params: ranges
    Case("alpha-above-1", setp("alpha", 1.5), D, ("`alpha`", "out of range", "allowed: a number in [0.0, 1.0]")),
    Case("alpha-negative", setp("alpha", -0.1), D, ("`alpha`", "[0.0, 1.0]")),
    Case("alpha-not-a-number", setp("alpha", "high"), D, ("`alpha`", "finite number", "'high'")),
    Case("temperature-zero", setp("temperature", 0), D, ("`temperature`", "allowed: a number in [0.01, 100.0]")),
    Case("temperature-negative", setp("temperature", -2.0), D, ("`temperature`", "[0.01, 100.0]")),
    Case("temperature-nan", setp("temperature", math.nan), D, ("`temperature`", "finite number")),
    Case("temperature-inf", setp("temperature", math.inf), D, ("`temperature`", "finite number")),
    Case("top-k-zero", setp("logits.top_k", 0), L, ("`logits.top_k`", "an integer in [1, 10000000]")),
    Case("top-k-fraction", setp("logits.top_k", 5.5), L, ("`logits.top_k`", "must be an integer")),
    Case("lora-r-zero", setp("distill.lora.r", 0), D, ("`distill.lora.r`", "an integer in [1, 4096]")),
    Case("lora-r-huge", setp("distill.lora.r", 5000), D, ("`distill.lora.r`", "[1, 4096]")),
    Case("lora-dropout-one", setp("distill.lora.dropout", 1.0), D, ("`distill.lora.dropout`", "[0.0, 1.0)")),
    Case("lr-zero", setp("distill.lr", 0), D, ("`distill.lr`", "(0.0, 10.0]")),
    Case("epochs-zero", setp("distill.epochs", 0), D, ("`distill.epochs`", "an integer in [1, 1000]")),
    Case("seed-negative", setp("seed", -1), P, ("`seed`", "an integer in [0, 4294967295]")),
    Case("seed-boolean", setp("seed", True), P, ("`seed`", "must be an integer")),
    Case("teacher-tokens-zero", setp("teacher.max_new_tokens", 0), T, ("`teacher.max_new_tokens`", "[1, 32768]")),
    # --- params: choices, names, structure
    Case("unknown-strategy", setp("prompting.strategies", ["none", "socratic"]), T,
         ("`prompting.strategies`", "'socratic'", "none, teacher, ground_truth, confidence, gold_hint")),
    Case("duplicate-strategy", setp("prompting.strategies", ["none", "none"]), T, ("`prompting.strategies`", "dupl")),
    Case("unknown-loss", setp("distill.loss", "kl"), D, ("`distill.loss`", "'kl'", "reverse_kl, forward_kl, jsd")),
    Case("unknown-hard-target", setp("distill.hard_target", "silver"), D, ("`distill.hard_target`", "teacher, gold")),
    Case("unknown-logits-format", setp("logits.format", "sparse"), L, ("`logits.format`", "hidden, full, topk")),
    Case("unknown-dtype", setp("teacher.dtype", "int8"), T, ("`teacher.dtype`", "bfloat16, float16, float32")),
    Case("trust-remote-code-string", setp("student.trust_remote_code", "yes"), D,
         ("`student.trust_remote_code`", "true, false")),
    Case("typo-key", setp("distill.lrr", 0.1), D, ("`distill.lrr`", "not a known key", "distill.lr")),
    Case("missing-key", delp("temperature"), D, ("`temperature`", "is missing")),
    Case("unknown-response-filter", setp("distill.response_filter", "best"), D,
         ("`distill.response_filter`", "all, finished, correct")),
    Case("unknown-source-scheme", setp("prepare.source", "ftp://example.org/gsm8k"), P,
         ("`prepare.source`", "hub:<dataset id>, jsonl:<folder>, pypi:<package>")),
    Case("unknown-model", setp("teacher.model", "tiny-teachr"), T, ("`teacher.model`", "did you mean 'tiny-teacher'")),
    Case("model-path-missing", setp("student.model", "./no/such/model"), D, ("`student.model`", "does not exist")),
    # --- files
    Case("params-not-yaml", write("params.yaml", "alpha: [0.5,\n"), D, ("params.yaml", "not valid YAML")),
    Case("params-not-a-mapping", write("params.yaml", "- alpha\n- 0.5\n"), D, ("`params`", "must be a mapping")),
    Case("template-unknown-field", template("teacher", "{question} Hint: {hint}"), T,
         ("strategies.yaml", "`teacher`", "'hint'", "allowed: {question}, {answer}, {solution}")),
    Case("template-without-question", template("teacher", "Explain it simply."), T,
         ("strategies.yaml", "`teacher`", "must contain {question}")),
    Case("template-malformed", template("teacher", "{question"), T, ("strategies.yaml", "`teacher`", "malformed")),
    Case("strategies-file-missing", setp("prompting.file", "no-such-strategies.yaml"), T,
         ("no-such-strategies.yaml", "missing", "prompting.file")),
    Case("dataset-folder-missing", setp("prepare.source", "jsonl:tests/data/nope"), P,
         ("prepare.source", "tests/data/nope", "does not exist")),
    Case("dataset-empty", write("tests/data/gsm8k/test.jsonl", ""), P, ("test.jsonl", "no rows")),
    Case("dataset-malformed-json", dataset_row("train", 3, '{"question": "q", "answer": '), P,
         ("train.jsonl:3", "not valid JSON")),
    Case("dataset-missing-field", dataset_row("train", 2, '{"question": "How many?"}'), P,
         ("train.jsonl:2", "`question` and `answer`")),
    Case("answer-without-marker", answer("train", 1, "She sold 72 clips."), P,
         ("train row 0", "does not parse", "no '#### <number>' line")),
    Case("answer-not-a-number", answer("test", 5, "so ... #### seventy-two"), P, ("test row", "is not a number")),
    Case("dataset-too-small", setp("prepare.transfer_size", 20), P, ("transfer_size", "exceeds the 16 train rows")),
]


def test_at_least_thirty_cases():
    assert len(CASES) >= 30 and len({c.id for c in CASES}) == len(CASES)


@pytest.mark.parametrize("case", CASES, ids=[c.id for c in CASES])
def test_bad_input_fails_early_with_one_clear_message(proj, no_models, case):
    case.edit(proj)
    t0 = time.perf_counter()
    with pytest.raises(KdError) as e:
        preflight(proj)
    assert time.perf_counter() - t0 < 10
    pre = str(e.value)
    for frag in case.expect:
        assert frag in pre, f"{frag!r} not in: {pre}"
    assert "\n" not in pre.strip(), "one message, one line"
    msg = run_stage(proj, no_models, *case.stage)
    for frag in case.expect:
        assert frag in msg, f"stage {case.stage}: {frag!r} not in: {msg}"


def test_profile_that_does_not_exist(proj):
    res = subprocess.run([sys.executable, "-m", "kd.tools.cli", "profile", "nope"], cwd=proj, env=tool_env(root=proj),
                         capture_output=True, text=True)
    assert res.returncode == 2 and "Traceback" not in res.stderr
    assert "profile 'nope' does not exist (allowed: " in res.stderr and "tiny" in res.stderr


def test_verify_profile_that_does_not_exist(tmp_path):
    from kd.harness.verify import verify

    with pytest.raises(KdError, match=r"profile 'nope' does not exist \(allowed: .*tiny"):
        verify(ROOT, "nope", workdir=tmp_path)


def test_mismatched_vocabularies_are_caught_before_any_stage_runs(proj, tiny_models):
    """Materialised teacher and student whose token ids mean different things: `kd repro` refuses before DVC runs
    teacher generation (the distill stage would only notice after it)."""
    import shutil

    from transformers import AutoTokenizer

    for role in ("teacher", "student"):
        shutil.rmtree(proj / "models" / role)
        shutil.copytree(tiny_models / role, proj / "models" / role)
        (proj / "models" / role / "kd_model.json").write_text(json.dumps({"spec": TINY[role]["model"]}))
    tok = AutoTokenizer.from_pretrained(str(proj / "models/student"))
    tok.add_tokens(["<|extra|>"])
    tok.save_pretrained(str(proj / "models/student"))
    try:
        with pytest.raises(KdError) as e:
            preflight(proj)
        assert "`teacher.model` / `student.model`" in str(e.value) and "vocab" in str(e.value).lower()
    finally:  # the module's other cases expect the placeholders back
        for role in ("teacher", "student"):
            shutil.rmtree(proj / "models" / role)
            (proj / "models" / role).mkdir()
            (proj / "models" / role / "placeholder").write_text("placeholder\n")


@pytest.mark.parametrize("case", [c for c in CASES if c.id in ("alpha-above-1", "template-unknown-field",
                                                                  "answer-without-marker")], ids=lambda c: c.id)
def test_kd_repro_refuses_before_dvc_deletes_anything(proj, case):
    """`dvc repro` would delete the stage's outputs and then fail; `kd repro` fails first, exit 2, one line."""
    case.edit(proj)
    lock = read_lock(proj)
    res = subprocess.run([sys.executable, "-m", "kd.tools.cli", "repro"], cwd=proj, env=tool_env(root=proj),
                         capture_output=True, text=True, timeout=120)
    assert res.returncode == 2, res.stdout + res.stderr
    assert "Traceback" not in res.stderr and "Running stage" not in res.stdout + res.stderr
    lines = res.stderr.strip().splitlines()
    assert len(lines) == 1 and lines[0].startswith("error: ") and case.expect[0] in lines[0]
    assert read_lock(proj) == lock  # and `proj` checks every output file is unchanged


@pytest.mark.parametrize("case", [c for c in CASES if c.id in ("unknown-loss", "dataset-malformed-json")],
                         ids=lambda c: c.id)
def test_stage_process_exits_2_with_one_line(proj, case):
    case.edit(proj)
    res = subprocess.run([sys.executable, "-m", f"stages.{case.stage[0]}", *case.stage[1:]], cwd=proj,
                         env=tool_env(root=proj), capture_output=True, text=True, timeout=120)
    assert res.returncode == 2 and "Traceback" not in res.stderr
    assert res.stderr.strip().splitlines()[-1].startswith("error: ")
    assert all(f in res.stderr for f in case.expect)


# ------------------------------------------------------------------------------------------------ properties


def _leaves(d: dict, prefix: str = "") -> list[str]:
    out = []
    for k, v in d.items():
        out += _leaves(v, f"{prefix}{k}.") if isinstance(v, dict) else [prefix + k]
    return out


LEAVES = [k for k in _leaves(TINY) if k != "profile"]
ANY_VALUE = st.one_of(st.none(), st.booleans(), st.integers(-10**12, 10**12),
                      st.floats(allow_nan=True, allow_infinity=True), st.text(max_size=30),
                      st.lists(st.text(max_size=8), max_size=3), st.dictionaries(st.text(max_size=5), st.integers(),
                                                                                   max_size=2))


def _set(p: dict, key: str, value: Any) -> dict:
    p = copy.deepcopy(p)
    node = p
    *path, last = key.split(".")
    for k in path:
        node = node[k]
    node[last] = value
    return p


@settings(max_examples=300, deadline=None, suppress_health_check=[HealthCheck.function_scoped_fixture])
@given(key=st.sampled_from(LEAVES), value=ANY_VALUE)
def test_validator_names_the_key_of_any_bad_value(key, value):
    """Any value at any key: either valid (and kept as given) or a ParamError naming exactly that key; never another
    exception."""
    try:
        out = validate(_set(TINY, key, value), root=ROOT)
    except ParamError as e:
        assert e.key == key, (e.key, key, str(e))
        assert f"`{e.key}`" in str(e)
    except KdError as e:  # a file named by a param (prompting.file) that is not there
        assert key == "prompting.file" and "prompting.file" in str(e), str(e)
    else:
        got = out
        for k in key.split("."):
            got = got[k]
        assert got == value or (isinstance(value, int) and got == float(value))


@settings(max_examples=200, deadline=None)
@given(alpha=st.floats(-10, 10), temperature=st.floats(-10, 200), r=st.integers(-5, 5000),
       top_k=st.integers(-5, 10**8))
def test_validator_ranges(alpha, temperature, r, top_k):
    p = _set(_set(_set(_set(TINY, "alpha", alpha), "temperature", temperature), "distill.lora.r", r),
             "logits.top_k", top_k)
    bad = [k for k, ok in (("alpha", 0 <= alpha <= 1), ("temperature", 0.01 <= temperature <= 100),
                           ("logits.top_k", 1 <= top_k <= 10**7), ("distill.lora.r", 1 <= r <= 4096)) if not ok]
    if not bad:
        validate(p, root=ROOT)
        return
    with pytest.raises(ParamError) as e:
        validate(p, root=ROOT)
    assert e.value.key == bad[0]  # schema order: the first bad key is the one named
    assert "allowed:" in str(e.value)


def _fmt(n: int, commas: bool) -> str:
    s = f"{abs(n):,}" if commas else str(abs(n))
    return ("-" if n < 0 else "") + s


@given(n=st.integers(-10**9, 10**9), commas=st.booleans(), dollar=st.booleans(), dot=st.booleans(),
       text=st.text(alphabet=st.characters(blacklist_characters="#"), max_size=60))
def test_gold_answer_round_trip(n, commas, dollar, dot, text):
    """'<solution> #### <n>' in any of GSM8K's spellings ($, thousands commas, final '.') parses to n."""
    num = ("$" if dollar else "") + _fmt(n, commas) + ("." if dot else "")
    solution = f"{text}\n#### {num}"
    assert parse_gold(solution) == str(n)
    assert score(f"Reasoning.\n#### {_fmt(n, commas)}", str(n))["correct_strict"]
    assert score(f"so the answer is {n}", str(n))["correct_flexible"]


@given(text=st.text(max_size=200))
def test_parser_never_crashes(text):
    """Arbitrary text: parse_gold returns a plain number or raises ValueError; the extractors return str or None."""
    try:
        gold = parse_gold(text)
    except ValueError:
        pass
    else:
        assert re.fullmatch(r"-?\d+(\.\d+)?", gold)
    for f in (extract_strict, extract_flexible):
        out = f(text)
        assert out is None or (isinstance(out, str) and out in text)
    s = score(text, "42")
    assert set(s) == {"pred_strict", "pred_flexible", "correct_strict", "correct_flexible"}
    assert isinstance(normalise(text), str)


@given(numbers=st.lists(st.integers(0, 10**6), min_size=1, max_size=5), words=st.text(alphabet="abc ", max_size=10))
def test_flexible_takes_the_last_number(numbers, words):
    text = words.join(f" {n} " for n in numbers)
    assert normalise(extract_flexible(text)) == str(numbers[-1])
    assert extract_strict(text) is None

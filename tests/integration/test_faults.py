"""Faults, for real: SIGKILL a running stage and re-run it; damage the teacher signal; fill the disk; lose a model;
let a stage fail under `kd repro`. Every check is against an uninterrupted run's bytes.

Everything runs in a temp copy of the project (tiny models, one strategy, 12 transfer questions). A stage that gets
killed is a real `python -m stages.<name>` subprocess, as DVC runs it; uninterrupted reference runs and re-runs call
the same stage command in this process (same code, no second import bill). Slow-ish (~1 min in all): marked `slow`,
but part of the default run."""

from __future__ import annotations

import errno
import json
import os
import shutil
import signal
import subprocess
import sys
import time
from pathlib import Path

import pytest

from kd.config.profiles import load as load_profile
from kd.core.errors import ArtefactError, KdError
from kd.harness.dvc_project import make_copy, placeholder_outputs, read_lock, tool_env

ROOT = Path(__file__).resolve().parents[2]
pytestmark = pytest.mark.slow
S = "none"


def _params() -> dict:
    p = load_profile("tiny", ROOT)
    p["prompting"]["strategies"] = [S]
    p["prepare"].update(transfer_size=12, validation_size=4)
    p["teacher"].update(batch_size=1, max_new_tokens=16)  # 3 resumable chunks of 4: time to kill between them
    p["distill"].update(epochs=2, checkpoint_every=2)    # 24 steps, a checkpoint every 2
    return p


def env(root: Path) -> dict[str, str]:
    # The copy's own kd first; one hash seed for every process here: these tests are about resuming, and peft writes
    # adapter_config.json's target_modules in set order (hash-seed dependent) -- `kd verify` uses two seeds for that.
    return tool_env({"PYTHONHASHSEED": "0"}, root=root)


def stage(root: Path, *args: str, check: bool = True) -> subprocess.CompletedProcess:
    res = subprocess.run([sys.executable, *args], cwd=root, env=env(root), capture_output=True, text=True)
    if check:
        assert res.returncode == 0, f"{args} failed:\n{res.stdout[-2000:]}\n{res.stderr[-3000:]}"
    return res


def tree_bytes(root: Path, *folders: str) -> dict[str, bytes]:
    out = {}
    for f in folders:
        p = root / f
        files = [p] if p.is_file() else sorted(x for x in p.rglob("*") if x.is_file()) if p.exists() else []
        out.update({str(x.relative_to(root)): x.read_bytes() for x in files})
    return out


def kill_when(proc: subprocess.Popen, ready, what: str, timeout: float = 300) -> None:
    """SIGKILL `proc` as soon as ready() is true; fail if it finishes first."""
    t0 = time.monotonic()
    while not ready():
        if proc.poll() is not None:
            out, err = proc.communicate()
            pytest.fail(f"the stage finished (exit {proc.returncode}) before {what}:\n{err[-2000:]}")
        if time.monotonic() - t0 > timeout:
            proc.kill()
            pytest.fail(f"timed out waiting for {what}")
        time.sleep(0.002)
    proc.send_signal(signal.SIGKILL)
    proc.communicate()
    assert proc.returncode == -signal.SIGKILL, f"exit {proc.returncode}: the stage was not killed mid-way"


_modules: dict[str, object] = {}


def in_process(root: Path, name: str, *args: str) -> None:
    """Run stages/<name>.py's command in this process (the same code DVC runs, without paying for the imports
    again). Only the runs that get killed need to be real subprocesses."""
    import importlib.util

    if name not in _modules:
        spec = importlib.util.spec_from_file_location(f"stage_{name}_faults", ROOT / "stages" / f"{name}.py")
        mod = importlib.util.module_from_spec(spec)
        spec.loader.exec_module(mod)
        _modules[name] = mod
    cwd = os.getcwd()
    os.chdir(root)
    try:
        _modules[name].main.main(args=list(args), standalone_mode=False)
    finally:
        os.chdir(cwd)


@pytest.fixture(scope="module")
def tiny(tmp_path_factory):
    """prepare, both models, teacher@none and logits@none, run uninterrupted."""
    root = make_copy(ROOT, tmp_path_factory.mktemp("faults") / "project", params=_params())
    in_process(root, "prepare")
    in_process(root, "model", "teacher")
    in_process(root, "model", "student")
    in_process(root, "teacher", S)
    in_process(root, "logits", S)
    return root


def fresh(tiny: Path, tmp_path: Path) -> Path:
    dst = tmp_path / "project"
    shutil.copytree(tiny, dst, symlinks=True)
    return dst


# ------------------------------------------------------------------------------------------------ SIGKILL


def test_teacher_killed_mid_way_reuses_finished_chunks(tiny, tmp_path, capfd):
    root = fresh(tiny, tmp_path)
    reference = tree_bytes(tiny, f"data/teacher/{S}", f"results/teacher/{S}.json")
    shutil.rmtree(root / f"data/teacher/{S}")
    (root / f"results/teacher/{S}.json").unlink()
    work = root / ".kd-work/teacher" / S

    proc = subprocess.Popen([sys.executable, "-m", "stages.teacher", S], cwd=root, env=env(root),
                            stdout=subprocess.PIPE, stderr=subprocess.PIPE, text=True)
    kill_when(proc, lambda: len(list(work.glob("chunk-*.json"))) >= 1, "a teacher chunk was written")
    done = {p.name: p.read_bytes() for p in work.glob("chunk-*.json")}
    assert 1 <= len(done) < 3, f"killed with {len(done)} of 3 chunks done"
    assert not (root / f"data/teacher/{S}/responses.jsonl").exists(), "a killed stage left its output"
    for raw in done.values():  # every finished chunk is whole (atomic write)
        assert len(json.loads(raw)["responses"]) == 4

    capfd.readouterr()
    in_process(root, "teacher", S)  # the re-run
    err = capfd.readouterr().err
    # the chunks finished before the kill were read back, not generated again (fingerprint matched)
    assert f"reused {len(done)} of 3 finished chunks" in err, err[-2000:]
    assert tree_bytes(root, f"data/teacher/{S}", f"results/teacher/{S}.json") == reference
    assert not work.exists(), "the work folder is removed once the output is written"


def test_distill_killed_mid_epoch_resumes_to_the_same_adapter(tiny, tmp_path, capfd):
    outs = (f"models/kd-{S}", f"results/distill/{S}.json", f"reports/distill/{S}")
    ref = fresh(tiny, tmp_path / "ref")
    in_process(ref, "distill", S)  # uninterrupted
    reference = tree_bytes(ref, *outs)
    assert any(k.endswith("adapter_model.safetensors") for k in reference)

    root = fresh(tiny, tmp_path / "killed")
    ckpt = root / ".kd-work/distill" / S / "checkpoint.safetensors"
    proc = subprocess.Popen([sys.executable, "-m", "stages.distill", S], cwd=root, env=env(root),
                            stdout=subprocess.PIPE, stderr=subprocess.PIPE, text=True)
    kill_when(proc, ckpt.exists, "the first checkpoint was written")
    from safetensors import safe_open

    with safe_open(str(ckpt), framework="pt") as f:
        step = int(f.metadata()["step"])
    assert 2 <= step < 12, f"checkpoint at step {step}: not mid-epoch 1 of 2 (12 steps each)"
    assert not (root / f"models/kd-{S}").exists() and not (root / f"results/distill/{S}.json").exists()

    capfd.readouterr()
    in_process(root, "distill", S)  # the re-run
    out = "".join(capfd.readouterr())
    assert f"distill: resuming from step {step}/24" in out, out[-2000:]
    got = tree_bytes(root, *outs)
    assert got.keys() == reference.keys()
    for name in reference:  # adapter, metrics and the logged curves: same bytes as the uninterrupted run
        assert got[name] == reference[name], f"{name} differs after resuming"
    assert not ckpt.parent.exists()


# ------------------------------------------------------------------------------------ damaged teacher signal


def _distill_in_process(root: Path, monkeypatch):
    """Run stages/distill.py's command in this process with every model loader booby-trapped: a check that fires
    before training must also fire before any model loads."""
    import importlib.util

    import kd.models.loading

    spec = importlib.util.spec_from_file_location("stage_distill_under_test", ROOT / "stages/distill.py")
    mod = importlib.util.module_from_spec(spec)
    spec.loader.exec_module(mod)

    def trap(*a, **k):
        raise AssertionError("a model was loaded before the input check")

    for target in (mod, kd.models.loading):  # the stage's own names and the library's (kd.train.run imports at call time)
        monkeypatch.setattr(target, "load_model", trap, raising=False)
        monkeypatch.setattr(target, "load_tokenizer", trap, raising=False)
    monkeypatch.chdir(root)
    with pytest.raises(KdError) as e:
        mod.main.main(args=[S], standalone_mode=False)
    return str(e.value)


def _shard(root: Path) -> Path:
    return root / f"data/logits/{S}/shard-00000.safetensors"


@pytest.mark.parametrize("damage", ["truncated", "altered", "missing"])
def test_damaged_shard_is_named_before_training(tiny, tmp_path, monkeypatch, damage):
    root = fresh(tiny, tmp_path)
    shard = _shard(root)
    data = shard.read_bytes()
    if damage == "truncated":
        shard.write_bytes(data[: len(data) // 2])
    elif damage == "altered":
        shard.write_bytes(data[:-1] + bytes([data[-1] ^ 1]))
    else:
        shard.unlink()
    msg = _distill_in_process(root, monkeypatch)
    assert str(Path(f"data/logits/{S}/shard-00000.safetensors")) in msg
    assert ("missing" if damage == "missing" else "does not match the manifest") in msg


def test_manifest_that_does_not_match_is_named(tiny, tmp_path, monkeypatch):
    root = fresh(tiny, tmp_path)
    man = root / f"data/logits/{S}/manifest.json"
    m = json.loads(man.read_text())
    m["examples"][0]["rows"] += 1  # computed for a different response
    man.write_text(json.dumps(m))
    msg = _distill_in_process(root, monkeypatch)
    assert f"data/logits/{S}/manifest.json" in msg and "different response" in msg


def test_teacher_responses_newer_than_the_logits_are_refused(tiny, tmp_path, monkeypatch):
    root = fresh(tiny, tmp_path)
    path = root / f"data/teacher/{S}/responses.jsonl"
    rows = [json.loads(x) for x in path.read_text().splitlines()]
    rows[0]["response_ids"] = rows[0]["response_ids"][:-1]
    path.write_text("".join(json.dumps(r) + "\n" for r in rows))
    msg = _distill_in_process(root, monkeypatch)
    assert "manifest.json" in msg and "different response" in msg


def test_mismatched_vocabularies_fail_before_the_student_loads(tiny, tmp_path, monkeypatch):
    """A student whose token ids mean something else than the teacher's (here: one extra token)."""
    from transformers import AutoTokenizer

    root = fresh(tiny, tmp_path)
    tok = AutoTokenizer.from_pretrained(str(root / "models/student"))
    tok.add_tokens(["<|extra|>"])
    tok.save_pretrained(str(root / "models/student"))
    msg = _distill_in_process(root, monkeypatch)
    assert "tokenizers differ" in msg and "models/student" in msg and "<|extra|>" in msg


# ------------------------------------------------------------------------------------ full disk, missing model


def test_full_disk_is_a_clear_error_and_keeps_the_previous_output(tmp_path, monkeypatch):
    """ENOSPC in the middle of writing an output: one KdError naming the file and the cause; the previous version
    is untouched and no temp file is left (even the folder's listing is unchanged)."""
    from kd.core import io

    target = tmp_path / "out" / "responses.jsonl"
    io.write_text(target, "previous run\n")
    before = sorted(p.name for p in target.parent.iterdir())
    real_fsync = os.fsync

    def full(fd):
        raise OSError(errno.ENOSPC, os.strerror(errno.ENOSPC))

    monkeypatch.setattr(os, "fsync", full)
    with pytest.raises(KdError) as e:
        io.write_jsonl(target, [{"id": i, "text": "x" * 100} for i in range(100)])
    monkeypatch.setattr(os, "fsync", real_fsync)
    msg = str(e.value)
    assert str(target) in msg and "no space left" in msg.lower()
    assert target.read_text() == "previous run\n"
    assert sorted(p.name for p in target.parent.iterdir()) == before


def test_full_disk_in_a_real_stage_process(tiny, tmp_path):
    """A real stage subprocess whose writes fail (file-size limit standing in for a full disk): exit 2 with one
    line naming the output, no traceback, and the previous outputs are still there, byte for byte."""
    root = fresh(tiny, tmp_path)
    before = tree_bytes(root, "data/prepared")
    code = ("import resource, runpy, signal, sys; signal.signal(signal.SIGXFSZ, signal.SIG_IGN); "
            "resource.setrlimit(resource.RLIMIT_FSIZE, (512, 512)); sys.argv = ['stages/prepare.py']; "
            "runpy.run_module('stages.prepare', run_name='__main__', alter_sys=True)")
    res = subprocess.run([sys.executable, "-c", code], cwd=root, env=tool_env(root=root), capture_output=True,
                         text=True)
    assert res.returncode == 2, res.stderr[-2000:]
    assert "Traceback" not in res.stderr
    line = res.stderr.strip().splitlines()[-1]
    assert line.startswith("error: ") and "data/prepared/" in line and "disk" in line, line
    assert tree_bytes(root, "data/prepared") == before


def test_missing_model_is_a_clear_error(tiny, tmp_path):
    root = fresh(tiny, tmp_path)
    shutil.rmtree(root / "models/teacher")
    res = stage(root, "-m", "stages.logits", S, check=False)
    assert res.returncode == 2 and "Traceback" not in res.stderr
    assert "models/teacher" in res.stderr.strip().splitlines()[-1]
    assert (root / f"data/logits/{S}/manifest.json").exists(), "the previous output was kept"


def test_model_folder_without_safetensors_is_refused(tiny, tmp_path):
    from kd.models.loading import load_model

    root = fresh(tiny, tmp_path)
    for f in (root / "models/student").glob("*.safetensors"):
        f.rename(f.with_suffix(".bin"))
    with pytest.raises(ArtefactError, match="safetensors"):
        load_model(root / "models/student")


# ------------------------------------------------------------------------------------ atomic writes vs DVC


def test_killed_writer_leaves_the_old_file_and_a_temp_dvc_ignores(tmp_path):
    """SIGKILL while kd.core.io writes an output inside a DVC-tracked folder: the output keeps its old bytes, and the temp
    folder left behind is ignored by DVC (.dvcignore), so the folder's hash, and dvc status, do not change."""
    root = make_copy(ROOT, tmp_path / "project")
    placeholder_outputs(root)
    target = root / "data/prepared/transfer.jsonl"
    old = target.read_bytes()
    code = ("import os, signal, sys; sys.path.insert(0, '.'); from kd.core.io import atomic_path\n"
            "with atomic_path('data/prepared/transfer.jsonl') as tmp:\n"
            "    f = open(tmp, 'w'); f.write('half'); f.flush(); os.kill(os.getpid(), signal.SIGKILL)\n")
    res = subprocess.run([sys.executable, "-c", code], cwd=root, env=tool_env(root=root), capture_output=True,
                         text=True)
    assert res.returncode == -signal.SIGKILL
    assert target.read_bytes() == old
    leftovers = list((root / "data/prepared").glob(".transfer.jsonl.*.tmp"))
    assert leftovers, "expected the killed writer's temp folder"
    from kd.harness.dvc_project import stale_stages

    assert stale_stages(root) == set(), "DVC saw the temp folder inside an output"


def test_failed_stage_under_kd_repro_gets_its_outputs_back(tmp_path):
    """DVC deletes a stage's outputs before running it. A stage that then fails (here: report, whose inputs are
    placeholders it cannot read) would leave the user without them; `kd repro` restores them, cached and uncached,
    exactly as dvc.lock records them."""
    root = make_copy(ROOT, tmp_path / "project")
    placeholder_outputs(root)
    lock = read_lock(root)
    outs = [o["path"] for o in lock["report"]["outs"]]
    before = tree_bytes(root, *outs)
    with open(root / "kd/report/templates/report.md.j2", "a", encoding="utf-8") as f:  # a dep of the report stage alone
        f.write("{# edited #}\n")

    res = subprocess.run([sys.executable, "-m", "kd.tools.cli", "repro", "report"], cwd=root, env=tool_env(root=root),
                         capture_output=True, text=True)
    assert res.returncode != 0
    assert "restored the previous outputs" in res.stdout and "report" in res.stdout, res.stdout[-2000:]
    assert tree_bytes(root, *outs) == before
    assert read_lock(root) == lock

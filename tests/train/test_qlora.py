"""QLoRA students on the CPU (kd/train/qlora.py, kd.models.loading.load_model(quantization=)): the tiny profile with
`student.quantization: bnb-4bit` and `distill.optimizer: adamw-8bit` through the real stages (bitsandbytes' CPU
backend, peft's bitsandbytes LoRA layers), the adapter evaluated on its quantized base; params refuse what cannot
work, naming the key and the allowed values."""

import copy
import csv
import json
import math
import subprocess
import sys
from pathlib import Path

import pytest
import torch
import yaml
from stage_runner import in_process

from kd.config.params import parse, validate
from kd.config.profiles import load as load_profile
from kd.core.errors import ParamError
from kd.harness.verify import make_copy

ROOT = Path(__file__).resolve().parents[2]
pytest.importorskip("bitsandbytes")  # a declared dependency; skipped only in an environment that lacks it
pytestmark = pytest.mark.slow


def tiny(**student) -> dict:
    p = load_profile("tiny", ROOT)
    p["prompting"]["strategies"] = ["none"]
    p["student"].update(student)
    return p


def _distill(**settings):
    """The tiny profile's typed distill.* section with some settings changed."""
    return parse(tiny()).distill.model_copy(update=settings)


@pytest.mark.parametrize("edit, key, allowed", [
    (lambda p: p["student"].update(quantization="bnb-2bit"), "student.quantization", "bnb-4bit, bnb-8bit"),
    (lambda p: p["distill"].update(optimizer="adam"), "distill.optimizer", "sgd, adamw, adamw-8bit, paged-adamw-8bit"),
    (lambda p: (p["student"].update(quantization="bnb-4bit", dtype="float32"), p["teacher"].update(dtype="float32"),
                p["compute"].update(portable=True)), "student.quantization", "compute.portable false"),
    (lambda p: (p["distill"].update(optimizer="adamw-8bit"), p["student"].update(dtype="float32"),
                p["teacher"].update(dtype="float32"), p["compute"].update(portable=True)),
     "distill.optimizer", "sgd or adamw with compute.portable true"),
])
def test_params_refuse_what_cannot_work(edit, key, allowed):
    p = tiny()
    edit(p)
    with pytest.raises(ParamError) as e:
        validate(p, root=ROOT)
    assert f"`{key}`" in str(e.value) and allowed in str(e.value), str(e.value)


@pytest.fixture(scope="module")
def qlora(tmp_path_factory):
    root = make_copy(ROOT, tmp_path_factory.mktemp("qlora") / "project")
    p = tiny(quantization="bnb-4bit")
    p["distill"].update(optimizer="adamw-8bit", lr=0.01, epochs=3, checkpoint_every=5)
    (root / "params.yaml").write_text(yaml.safe_dump(p, sort_keys=False), encoding="utf-8")
    for args in (("prepare",), ("model", "teacher"), ("model", "student"), ("teacher", "none"), ("logits", "none"),
                 ("distill", "none"), ("eval", "kd-none")):
        in_process(root, *args)
    return root, p


def test_qlora_student_trains_on_cpu(qlora):
    root, p = qlora
    m = json.loads((root / "results/distill/none.json").read_text())
    assert m["steps"] == 3 * m["examples"] > 0 and math.isfinite(m["final_loss"])
    with open(root / "reports/distill/none/plots/metrics/train/loss.tsv") as f:
        losses = [float(r["loss"]) for r in csv.DictReader(f, delimiter="\t")]
    n = m["examples"]
    first, last = sum(losses[:n]) / n, sum(losses[-n:]) / n
    assert all(math.isfinite(x) for x in losses) and last < first, (first, last)
    assert (root / "models/kd-none/adapter_model.safetensors").exists()
    assert json.loads((root / "models/kd-none/adapter_config.json").read_text())["r"] == p["distill"]["lora"]["r"]


def test_adapter_is_evaluated_on_its_4bit_base(qlora):
    import bitsandbytes as bnb
    from safetensors.torch import load_file

    from kd.models.loading import load_adapted

    root, p = qlora
    model = load_adapted(root / "models/student", root / "models/kd-none", p["student"]["dtype"],
                         quantization="bnb-4bit", device="cpu")
    q = model.base_model.model.model.layers[0].self_attn.q_proj
    assert isinstance(q.base_layer, bnb.nn.Linear4bit), type(q.base_layer)
    saved = load_file(str(root / "models/kd-none/adapter_model.safetensors"))
    name = next(k for k in saved if "layers.0.self_attn.q_proj.lora_B" in k)
    assert torch.equal(q.lora_B["default"].weight.detach().cpu(), saved[name])   # the trained adapter, not a fresh one
    assert saved[name].abs().sum() > 0
    ev = json.loads((root / "results/eval/kd-none.json").read_text())
    assert ev["n"] == p["prepare"]["eval_size"] and 0.0 <= ev["accuracy_strict"] <= 1.0


def test_8bit_optimizer_state_survives_a_checkpoint(tmp_path):
    """AdamW8bit's quantized moments and step count go into the resumable checkpoint and come back exactly."""
    from kd.train.checkpoint import Checkpoint
    from kd.train.qlora import make_optimizer

    torch.manual_seed(0)
    model = torch.nn.Linear(64, 64)
    cfg = _distill(optimizer="adamw-8bit", lr=1e-3, weight_decay=0.01, momentum=0.9)
    opt = make_optimizer(list(model.parameters()), cfg)
    for _ in range(2):
        model(torch.randn(4, 64)).pow(2).mean().backward()
        opt.step()
        opt.zero_grad()
    ck = Checkpoint(tmp_path / "c.safetensors", "fp")
    ck.save(model, opt, 2, [])
    model2 = copy.deepcopy(model)
    with torch.no_grad():
        for q in model2.parameters():
            q.zero_()
    opt2 = make_optimizer(list(model2.parameters()), cfg)
    assert ck.load(model2, opt2)[0] == 2
    for a, b in zip(model.parameters(), model2.parameters()):
        assert torch.equal(a, b)
        sa, sb = opt.state[a], opt2.state[b]
        assert set(sa) == set(sb) and sa["step"] == sb["step"] and isinstance(sb["step"], type(sa["step"]))
        for k, v in sa.items():
            if torch.is_tensor(v):
                assert torch.equal(v, sb[k]), k


def test_missing_bitsandbytes_is_named_by_what_needs_it(qlora, monkeypatch):
    """One availability check (kd.models.loading.import_bnb) for a quantized load and an 8-bit optimiser alike."""
    from kd.core.errors import ArtefactError
    from kd.models.loading import load_model
    from kd.train.qlora import make_optimizer

    root, _ = qlora
    monkeypatch.setitem(sys.modules, "bitsandbytes", None)  # what `import bitsandbytes` meets where it is absent
    cfg = _distill(optimizer="adamw-8bit", lr=1e-3, weight_decay=0.0, momentum=0.9)
    with pytest.raises(ArtefactError, match=r"distill\.optimizer=adamw-8bit needs bitsandbytes"):
        make_optimizer(list(torch.nn.Linear(2, 2).parameters()), cfg)
    with pytest.raises(ArtefactError, match=r"quantization=bnb-4bit needs bitsandbytes"):
        load_model(root / "models/student", quantization="bnb-4bit", device="cpu")
    with pytest.raises(ParamError, match="sgd, adamw, adamw-8bit, paged-adamw-8bit"):  # a bad name before any import
        make_optimizer([], cfg.model_copy(update={"optimizer": "adam"}))  # past the params' own check


def test_qlora_imports_neither_torch_nor_bitsandbytes():
    """kd.config.params imports kd.train.qlora for its checks: bitsandbytes (and torch) load only where an optimiser is made."""
    code = "import sys, kd.train.qlora; print(sorted(m for m in ('torch', 'bitsandbytes') if m in sys.modules))"
    out = subprocess.run([sys.executable, "-c", code], cwd=ROOT, capture_output=True, text=True, check=True).stdout
    assert out.strip() == "[]", out

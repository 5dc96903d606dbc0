"""kd.models.loading.check_safetensors: a header whose shapes, dtypes or byte ranges do not describe the file is one
ArtefactError naming the file and the tensor, before any tensor is read."""

from __future__ import annotations

import json
import struct

import pytest
import torch
from safetensors.torch import save_file

from kd.core.errors import ArtefactError
from kd.models.loading import check_safetensors


def _file(path, header: dict, data: bytes):
    raw = json.dumps(header).encode()
    path.write_bytes(struct.pack("<Q", len(raw)) + raw + data)
    return path


def test_a_real_file_passes(tmp_path):
    f = tmp_path / "ok.safetensors"
    save_file({"a": torch.zeros(3, 4, dtype=torch.bfloat16), "b": torch.arange(5), "e": torch.zeros(0)}, str(f))
    header = check_safetensors(f)
    assert header["a"]["shape"] == [3, 4] and header["b"]["dtype"] == "I64"


@pytest.mark.parametrize("header, data, why", [
    ({"a": {"dtype": "F32", "shape": [2 ** 40, 2 ** 40], "data_offsets": [0, 8]}}, 8, "needs"),       # huge shape
    ({"a": {"dtype": "F32", "shape": [2], "data_offsets": [0, 8]},
      "b": {"dtype": "F32", "shape": [2], "data_offsets": [4, 12]}}, 12, "overlapping another tensor"),
    ({"a": {"dtype": "F32", "shape": [1], "data_offsets": [4, 8]}}, 8, "a gap before it"),
    ({"a": {"dtype": "Q4", "shape": [2], "data_offsets": [0, 8]}}, 8, "has dtype 'Q4', not one of"),
    ({"a": {"dtype": "F32", "shape": [-2], "data_offsets": [0, 8]}}, 8, "no valid shape"),
    ({"a": {"dtype": "F32", "shape": [2.0], "data_offsets": [0, 8]}}, 8, "no valid shape"),
])
def test_a_header_that_does_not_describe_the_file_is_refused(tmp_path, header, data, why):
    f = _file(tmp_path / "bad.safetensors", header, b"\0" * data)
    with pytest.raises(ArtefactError, match="bad.safetensors: not a valid safetensors file") as e:
        check_safetensors(f, "re-run `dvc repro model@student`")
    assert why in str(e.value) and "re-run `dvc repro model@student`" in str(e.value)
    assert "\n" not in str(e.value) and len(str(e.value)) < 400


@pytest.fixture(scope="module")
def adapter(tiny_models, tmp_path_factory):
    """A real LoRA adapter (peft, r=4, q_proj/v_proj) over the tiny student, saved as the stages save it."""
    from kd.config.params import Lora
    from kd.train.run import lora_student, save_adapter

    out = tmp_path_factory.mktemp("adapter") / "kd-none"
    lora = Lora(r=4, alpha=8, dropout=0.0, target_modules=["q_proj", "v_proj"])
    save_adapter(lora_student(tiny_models / "student", "float32", False, lora, 0), out)
    return out


@pytest.mark.parametrize("edit, why", [
    ({"r": 0}, "r is 0, not an integer in [1, 4096]"),
    ({"r": 10 ** 6}, "r is 1000000, not an integer in [1, 4096]"),
    ({"r": "4"}, "r is 4, not an integer"),
    ({"r": 8}, "is not a LoRA weight of rank r=8"),                       # config and weights disagree
    ({"target_modules": ["q_proj", "nope_proj"]}, "target_modules nope_proj not in the model"),
    ({"target_modules": "q_proj|v_proj"}, "target_modules is not a list of module names"),
])
def test_a_broken_adapter_is_refused_before_any_weight_loads(adapter, tiny_models, tmp_path, monkeypatch, edit, why):
    import shutil

    import kd.models.loading as loading
    from kd.models.loading import check_adapter, load_adapted

    bad = tmp_path / "kd-none"
    shutil.copytree(adapter, bad)
    cfg = json.loads((bad / "adapter_config.json").read_text())
    (bad / "adapter_config.json").write_text(json.dumps({**cfg, **edit}))
    check_adapter(adapter, tiny_models / "student")  # the untouched one passes
    monkeypatch.setattr(loading, "load_model", lambda *a, **k: pytest.fail("the model loaded before the check"))
    with pytest.raises(ArtefactError, match="adapter_config.json|adapter_model.safetensors") as e:
        load_adapted(tiny_models / "student", bad, "float32")
    assert why in str(e.value) and str(bad) in str(e.value) and "dvc repro" in str(e.value)


def test_a_symlinked_adapter_folder_is_refused(adapter, tiny_models, tmp_path):
    from kd.models.loading import check_adapter

    (tmp_path / "kd-none").symlink_to(adapter)
    with pytest.raises(ArtefactError, match=r"kd-none: a symlink \(to .*\), not the adapter folder"):
        check_adapter(tmp_path / "kd-none", tiny_models / "student", "re-run `dvc repro distill@none`")

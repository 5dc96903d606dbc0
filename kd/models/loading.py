"""Load materialised model folders (models/<name>) for use: safetensors only, no remote code unless asked."""

from __future__ import annotations

import json
import math
import os
from pathlib import Path

import torch

from kd.core.dtypes import torch_dtype
from kd.core.errors import ArtefactError


def _check_dir(path: str | Path) -> Path:
    path = Path(path)
    if not (path / "config.json").is_file():
        raise ArtefactError(f"{path}: not a model folder (no config.json); run `dvc repro model@...` first")
    try:
        json.loads((path / "config.json").read_text(encoding="utf-8"))
    except (ValueError, UnicodeDecodeError) as e:
        raise ArtefactError(f"{path}/config.json: not valid JSON ({e}); re-run `dvc repro model@...`") from None
    files = sorted(path.glob("*.safetensors"))
    if not files:
        raise ArtefactError(f"{path}: no .safetensors weights (kd-prime loads safetensors only)")
    for f in files:
        check_safetensors(f)
    return path


SAFETENSORS_MAX_HEADER = 100 << 20  # the format's own limit (100 MB)


# bytes per element of every safetensors dtype (the format's spec)
SAFETENSORS_DTYPE_BYTES = {"BOOL": 1, "U8": 1, "I8": 1, "F8_E5M2": 1, "F8_E4M3": 1, "I16": 2, "U16": 2, "F16": 2,
                           "BF16": 2, "I32": 4, "U32": 4, "F32": 4, "I64": 8, "U64": 8, "F64": 8,
                           "F8_E8M0": 1, "C64": 8}


def check_safetensors(path: str | Path, rerun: str = "re-run the stage that wrote it") -> dict:
    """Read and check a .safetensors file's header without loading any tensor: a JSON header whose tensors' byte
    ranges exactly tile the rest of the file. Garbage, a truncated or a padded file is one ArtefactError.
    Returns the header (name -> {dtype, shape, data_offsets})."""
    path = Path(path)

    def bad(why: str) -> ArtefactError:
        return ArtefactError(f"{path}: not a valid safetensors file ({why}); {rerun}")

    size = path.stat().st_size
    with open(path, "rb") as f:
        head = f.read(8)
        if len(head) < 8:
            raise bad(f"{size} bytes, shorter than a header")
        n = int.from_bytes(head, "little")
        if n > min(size - 8, SAFETENSORS_MAX_HEADER):
            raise bad(f"header length {n} does not fit the file")
        try:
            header = json.loads(f.read(n))
        except (ValueError, UnicodeDecodeError):
            raise bad("header is not JSON") from None
    if not isinstance(header, dict):
        raise bad("header is not a JSON object")
    spans = []
    for name, meta in header.items():
        if name == "__metadata__":
            continue
        offs = meta.get("data_offsets") if isinstance(meta, dict) else None
        shape = meta.get("shape") if isinstance(meta, dict) else None
        if not (isinstance(offs, list) and len(offs) == 2 and all(type(o) is int for o in offs)
                and 0 <= offs[0] <= offs[1] and isinstance(shape, list)
                and all(type(d) is int and d >= 0 for d in shape)):
            raise bad(f"tensor {name!r} has no valid shape/data_offsets")
        if meta.get("dtype") not in SAFETENSORS_DTYPE_BYTES:
            raise bad(f"tensor {name!r} has dtype {str(meta.get('dtype'))[:20]!r}, not one of "
                      f"{', '.join(sorted(SAFETENSORS_DTYPE_BYTES))}")
        need = math.prod(shape) * SAFETENSORS_DTYPE_BYTES[meta["dtype"]]
        if need != offs[1] - offs[0]:
            raise bad(f"tensor {name!r}: shape {str(shape)[:80]} of {meta['dtype']} needs {need} bytes, its "
                      f"data_offsets span {offs[1] - offs[0]}")
        spans.append((offs[0], offs[1], name))
    end = 0
    for start, stop, name in sorted(spans):  # the tensors tile the data: no overlap, no gap
        if start != end:
            raise bad(f"tensor {name!r} starts at byte {start} of the data, not at {end}: "
                      f"{'overlapping another tensor' if start < end else 'a gap before it'}")
        end = stop
    if 8 + n + end != size:
        raise bad(f"the header describes {8 + n + end} bytes, the file has {size}: truncated or altered")
    return header


def load_tokenizer(path: str | Path, trust_remote_code: bool = False):
    from transformers import AutoTokenizer

    if not any((Path(path) / f).is_file() for f in ("tokenizer.json", "tokenizer_config.json", "tokenizer.model")):
        raise ArtefactError(f"{path}: no tokenizer files (tokenizer.json / tokenizer_config.json); "
                            "run `dvc repro model@...` first")
    tok = AutoTokenizer.from_pretrained(str(path), trust_remote_code=trust_remote_code)
    if tok.pad_token_id is None:
        tok.pad_token = tok.eos_token
    tok.padding_side = "left"  # generation pads on the left; training builds its own tensors
    return tok


def import_bnb(what: str):
    """The bitsandbytes module, imported only when a quantized model or an 8-bit optimiser asks for it; a clear
    error naming `what` needs it where it is not installed (the one availability check: kd/train/qlora.py uses it too)."""
    try:
        import bitsandbytes
    except ImportError:
        raise ArtefactError(f"{what} needs bitsandbytes (pip install bitsandbytes); it is not installed") from None
    return bitsandbytes


def load_model(path: str | Path, dtype: str = "bfloat16", trust_remote_code: bool = False,
               attn_implementation: str | None = None, device: str | None = None,
               quantization: str | None = None):
    """quantization: None, "bnb-4bit" (NF4, compute in `dtype`) or "bnb-8bit": bitsandbytes at load time, on CUDA
    (spread over every visible GPU) or on the CPU (bitsandbytes >= 0.48 runs both there).
    The output layer is never quantized (bitsandbytes skips lm_head), so the teacher signal stays exact."""
    from transformers import AutoModelForCausalLM

    path = _check_dir(path)
    kwargs = dict(dtype=torch_dtype(dtype), trust_remote_code=trust_remote_code, use_safetensors=True)
    if attn_implementation:
        kwargs["attn_implementation"] = attn_implementation
    if quantization:
        import_bnb(f"quantization={quantization}")
        from transformers import BitsAndBytesConfig

        kwargs["quantization_config"] = (
            BitsAndBytesConfig(load_in_4bit=True, bnb_4bit_quant_type="nf4", bnb_4bit_compute_dtype=torch_dtype(dtype))
            if quantization == "bnb-4bit" else BitsAndBytesConfig(load_in_8bit=True))
        where = device or default_device()
        # one process's own GPU (kd/core/launch.py: cuda:<local rank>), else spread over every visible GPU, or the CPU
        kwargs["device_map"] = {"": where} if where.startswith("cuda:") else "auto" if where == "cuda" else "cpu"
    model = AutoModelForCausalLM.from_pretrained(str(path), **kwargs)
    if not quantization:
        model.to(device or default_device())
    else:
        _narrow_nf4_off_cpu_fast_path(model)
    model.eval()
    return model


def check_adapter(adapter: str | Path, pretrained: str | Path, rerun: str = "re-run the stage that wrote it") -> None:
    """A LoRA adapter folder checked from its files alone, before any weight loads: adapter_config.json's r within
    distill.lora.r's bounds and equal to the saved weights' rank, target_modules a list of module names the base
    model (its safetensors headers) has, and adapter_model.safetensors a valid file of lora_A/lora_B weights."""
    from kd.config.params import LORA_R_MAX

    adapter, pretrained = Path(adapter), Path(pretrained)
    if adapter.is_symlink():  # the stages write adapters as folders: a link was planted (it may lead anywhere)
        raise ArtefactError(f"{adapter}: a symlink (to {str(os.readlink(adapter))[:120]}), not the adapter folder the "
                            f"training stage writes; remove it and {rerun}")
    for f in ("adapter_config.json", "adapter_model.safetensors"):
        if not (adapter / f).is_file():
            raise ArtefactError(f"{adapter}: not a LoRA adapter folder (no {f}); {rerun}")
    where = adapter / "adapter_config.json"
    try:
        cfg = json.loads(where.read_text(encoding="utf-8"))
    except (ValueError, UnicodeDecodeError) as e:
        raise ArtefactError(f"{where}: not valid JSON ({e}); {rerun}") from None
    r, targets = (cfg.get("r"), cfg.get("target_modules")) if isinstance(cfg, dict) else (None, None)
    if type(r) is not int or not 1 <= r <= LORA_R_MAX:
        raise ArtefactError(f"{where}: r is {str(r)[:40]}, not an integer in [1, {LORA_R_MAX}]; {rerun}")
    if not (isinstance(targets, list) and targets and all(isinstance(m, str) for m in targets)):
        raise ArtefactError(f"{where}: target_modules is not a list of module names; {rerun}")
    modules = {name.rsplit(".", 1)[0] for f in sorted(pretrained.glob("*.safetensors"))  # weight -> its module
               for name in check_safetensors(f) if name != "__metadata__"}
    if missing := sorted(m for m in set(targets) if not any(x == m or x.endswith("." + m) for x in modules)):
        short = sorted({x.rsplit(".", 1)[-1] for x in modules})
        raise ArtefactError(f"{where}: target_modules {', '.join(m[:40] for m in missing[:5])} not in the model "
                            f"{pretrained} (its modules: {', '.join(short[:12])}); {rerun}")
    weights = adapter / "adapter_model.safetensors"
    for name, meta in check_safetensors(weights, rerun).items():
        if name == "__metadata__":
            continue
        rank = meta["shape"][0] if "lora_A" in name else meta["shape"][-1] if "lora_B" in name else None
        if rank is None or len(meta["shape"]) != 2 or rank != r:
            raise ArtefactError(f"{weights}: tensor {name[:80]!r} (shape {meta['shape']}) is not a LoRA weight of "
                                f"rank r={r} (adapter_config.json); {rerun}")


def load_adapted(pretrained: str | Path, adapter: str | Path | None, dtype: str = "bfloat16",
                 trust_remote_code: bool = False, attn_implementation: str | None = None,
                 device: str | None = None, quantization: str | None = None):
    """A model exactly as it was trained: the base weights plus, for an adapter arm, the LoRA adapter kept
    *unmerged* (peft keeps the adapter weights in float32).

    Merging folds B·A into the base weights in their own dtype: in bf16 most of a small update (the default's
    ‖ΔW‖/‖W‖ is ~2e-4, below bf16's 2^-8 relative step) rounds away, so a merged student is not the one that was
    trained. Eval and the attention report both load through here."""
    if adapter is not None:  # before the base model loads
        check_adapter(adapter, pretrained, "run the stage that writes it (`dvc repro`)")
    model = load_model(pretrained, dtype, trust_remote_code, attn_implementation=attn_implementation,
                       device=device, quantization=quantization)  # a QLoRA adapter: on its quantized base
    if adapter is None:
        return model
    from peft import PeftModel

    model = PeftModel.from_pretrained(model, str(adapter), is_trainable=False)
    model.eval()
    return model


def _narrow_nf4_off_cpu_fast_path(model) -> None:
    """bitsandbytes 0.50's CPU inference fast path for NF4 repacks each weight in blocks of 64 input columns and
    crashes on a layer narrower than that (the tiny student's 32): keep such layers on the plain NF4 path."""
    from bitsandbytes.nn import Linear4bit

    for m in model.modules():
        if isinstance(m, Linear4bit) and m.in_features % 64 and getattr(m, "support_avx512bf16_for_cpu", False):
            m.support_avx512bf16_for_cpu = False


def default_device() -> str:
    return "cuda" if torch.cuda.is_available() else "cpu"

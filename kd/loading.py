"""Load materialised model folders (models/<name>) for use: safetensors only, no remote code unless asked."""

from __future__ import annotations

from pathlib import Path

import torch

from kd.errors import ArtefactError

DTYPES = {"bfloat16": torch.bfloat16, "float32": torch.float32, "float16": torch.float16}


def _check_dir(path: str | Path) -> Path:
    path = Path(path)
    if not (path / "config.json").exists():
        raise ArtefactError(f"{path}: not a model folder (no config.json); run `dvc repro model@...` first")
    if not any(path.glob("*.safetensors")):
        raise ArtefactError(f"{path}: no .safetensors weights (kd-prime loads safetensors only)")
    return path


def load_tokenizer(path: str | Path, trust_remote_code: bool = False):
    from transformers import AutoTokenizer

    tok = AutoTokenizer.from_pretrained(str(path), trust_remote_code=trust_remote_code)
    if tok.pad_token_id is None:
        tok.pad_token = tok.eos_token
    tok.padding_side = "left"  # generation pads on the left; training builds its own tensors
    return tok


def load_model(path: str | Path, dtype: str = "bfloat16", trust_remote_code: bool = False,
               attn_implementation: str | None = None, device: str | None = None):
    from transformers import AutoModelForCausalLM

    path = _check_dir(path)
    kwargs = dict(dtype=DTYPES[dtype], trust_remote_code=trust_remote_code, use_safetensors=True)
    if attn_implementation:
        kwargs["attn_implementation"] = attn_implementation
    model = AutoModelForCausalLM.from_pretrained(str(path), **kwargs)
    model.to(device or default_device())
    model.eval()
    return model


def default_device() -> str:
    return "cuda" if torch.cuda.is_available() else "cpu"

"""Convert a model to a plain HF folder (dense safetensors in a dtype + tokenizer + chat template +
generation_config): from a hub id or local folder (from_pretrained) or a GGUF file (dequantised); and describe
a saved folder (parameters, vocab, file hashes)."""

from __future__ import annotations

import contextlib
import gc
import json
from pathlib import Path
from typing import Any

from kd.core.dtypes import torch_dtype as _torch_dtype
from kd.core.errors import KdError
from kd.core.io import sha256_file
from kd.models.chat_template import check_chat_template
from kd.models.vocab import config_value


def describe_folder(folder: str | Path, trust_remote_code: bool = False) -> dict:
    """Check a saved folder is complete (config, safetensors, tokenizer with a chat template) and describe it."""
    from safetensors import safe_open
    from transformers import AutoTokenizer

    folder = Path(folder)
    config = json.loads((folder / "config.json").read_text(encoding="utf-8"))
    shards = sorted(folder.glob("*.safetensors"))
    if not shards:
        raise KdError(f"{folder}: no .safetensors weights were written")
    params = 0
    for shard in shards:
        with safe_open(str(shard), framework="pt") as f:
            for name in f.keys():
                n = 1
                for d in f.get_slice(name).get_shape():
                    n *= d
                params += n
    tok = AutoTokenizer.from_pretrained(str(folder), trust_remote_code=trust_remote_code)
    if not tok.chat_template:
        raise KdError(f"{folder}: the tokenizer has no chat template (kd-prime prompts through the chat template; "
                      f"use an instruct/chat model)")
    check_chat_template(tok.chat_template, str(folder))  # bounded: a hostile template stops here, at the model stage
    files = {str(p.relative_to(folder)): sha256_file(p) for p in sorted(folder.rglob("*")) if p.is_file()}
    return {
        "parameters": params,
        "vocab_size": config_value(config, "vocab_size"),
        "tokenizer_size": len(tok),
        "architecture": (config.get("architectures") or [None])[0],
        "files": files,
        "bytes": sum((folder / f).stat().st_size for f in files),
    }


def save_folder(model, tok, out: Path, dtype: str) -> None:
    """save_pretrained a dense model + tokenizer as safetensors; make generation_config agree with the tokenizer."""
    model.to(_torch_dtype(dtype))
    gen = getattr(model, "generation_config", None)
    if gen is not None:
        if gen.eos_token_id is None and tok.eos_token_id is not None:
            gen.eos_token_id = tok.eos_token_id
        if gen.pad_token_id is None:
            gen.pad_token_id = tok.pad_token_id if tok.pad_token_id is not None else tok.eos_token_id
    model.save_pretrained(str(out), safe_serialization=True)
    tok.save_pretrained(str(out))


def convert_pretrained(source: str, out: Path, dtype: str, trust_remote_code: bool, *,
                        revision: str | None = None, local: bool = False) -> None:
    from transformers import AutoModelForCausalLM, AutoTokenizer

    kw: dict[str, Any] = dict(trust_remote_code=trust_remote_code)
    if revision:
        kw["revision"] = revision
    if local:
        kw["local_files_only"] = True
    where = f"{source}" + (f"@{revision}" if revision else "")
    try:
        tok = AutoTokenizer.from_pretrained(source, **kw)
        model = AutoModelForCausalLM.from_pretrained(source, dtype=_torch_dtype(dtype), **kw)
    except (OSError, ValueError) as e:  # missing files, no network, gated repo, unknown architecture
        hint = "" if local else " (needs network access to the Hugging Face hub, or a warm HF cache)"
        raise KdError(f"model {where}: could not load{hint}: {type(e).__name__}: {str(e).splitlines()[0]}") \
            from None
    if getattr(model, "hf_quantizer", None) is not None:
        raise KdError(f"model {where} is quantized ({type(model.hf_quantizer).__name__}); kd-prime needs dense "
                      f"weights: point at the unquantized model, or its .gguf file")
    save_folder(model, tok, out, dtype)
    del model
    gc.collect()


def convert_gguf(gguf: Path, out: Path, dtype: str) -> None:
    """Load a GGUF with transformers' GGUF support, fully dequantised, and save it as a plain folder."""
    import torch
    from transformers import AutoModelForCausalLM, AutoTokenizer

    kw: dict[str, Any] = {}
    try:  # transformers >= 5 can keep GGUF blocks packed (GgufHfQuantizer); we need dense weights to save
        from transformers import GgufConfig

        kw["quantization_config"] = GgufConfig(dequantize=True)
    except ImportError:  # older transformers always dequantises
        pass
    try:
        model = AutoModelForCausalLM.from_pretrained(str(gguf.parent), gguf_file=gguf.name,
                                                     dtype=_torch_dtype(dtype), **kw)
        tok = AutoTokenizer.from_pretrained(str(gguf.parent), gguf_file=gguf.name)
    except Exception as e:  # noqa: BLE001 - a truncated or garbled file fails anywhere inside the GGUF reader
        raise KdError(f"{gguf}: transformers could not load this GGUF (truncated, or not a GGUF "
                      f"model: {type(e).__name__}: {str(e).splitlines()[0] if str(e) else ''})") from None
    # A GGUF-loaded model carries a quantizer that refuses save_pretrained; the weights are dense now.
    model.hf_quantizer = None
    for cfg in (model.config, getattr(model.config, "text_config", None)):
        if cfg is not None and hasattr(cfg, "quantization_config"):
            with contextlib.suppress(AttributeError):
                delattr(cfg, "quantization_config")
    packed = [n for n, p in model.named_parameters() if not torch.is_floating_point(p)]
    if packed:
        raise KdError(f"{gguf}: weights still packed after loading ({packed[:3]}...); cannot save them dense")
    if not tok.chat_template:
        raise KdError(f"{gguf}: the GGUF has no tokenizer.chat_template; kd-prime needs a chat model")
    save_folder(model, tok, out, dtype)
    del model
    gc.collect()

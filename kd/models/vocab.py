"""Do a teacher and a student share token ids? Distillation compares their next-token distributions column by column,
so it needs the same id -> token mapping (not the same configs). Its own module so that the stages using it do not
depend on the model download and conversion code."""

from __future__ import annotations

import json
import re
from pathlib import Path

from kd.core.errors import KdError

_PROBE = ("<|im_start|>user\nNatalia sold clips to 48 of her friends in April, and then she sold half as many "
          "clips in May. How many clips did she sell altogether?<|im_end|>\n<|im_start|>assistant\n"
          "48 / 2 = 24\n#### 72 \u00e9\u4e2d\U0001f600\t  x<|im_end|>")


_PLACEHOLDER = re.compile(r"\[PAD(\d+)\]")


def config_value(cfg: dict, key: str):
    """A model config.json's `key`: at the top level, else (a multimodal config) under `text_config`; None where
    neither has it. The one place that knows where a config keeps its text model's sizes."""
    text = cfg["text_config"] if isinstance(cfg.get("text_config"), dict) else {}
    for c in (cfg, text):
        if key in c:
            return c[key]
    return None


def _real_vocab(vocab: dict[str, int]) -> dict[str, int]:
    """get_vocab() without llama.cpp's `[PAD<id>]` placeholders (GGUFs pad the token list up to the logits width;
    the hub tokenizer of the same model has no such entries). They stand for no text and no tokenizer emits them."""
    return {k: v for k, v in vocab.items() if not ((m := _PLACEHOLDER.fullmatch(k)) and int(m[1]) == v)}


def check_same_vocab(teacher_dir: str | Path, student_dir: str | Path, trust_remote_code: bool = False) -> dict:
    """Raise KdError unless the teacher's token ids mean the same thing to the student.

    Distillation feeds the teacher's response token ids to the student and compares the two next-token
    distributions column by column, so what must match is the id -> token mapping, not the model configs:
      * get_vocab() (token -> id, added tokens included) must be identical, ignoring llama.cpp `[PAD<id>]`
        placeholders (a GGUF-converted tokenizer lists them up to the logits width, a hub one does not);
      * the eos token must be the same, so the student learns to stop where the teacher stopped;
      * a probe text (chat markup, digits, non-ASCII), encoded as prompts are (special tokens on), must give the
        same ids: catches different merges, pre-tokenisers or BOS handling behind an identical vocabulary.
        (Which tokens a tokenizer *labels* special may differ, e.g. a GGUF-converted Qwen tokenizer lists only
        eos/pad as special while the hub one also lists <|im_start|>...; the ids are what matter.)
      * each model's logits width (config vocab_size) must cover every real token id.
    The logits widths themselves may differ: configs pad the output layer (151,936 for Qwen2.5-0.5B/1.5B, 152,064
    for 7B) and the padding rows belong to no token. Decision: KD compares the first `kd_width` = (max real token
    id + 1) columns of both models and drops the rest before the softmax; that is exact whenever neither model
    ever emits a padding id (they are trained to ~zero probability). kd_width is returned for the loss code.
    Returns {"tokenizer_size", "kd_width", "teacher_logits", "student_logits", "same_chat_template"}.
    """
    from transformers import AutoTokenizer

    dirs = {"teacher": Path(teacher_dir), "student": Path(student_dir)}
    toks, widths = {}, {}
    for role, d in dirs.items():
        if not (d / "config.json").is_file():
            raise KdError(f"{d}: not a model folder (no config.json); materialise the {role} first")
        cfg = json.loads((d / "config.json").read_text(encoding="utf-8"))
        widths[role] = config_value(cfg, "vocab_size")
        toks[role] = AutoTokenizer.from_pretrained(str(d), trust_remote_code=trust_remote_code)
    t, s = toks["teacher"], toks["student"]
    where = f"teacher {dirs['teacher']} vs student {dirs['student']}"

    vt, vs = _real_vocab(t.get_vocab()), _real_vocab(s.get_vocab())
    if vt != vs:
        only_t = sorted(set(vt) - set(vs), key=vt.get)[:5]
        only_s = sorted(set(vs) - set(vt), key=vs.get)[:5]
        moved = sorted((k for k in set(vt) & set(vs) if vt[k] != vs[k]), key=vt.get)[:5]
        detail = [f"sizes {len(vt)} vs {len(vs)}"]
        if only_t:
            detail.append(f"only in teacher: {only_t}")
        if only_s:
            detail.append(f"only in student: {only_s}")
        if moved:
            detail.append("different ids: " + ", ".join(f"{k!r} {vt[k]} vs {vs[k]}" for k in moved))
        raise KdError(f"tokenizers differ ({where}): {'; '.join(detail)}. Distillation needs a teacher and student "
                      f"that share a vocabulary (same model family)")
    if t.eos_token != s.eos_token:
        raise KdError(f"tokenizers differ ({where}): eos token {t.eos_token!r} vs {s.eos_token!r}")
    it, is_ = t(_PROBE).input_ids, s(_PROBE).input_ids
    if it != is_:
        n = next((k for k, (a, b) in enumerate(zip(it, is_)) if a != b), min(len(it), len(is_)))
        raise KdError(f"tokenizers differ ({where}): the same vocabulary but different tokenisation (merges, "
                      f"pre-tokeniser or BOS) from token {n} of a probe text: {it[n:n + 5]} vs {is_[n:n + 5]}")
    kd_width = max(vt.values()) + 1
    for role in ("teacher", "student"):
        if not isinstance(widths[role], int) or widths[role] < kd_width:
            raise KdError(f"{dirs[role]}: the {role}'s logits width (config vocab_size {widths[role]}) does not "
                          f"cover the tokenizer's ids (max id {kd_width - 1})")
    return {"tokenizer_size": len(vt), "kd_width": kd_width, "teacher_logits": widths["teacher"],
            "student_logits": widths["student"], "same_chat_template": t.chat_template == s.chat_template}

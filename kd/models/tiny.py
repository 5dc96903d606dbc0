"""Tiny randomly initialised teacher/student pairs for tests and CI.

A byte-level tokenizer (256 byte symbols + Qwen-style chat specials) shared by both models, and small
Qwen2 models built from a fixed seed: the same files on every machine, no download."""

from __future__ import annotations

from pathlib import Path

import torch

SPECIALS = ["<|endoftext|>", "<|im_start|>", "<|im_end|>"]
CHAT_TEMPLATE = (
    "{% for message in messages %}"
    "{{ '<|im_start|>' + message['role'] + '\n' + message['content'] + '<|im_end|>' + '\n' }}"
    "{% endfor %}"
    "{% if add_generation_prompt %}{{ '<|im_start|>assistant\n' }}{% endif %}"
)

# name -> architecture; the teacher is wider and deeper than the student, as in real KD.
RECIPES = {
    "tiny-teacher": dict(hidden_size=64, intermediate_size=128, num_hidden_layers=3, num_attention_heads=4,
                         num_key_value_heads=2, seed=1234),
    "tiny-student": dict(hidden_size=32, intermediate_size=64, num_hidden_layers=2, num_attention_heads=4,
                         num_key_value_heads=2, seed=5678),
}


def build_tokenizer():
    from tokenizers import Tokenizer, decoders, models, pre_tokenizers
    from tokenizers.pre_tokenizers import ByteLevel
    from transformers import PreTrainedTokenizerFast

    alphabet = sorted(ByteLevel.alphabet())  # the 256 byte symbols, in a fixed order
    vocab = {ch: i for i, ch in enumerate(alphabet)}
    tok = Tokenizer(models.BPE(vocab=vocab, merges=[]))
    tok.pre_tokenizer = pre_tokenizers.ByteLevel(add_prefix_space=False, use_regex=False)
    tok.decoder = decoders.ByteLevel()
    tok.add_special_tokens(SPECIALS)
    fast = PreTrainedTokenizerFast(
        tokenizer_object=tok,
        eos_token="<|im_end|>",
        pad_token="<|endoftext|>",
        additional_special_tokens=SPECIALS[1:],
    )
    fast.chat_template = CHAT_TEMPLATE
    fast.padding_side = "left"
    return fast


def build_model(name: str, vocab_size: int, eos_token_id: int, pad_token_id: int):
    from transformers import GenerationConfig, Qwen2Config, Qwen2ForCausalLM

    recipe = dict(RECIPES[name])
    seed = recipe.pop("seed")
    config = Qwen2Config(
        vocab_size=vocab_size,
        max_position_embeddings=4096,
        tie_word_embeddings=False,
        initializer_range=0.2,  # peaked logits: a random model with opinions makes a better test
        eos_token_id=eos_token_id,
        pad_token_id=pad_token_id,
        bos_token_id=None,
        **recipe,
    )
    gen = torch.Generator().manual_seed(seed)
    torch.manual_seed(seed)
    model = Qwen2ForCausalLM(config)
    with torch.no_grad():  # re-draw every weight from our generator: independent of init-order changes upstream
        for _, p in sorted(model.named_parameters()):
            if p.dim() == 1:
                p.copy_(1.0 + 0.1 * torch.randn(p.shape, generator=gen))
            else:
                p.copy_(config.initializer_range * torch.randn(p.shape, generator=gen))
    model.generation_config = GenerationConfig(eos_token_id=eos_token_id, pad_token_id=pad_token_id,
                                               do_sample=False)
    return model


def save_tiny(name: str, out_dir: str | Path, dtype: torch.dtype = torch.bfloat16) -> None:
    """Write a complete HF folder (safetensors weights, tokenizer, chat template) for recipe `name`."""
    if name not in RECIPES:
        raise KeyError(name)
    tok = build_tokenizer()
    model = build_model(name, len(tok), tok.convert_tokens_to_ids("<|im_end|>"), tok.pad_token_id)
    model.to(dtype).save_pretrained(str(out_dir), safe_serialization=True)
    tok.save_pretrained(str(out_dir))

"""The training examples: the student's own prompt (plain question, chat template, the answer-format instruction)
followed by what it is trained to say: the teacher's response token ids (the KD arms) and the GSM8K gold solution
(`distill.hard_target: gold`, and the fine-tune control). Token ids, not text: the logits stage scored exactly
these ids. Which teacher responses are kept: `distill.response_filter`."""

from __future__ import annotations

import re
from dataclasses import dataclass, field

from kd.config.params import RESPONSE_FILTERS
from kd.core.errors import KdError
from kd.data.prompting import chat_ids, render_question

CALCULATOR = re.compile(r"<<[^>]*>>")


@dataclass
class Example:
    id: int
    input_ids: list[int]          # student prompt + response (truncated to max_length)
    prompt_len: int
    response_len: int            # response tokens trained on (teacher rows [0, response_len))
    gold_ids: list[int] = field(default_factory=list)  # student prompt + GSM8K solution (hard_target: gold)


def gold_text(answer: str) -> str:
    """GSM8K's solution without the <<calculator>> annotations, ending with its '#### N' line."""
    return CALCULATOR.sub("", answer).strip()


def build_examples(responses: list[dict], questions: dict[int, dict], tokenizer, instruction: str,
                   max_length: int, hard_target: str) -> tuple[list[Example], list[int]]:
    """Examples in integer-id order, and the ids skipped because the prompt alone fills max_length."""
    examples, skipped = [], []
    eos = tokenizer.eos_token_id
    for r in sorted(responses, key=lambda r: r["id"]):
        q = questions.get(r["id"])
        if q is None:
            raise KdError(f"teacher response id {r['id']} has no question in data/prepared/transfer.jsonl")
        prompt = chat_ids(tokenizer, render_question(q["question"], instruction))
        room = max_length - len(prompt)
        if room < 1 or not r["response_ids"]:
            skipped.append(r["id"])
            continue
        resp = r["response_ids"][:room]
        gold = []
        if hard_target == "gold":
            gold = (prompt + tokenizer(gold_text(q["answer"]), add_special_tokens=False)["input_ids"] + [eos])
            gold = gold[:max_length]
        examples.append(Example(r["id"], prompt + resp, len(prompt), len(resp), gold))
    return examples, skipped


def select_responses(responses: list[dict], rule: str) -> list[dict]:
    """Which teacher responses to distill on (`distill.response_filter`): `all`; `finished` (the teacher stopped
    by itself, not at teacher.max_new_tokens); `correct` (finished and its `#### N` line equals the gold answer:
    rejection sampling)."""
    if rule == "all":
        return list(responses)
    if rule == "finished":
        return [r for r in responses if r["finished"]]
    if rule == "correct":
        return [r for r in responses if r["finished"] and r["correct_strict"]]
    raise KdError(f"distill.response_filter: unknown rule {rule!r} (allowed: {', '.join(RESPONSE_FILTERS)})")


def build_gold_examples(questions: list[dict], tokenizer, instruction: str,
                        max_length: int) -> tuple[list[Example], list[int]]:
    """Examples of GSM8K's gold solutions alone (no teacher involved): the student's prompt followed by the gold
    solution and eos, for every question, in integer-id order. `gold_ids` holds the same sequence (the CE pass of
    `hard_target: gold` reads it): the fine-tune control trains on these, validation gold NLL scores them."""
    examples, skipped = [], []
    for q in sorted(questions, key=lambda q: q["id"]):
        prompt = chat_ids(tokenizer, render_question(q["question"], instruction))
        target = tokenizer(gold_text(q["answer"]), add_special_tokens=False)["input_ids"] + [tokenizer.eos_token_id]
        room = max_length - len(prompt)
        if room < 1:
            skipped.append(q["id"])
            continue
        target = target[:room]
        examples.append(Example(q["id"], prompt + target, len(prompt), len(target), prompt + target))
    return examples, skipped

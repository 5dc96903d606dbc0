"""GSM8K answer parsing. Mirrors lm-eval's gsm8k filters (strict `#### N`, flexible last number) and its
exact_match normalisation, so the teacher's correctness here means the same as eval accuracy later."""

from __future__ import annotations

import re

STRICT = re.compile(r"#### (\-?[0-9\.\,]+)")
FLEXIBLE = re.compile(r"(-?[$0-9.,]{2,})|(-?[0-9]+)")
GOLD = re.compile(r"####\s*(.+?)\s*$", re.S)
_IGNORE = [re.compile(r","), re.compile(r"\$"), re.compile(r"(?s).*#### "), re.compile(r"\.$")]
_NUMBER = re.compile(r"-?\d+(\.\d+)?")


def normalise(text: str) -> str:
    """lm-eval exact_match normalisation for gsm8k: drop commas, '$', anything up to '#### ', a final '.'."""
    text = text.strip()
    for rx in _IGNORE:
        text = rx.sub("", text)
    return text.strip().lower()


def parse_gold(answer: str) -> str:
    """The gold number from a GSM8K solution ('... #### 1,234'); ValueError if there is none."""
    m = GOLD.search(answer)
    if not m:
        raise ValueError("no '#### <number>' line")
    gold = normalise(m.group(1))
    if not _NUMBER.fullmatch(gold):
        raise ValueError(f"'#### {m.group(1)}' is not a number")
    return gold


def extract_strict(response: str) -> str | None:
    m = STRICT.search(response)
    return m.group(1) if m else None


def extract_flexible(response: str) -> str | None:
    matches = FLEXIBLE.findall(response)
    if not matches:
        return None
    last = matches[-1]  # group_select: -1, as lm-eval
    return last[0] or last[1]


def is_correct(pred: str | None, gold: str) -> bool:
    return pred is not None and normalise(pred) == normalise(gold)


def score(response: str, gold: str) -> dict:
    strict, flexible = extract_strict(response), extract_flexible(response)
    return {
        "pred_strict": strict,
        "pred_flexible": flexible,
        "correct_strict": is_correct(strict, gold),
        "correct_flexible": is_correct(flexible, gold),
    }

"""GSM8K answer parsing with the eval task's own filters (strict `#### N`, flexible last number) and exact_match
normalisation, read from kd/eval/tasks/gsm8k_kd.yaml (their one home), so the teacher's correctness here means the same
as eval accuracy later."""

from __future__ import annotations

import re

import yaml

from kd.core.paths import GSM8K_TASK

TASK_FILE = GSM8K_TASK


def _task_regexes() -> tuple[re.Pattern, re.Pattern, list[re.Pattern]]:
    task = yaml.safe_load(TASK_FILE.read_text(encoding="utf-8"))
    filters = {f["name"]: f["filter"][0]["regex_pattern"] for f in task["filter_list"]}
    metric = next(m for m in task["metric_list"] if m["metric"] == "exact_match")
    return (re.compile(filters["strict-match"]), re.compile(filters["flexible-extract"]),
            [re.compile(r) for r in metric["regexes_to_ignore"]])


STRICT, FLEXIBLE, _IGNORE = _task_regexes()
GOLD = re.compile(r"####\s*(.+?)\s*$", re.S)  # GSM8K's own solutions end with '#### <number>'

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

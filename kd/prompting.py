"""Response-priming strategies (data in strategies.yaml) and the prompts built from them.

The teacher sees `template(question)`; the student and every evaluated model see `question` alone.
Both go through the model's chat template, so token ids are what the model was tuned on."""

from __future__ import annotations

import string
from pathlib import Path

import yaml

from kd.errors import KdError

FIELDS = {"question", "answer", "solution"}


def load_strategies(path: str | Path) -> dict[str, str]:
    """name -> template; every template checked for known fields and a {question}."""
    path = Path(path)
    if not path.exists():
        raise KdError(f"{path}: strategies file missing (params `prompting.file`)")
    try:
        data = yaml.safe_load(path.read_text(encoding="utf-8"))
    except yaml.YAMLError as e:
        mark = getattr(e, "problem_mark", None)  # one line: where, and what (PyYAML's str() spans several)
        where = f"line {mark.line + 1}, column {mark.column + 1}: " if mark else ""
        raise KdError(f"{path}: not valid YAML ({where}{getattr(e, 'problem', None) or e})") from None
    if not isinstance(data, dict) or not data:
        raise KdError(f"{path}: expected a mapping of strategy name -> {{template: ...}}")
    out = {}
    for name, spec in data.items():
        if not isinstance(spec, dict) or not isinstance(spec.get("template"), str):
            raise KdError(f"{path}: strategy `{name}` needs a `template:` string")
        try:
            fields = {f for _, f, _, _ in string.Formatter().parse(spec["template"]) if f is not None}
        except ValueError as e:
            raise KdError(f"{path}: strategy `{name}` template is malformed ({e})") from None
        unknown = fields - FIELDS
        if unknown:
            raise KdError(f"{path}: strategy `{name}` uses unknown field(s) {sorted(unknown)} "
                          f"(allowed: {{question}}, {{answer}}, {{solution}})")
        if "question" not in fields:
            raise KdError(f"{path}: strategy `{name}` template must contain {{question}}")
        out[str(name)] = spec["template"]
    return out


COT_PROMPT = "Let's think step by step."  # Kojima et al. 2022, the stock zero-shot chain-of-thought trigger


def render_question(question: str, instruction: str) -> str:
    """What every model is asked, with no priming: the question, then the answer-format instruction."""
    return f"{question.strip()}\n{instruction}" if instruction else question.strip()


def eval_prompt(question: str, instruction: str, style: str) -> str:
    """The eval prompt of an arm: `task` (question + instruction, what students are trained on) or `cot` (the
    question + the stock zero-shot CoT trigger, no format instruction: a baseline free of our prompt choice)."""
    if style == "cot":
        return f"{question.strip()}\n{COT_PROMPT}"
    return render_question(question, instruction)


def teacher_text(template: str, row: dict, instruction: str) -> str:
    """The priming template around the bare question, then the answer-format instruction last, so a strategy's
    own words (e.g. `confidence`'s closing sentence) sit where the original put them: at the end of the question."""
    primed = template.format(question=row["question"].strip(), answer=row["gold"], solution=row["answer"])
    return f"{primed}\n{instruction}" if instruction else primed


def chat_ids(tokenizer, user_text: str) -> list[int]:
    """Token ids of a one-turn chat ending with the assistant header (generation prompt)."""
    ids = tokenizer.apply_chat_template([{"role": "user", "content": user_text}],
                                        add_generation_prompt=True, tokenize=True)
    if hasattr(ids, "keys"):  # newer transformers return a BatchEncoding
        ids = ids["input_ids"]
    return [int(i) for i in ids]

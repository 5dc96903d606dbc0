"""Response-priming strategies (data in strategies.yaml) and the prompts built from them.

The teacher sees `template(question)`; the student and every evaluated model see `question` alone.
Both go through the model's chat template, so token ids are what the model was tuned on."""

from __future__ import annotations

import re
from pathlib import Path
from typing import TYPE_CHECKING

from kd.core.errors import KdError

if TYPE_CHECKING:
    from kd.config.params import Params

FIELDS = ("question", "answer", "solution")
# Templates are plain placeholder substitution, never str.format: `{question}`, `{answer}`, `{solution}` are
# replaced by their text, `{{` and `}}` stand for literal braces, and anything else in braces (a format spec such as
# `{question:>2000000000}`, a conversion `!r`, attribute or index access, a nested or unknown field) or a lone brace
# is rejected when strategies.yaml is read, so nothing a template says can run code or blow up memory.
_TOKEN = re.compile(r"\{\{|\}\}|\{(" + "|".join(FIELDS) + r")\}|[{}]")
MAX_TEMPLATE_CHARS = 20_000      # a priming prefix is a sentence or a paragraph; this bounds every prompt's growth
MAX_INSTRUCTION_CHARS = 20_000


def template_fields(template: str) -> set[str]:
    """The placeholders of `template`; ValueError saying what is wrong with the first brace that is not one."""
    fields = set()
    for m in _TOKEN.finditer(template):
        if m.group(1):
            fields.add(m.group(1))
        elif m.group(0) in ("{", "}"):
            unknown = re.match(r"\{([A-Za-z_]\w{0,40})\}", template[m.start():])
            if unknown:
                raise ValueError(f"uses unknown field {unknown.group(1)!r} "
                                 "(allowed: {question}, {answer}, {solution})")
            raise ValueError(f"is malformed at character {m.start()} ({template[m.start():m.start() + 24]!r}): "
                             "only the placeholders {question}, {answer}, {solution} may be in braces, with no "
                             "format spec, conversion or index (write {{ and }} for literal braces)")
    return fields


def fill(template: str, values: dict[str, str]) -> str:
    """Substitute the placeholders in one pass (a value containing `{answer}` stays as it is)."""
    def sub(m: re.Match) -> str:
        if m.group(1):
            return values[m.group(1)]
        return {"{{": "{", "}}": "}"}.get(m.group(0), m.group(0))

    return _TOKEN.sub(sub, template)


def check_instruction(instruction: str, key: str = "prompting.instruction") -> str:
    from kd.core.errors import ParamError

    if len(instruction) > MAX_INSTRUCTION_CHARS:
        raise ParamError(key, f"is {len(instruction)} characters long", f"at most {MAX_INSTRUCTION_CHARS}")
    return instruction


def load_strategies(path: str | Path) -> dict[str, str]:
    """name -> template; every template checked for known fields and a {question}."""
    from kd.core.io import read_yaml
    from kd.core.names import STRATEGY_RULE, is_strategy

    path = Path(path)
    data = read_yaml(path, "params `prompting.file`")
    if not isinstance(data, dict) or not data:
        raise KdError(f"{path}: expected a mapping of strategy name -> {{template: ...}}")
    out = {}
    for name, spec in data.items():
        if not is_strategy(name):  # every name here may become a folder name
            raise KdError(f"{path}: strategy name {str(name)[:80]!r} is not {STRATEGY_RULE}")
        if not isinstance(spec, dict) or not isinstance(spec.get("template"), str):
            raise KdError(f"{path}: strategy `{name}` needs a `template:` string")
        template = spec["template"]
        if len(template) > MAX_TEMPLATE_CHARS:
            raise KdError(f"{path}: strategy `{name}` template is {len(template)} characters long "
                          f"(allowed: at most {MAX_TEMPLATE_CHARS})")
        try:
            fields = template_fields(template)
        except ValueError as e:
            raise KdError(f"{path}: strategy `{name}` template {e}") from None
        if "question" not in fields:
            raise KdError(f"{path}: strategy `{name}` template must contain {{question}}")
        out[name] = template
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
    primed = fill(template, {"question": row["question"].strip(), "answer": str(row["gold"]),
                             "solution": str(row["answer"])})
    return f"{primed}\n{instruction}" if instruction else primed


def chat_ids(tokenizer, user_text: str) -> list[int]:
    """Token ids of a one-turn chat ending with the assistant header (generation prompt). The template is checked
    under a time and memory bound before its first render in this process (kd.models.chat_template)."""
    from kd.models.chat_template import check_chat_template

    check_chat_template(tokenizer.chat_template, str(getattr(tokenizer, "name_or_path", "") or "the model"))
    ids = tokenizer.apply_chat_template([{"role": "user", "content": user_text}],
                                        add_generation_prompt=True, tokenize=True)
    if hasattr(ids, "keys"):  # newer transformers return a BatchEncoding
        ids = ids["input_ids"]
    return [int(i) for i in ids]


# ------------------------------------------------------------------------------------------- context sizes


def context_size(model_dir: str | Path) -> int | None:
    """The model's context (config max_position_embeddings), or None when the folder or the key is not there."""
    import json

    try:
        cfg = json.loads((Path(model_dir) / "config.json").read_text(encoding="utf-8"))
    except (OSError, ValueError):
        return None
    if not isinstance(cfg, dict):
        return None
    from kd.models.vocab import config_value

    n = config_value(cfg, "max_position_embeddings")
    return n if isinstance(n, int) and not isinstance(n, bool) and n > 0 else None


def _built_from(folder: Path) -> str | None:
    """The model spec a models/<role> folder was materialised from (its kd_model.json), if it says."""
    import json

    try:
        return json.loads((folder / "kd_model.json").read_text(encoding="utf-8")).get("spec")
    except (OSError, ValueError, AttributeError):
        return None


def check_context(params: Params, root: str | Path = ".", tokenizers: dict | None = None,
                  uses: tuple[str, ...] = ("teacher", "distill", "eval"), eval_models: list[str] | None = None,
                  current_only: bool = False) -> None:
    """Refuse an instruction or template so long that even an empty question's prompt, plus what must be generated
    after it, does not fit the model's context (config max_position_embeddings):
      teacher: each strategy's teacher prompt + teacher.max_new_tokens, in models/teacher;
      distill: the student's prompt + one response token, in models/student;
      eval:    the evaluation prompt + eval.max_new_tokens, in each evaluated model's base (teacher or student).
    Uses the materialised folders' tokenizers (pass loaded ones in `tokenizers`, by role); a folder that does not
    exist yet is skipped (its stage checks it at entry, before loading weights). current_only (for checks before
    `dvc repro`): also skip a folder materialised from another spec than params `<role>.model` (it will be rebuilt)."""
    from kd.core.errors import ParamError

    root = Path(root)
    instruction = params.prompting.instruction
    question = render_question("", instruction)
    checks: list[tuple[str, str, str, str, int]] = []  # role, what, text, key, tokens after the prompt
    if "teacher" in uses:
        templates = load_strategies(root / params.prompting.file)
        empty = {"question": "", "gold": "", "answer": ""}
        checks += [("teacher", f"the teacher prompt of strategy `{s}`", teacher_text(templates[s], empty, instruction),
                    "teacher.max_new_tokens", params.teacher.max_new_tokens)
                   for s in params.prompting.strategies]
    if "distill" in uses:
        checks.append(("student", "the student's prompt", question, "", 1))
    if "eval" in uses:
        # every arm is the teacher or an arm over the student's weights (kd/config/arms.py)
        bases = {"teacher" if m == "teacher" else "student" for m in (eval_models or ["teacher", "student"])}
        checks += [(role, "the evaluation prompt", question, "eval.max_new_tokens", params.eval.max_new_tokens)
                   for role in sorted(bases)]
    toks = dict(tokenizers or {})
    for role, what, text, key, new in checks:
        folder = root / "models" / role
        ctx = context_size(folder)
        if ctx is None or (current_only and _built_from(folder) != getattr(params, role).model):
            continue
        if role not in toks:
            from kd.models.loading import load_tokenizer

            try:
                toks[role] = load_tokenizer(folder, getattr(params, role).trust_remote_code)
            except Exception:  # noqa: BLE001 - a broken folder is for its loader to report
                toks[role] = None
        if toks[role] is None:
            continue
        n = len(chat_ids(toks[role], text))
        if n + new > ctx:
            after = f"with {key}={new}" if key else "with one response token"
            raise ParamError("prompting.instruction", f"is too long: {what} is {n} tokens before any question; "
                             f"{after} that exceeds {folder}'s context of {ctx} tokens (max_position_embeddings)",
                             "a shorter instruction or template" + (f", or a smaller {key}" if key else ""))

"""`kd select`: choose the answer-format instruction and the training targets by measurement on the validation
split, and keep the evidence in selection/<profile>.json (committed), which the report shows next to the choices.

Only data/prepared/validation.jsonl is scored; the eval split is never read. Two measurements:

- `instruction`: the teacher answers the validation questions under each candidate instruction and each strategy
  measured. Rule: the highest mean strict accuracy of the teacher (its responses are the training data); ties go
  to the candidate with more finished answers, then to the earlier one. No candidate asks for short answers (that
  would contradict priming strategies which ask for detail).
- `targets`: for each (distill.hard_target, distill.response_filter) pair, a student is distilled on one strategy's
  transfer responses exactly as distill@<strategy> does, then scored by its mean negative log-likelihood per token of
  the validation questions' gold solutions (cheap, continuous; at this size accuracy differences are not
  detectable). The NLL of gold text favours the gold hard target, so the rule keeps the paper's choice (gold, all)
  unless another pair is better by a margin a paired Wilcoxon test over the questions finds (p < 0.05).
"""

from __future__ import annotations

import tempfile
from pathlib import Path
from typing import TYPE_CHECKING, Callable

from kd.core.errors import KdError
from kd.core.io import read_json, read_jsonl, write_json
from kd.core.paths import SELECTION_DIR

if TYPE_CHECKING:
    from kd.config.params import Params

FORMAT = "Write the final answer on its own line as: #### <number>"
# Candidates. Not among them: the first release's "Solve the problem step by step in a few short sentences, without
# code. ...", which asks for brevity and so contradicts priming strategies that ask for detail. "without code": the
# Qwen2.5-Coder default pair otherwise answers in Python.
INSTRUCTIONS = {
    "steps": f"Solve the problem step by step, without code. {FORMAT}",
    "format": FORMAT,
    # measured: under `steps` the Qwen2.5-Coder teacher ends in LaTeX \boxed{} instead of the #### line
    "plain": "Solve the problem step by step in plain text, without code or LaTeX. End your response with a line "
             "of the form: #### <number>",
}
TARGET_PAIRS = [("gold", "all"), ("teacher", "all"), ("gold", "finished"), ("gold", "correct")]
PAPER_PAIR = ("gold", "all")


def selection_path(root: Path, profile: str | None) -> Path:
    import re

    if not profile or not re.fullmatch(r"[a-z][a-z0-9_]{0,63}", profile):
        raise KdError(f"params `profile` is {profile!r}: `kd select` records its evidence per profile and needs a "
                      "profile name (lowercase letters, digits, _)")
    return root / SELECTION_DIR / f"{profile}.json"


def _update(root: Path, profile: str | None, n: int, key: str, block: dict, decision: str,
            raw: dict | None = None, extra: dict | None = None) -> dict:
    path = selection_path(root, profile)
    sel = read_json(path) if path.exists() else {}
    if sel.get("profile") != profile or sel.get("n") != n:
        sel = {"profile": profile, "n": n, "parts": {}}
    sel["parts"][key] = {"block": block, "decision": decision, "raw": raw or {}, **(extra or {})}
    parts = [sel["parts"][k] for k in ("instruction", "targets", "recipe") if k in sel["parts"]]
    sel["blocks"] = [p["block"] for p in parts]
    sel["decision"] = " ".join(p["decision"] for p in parts)
    sel["command"] = "kd select instruction && kd select targets && kd select recipe"
    write_json(path, sel)
    return sel


def select_instruction(c: Params, root: Path, strategies: list[str] | None = None,
                       candidates: list[str] | None = None, echo: Callable[[str], None] = print) -> dict:
    from kd.core.seeding import seed_everything
    from kd.data.answers import score
    from kd.data.prompting import load_strategies
    from kd.models.loading import load_model, load_tokenizer
    from kd.teacher.responses import Generation, run_generation

    rows = read_jsonl(root / "data/prepared/validation.jsonl")
    if not rows:
        raise KdError("prepare.validation_size is 0: nothing to select on (raise it and `dvc repro prepare`)")
    t = c.teacher
    strategies = list(strategies or c.prompting.strategies)
    templates = load_strategies(root / c.prompting.file)
    # measurements already recorded under the same teacher, budget and templates are kept, not repeated: a candidate
    # or a strategy can be added later
    setup = {"teacher": t.model, "dtype": t.dtype, "max_new_tokens": t.max_new_tokens, "seed": c.seed, "n": len(rows)}
    path = selection_path(root, c.profile)
    old = read_json(path).get("parts", {}).get("instruction", {}) if path.exists() else {}
    results = {}
    if old.get("setup") == setup:
        for k, v in old.get("raw", {}).items():
            name, s = k.split("|")
            if name in INSTRUCTIONS and s in templates and templates[s] == old.get("templates", {}).get(s):
                results[(name, s)] = v
    todo = [(n, s) for n in (candidates or list(INSTRUCTIONS)) for s in strategies if (n, s) not in results]
    model = tok = None
    if todo:
        seed_everything(c.seed)
        tok = load_tokenizer(root / "models/teacher", t.trust_remote_code)
        model = load_model(root / "models/teacher", t.dtype, t.trust_remote_code, quantization=t.quantization)
    for name, s in todo:
        with tempfile.TemporaryDirectory(prefix="kd-select-") as work:
            out = run_generation(model, tok, rows, Generation(
                templates[s], INSTRUCTIONS[name], t.max_new_tokens, t.batch_size, Path(work),
                fingerprint=f"select:{name}:{s}", invariant=c.compute.decode == "invariant"))
        n = len(out)
        results[(name, s)] = {"strict": sum(r["correct_strict"] for r in out) / n,
                              "flexible": sum(score(r["response"], r["gold"])["correct_flexible"] for r in out) / n,
                              "finished": sum(r["finished"] for r in out) / n,
                              "tokens": sum(len(r["response_ids"]) for r in out) / n}
        echo(f"select instruction {name} / {s}: {results[(name, s)]}")
    done = [n for n in INSTRUCTIONS if all((n, s) in results for s in strategies)]
    mean = {name: {k: sum(results[(name, s)][k] for s in strategies) / len(strategies)
                   for k in ("strict", "flexible", "finished", "tokens")} for name in done}
    allowed = done
    best = max(allowed, key=lambda n: (mean[n]["strict"], mean[n]["finished"], -allowed.index(n)))
    block = {"title": f"Answer-format instruction: the teacher on the validation questions (strategies "
                      f"{', '.join(strategies)}; ≤ {t.max_new_tokens} new tokens)",
             "headers": ["candidate", "instruction", "strict", "flexible", "finished", "mean tokens"],
             "rows": [[n, f'"{INSTRUCTIONS[n]}"', f"{100 * mean[n]['strict']:.1f} %",
                       f"{100 * mean[n]['flexible']:.1f} %", f"{100 * mean[n]['finished']:.0f} %",
                       f"{mean[n]['tokens']:.0f}"] for n in done]}
    decision = (f"Instruction: `{best}` (highest teacher strict accuracy; ties: more finished answers. The first "
                "release's instruction asked for \"a few short sentences\", contradicting the priming strategies, "
                "and is not a candidate).")
    sel = _update(root, c.profile, len(rows), "instruction", block, decision,
                  raw={"|".join(k): v for k, v in sorted(results.items())},
                  extra={"setup": setup, "templates": {s: templates[s] for s in strategies}})
    return sel | {"best": INSTRUCTIONS[best]}


def select_targets(c: Params, root: Path, strategy: str, echo: Callable[[str], None] = print) -> dict:
    from scipy.stats import wilcoxon

    from kd.train.checkpoint import Checkpoint
    from kd.train.distill import gold_nll
    from kd.train.inputs import load_kd_inputs
    from kd.train.run import StudentRun

    rows = read_jsonl(root / "data/prepared/validation.jsonl")
    if not rows:
        raise KdError("prepare.validation_size is 0: nothing to select on (raise it and `dvc repro prepare`)")
    s, cfg = c.student, c.distill
    inputs = load_kd_inputs(root, strategy, s.trust_remote_code)
    tok = inputs.tokenizer
    instruction = c.prompting.instruction
    nll: dict[tuple[str, str], list[float]] = {}
    kept_n = {}
    for hard, filt in TARGET_PAIRS:
        kept, examples, _ = inputs.examples(filt, instruction, cfg.max_length, hard)
        kept_n[(hard, filt)] = len(kept)
        candidate = StudentRun.of(c, root).varied(hard_target=hard)
        model = candidate.model()
        if examples:
            with tempfile.TemporaryDirectory(prefix="kd-select-") as work:
                candidate.train(model, examples, inputs.teacher_for, Checkpoint(Path(work) / "ckpt.safetensors",
                                "select"), width=inputs.vocab["kd_width"])
        nll[(hard, filt)] = gold_nll(model, tok, rows, instruction, cfg.max_length)
        echo(f"select targets {hard}/{filt}: {len(examples)} examples, validation gold NLL "
             f"{sum(nll[(hard, filt)]) / len(nll[(hard, filt)]):.4f}")
        del model
    ref = nll[PAPER_PAIR]
    table, best, best_gain = [], PAPER_PAIR, 0.0
    for pair in TARGET_PAIRS:
        mean = sum(nll[pair]) / len(nll[pair])
        if pair == PAPER_PAIR:
            pv = "—"
        else:
            diffs = [a - b for a, b in zip(nll[pair], ref)]
            pvalue = 1.0 if all(d == 0 for d in diffs) else float(wilcoxon(diffs).pvalue)
            pv = f"{pvalue:.3g}"
            gain = -sum(diffs) / len(diffs)
            if pvalue < 0.05 and gain > best_gain:
                best, best_gain = pair, gain
        table.append([pair[0], pair[1], str(kept_n[pair]), f"{mean:.4f}", pv])
    which = next((k for k, v in INSTRUCTIONS.items() if v == instruction), None)
    block = {"title": f"Training targets: students distilled on teacher@{strategy}'s responses (instruction "
                      f"{'`' + which + '`' if which else repr(instruction)}), validation gold NLL per token (lower is "
                      "better; Wilcoxon signed-rank vs gold/all over the questions)",
             "headers": ["hard target", "response filter", "responses kept", "gold NLL / token", "p vs gold/all"],
             "rows": table}
    decision = (f"Targets: hard target `{best[0]}`, response filter `{best[1]}` "
                + ("(the paper's choice; no other pair was detectably better on validation)." if best == PAPER_PAIR
                   else "(detectably better than the paper's gold/all on validation)."))
    return _update(root, c.profile, len(rows), "targets", block, decision) | {"best": best}

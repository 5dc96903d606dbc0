"""`kd select recipe <strategy>`: choose the training recipe (optimiser, learning rate, epochs) on the validation
split, so training trains. A recipe copied from a paper at another scale can be a no-op: the paper's SGD at lr 5e-6
made sense over 2 x 2,638 steps on an 8B student; the cpu profile's SGD at 1e-3 for 24 steps moved the LoRA weights
by ||dW||/||W|| ~ 2e-4 and every trained arm stayed within a question of the base student.

Each candidate distils a student on STRATEGY's transfer responses exactly as distill@<strategy> does (same examples,
teacher signal, seed, per-pass dropout), then measures the validation gold NLL per token (the eval split is never
read) and how far the adapter moved (||dW||/||W||). Rule: among one-epoch candidates the lowest mean validation NLL;
more epochs (twice the training time) only when they beat it by a paired Wilcoxon test over the validation questions
(p < 0.05). The evidence goes to selection/<profile>.json (part `recipe`), which the report shows."""

from __future__ import annotations

import tempfile
import time
from pathlib import Path
from typing import TYPE_CHECKING, Callable

from kd.core.errors import KdError
from kd.core.io import read_jsonl

if TYPE_CHECKING:
    from kd.config.params import Params

# (optimizer, lr) candidates, one epoch each; the best is then tried with EPOCHS_MORE epochs
CANDIDATES = [("sgd", 1e-3), ("sgd", 3e-2), ("adamw", 1e-4), ("adamw", 3e-4), ("adamw", 1e-3)]
EPOCHS_MORE = 2


def _fmt_lr(lr: float) -> str:
    return f"{lr:.0e}".replace("e-0", "e-")


def select_recipe(c: Params, root: Path, strategy: str, echo: Callable[[str], None] = print,
                  candidates: list[tuple[str, float]] | None = None) -> dict:
    from scipy.stats import wilcoxon

    from kd.tools.select.instruction_targets import _update
    from kd.train.checkpoint import Checkpoint
    from kd.train.distill import gold_nll
    from kd.train.inputs import load_kd_inputs
    from kd.train.run import StudentRun, update_norm_ratio

    rows = read_jsonl(root / "data/prepared/validation.jsonl")
    if not rows:
        raise KdError("prepare.validation_size is 0: nothing to select on (raise it and `dvc repro prepare`)")
    student_run = StudentRun.of(c, root)
    s, base = c.student, c.distill
    inputs = load_kd_inputs(root, strategy, s.trust_remote_code)
    instruction = c.prompting.instruction
    _, examples, _ = inputs.examples(base.response_filter, instruction, base.max_length, base.hard_target)
    if not examples:
        raise KdError("kd select recipe: no training examples (see distill.max_length and distill.response_filter)")

    def run(optimizer: str, lr: float, epochs: int) -> dict:
        candidate = student_run.varied(optimizer=optimizer, lr=lr, epochs=epochs)
        model = candidate.model()
        t0 = time.perf_counter()
        with tempfile.TemporaryDirectory(prefix="kd-select-") as work:
            candidate.train(model, examples, inputs.teacher_for, Checkpoint(Path(work) / "ckpt.safetensors", "select"),
                            width=inputs.vocab["kd_width"])
        seconds = time.perf_counter() - t0
        nll = gold_nll(model, inputs.tokenizer, rows, instruction, base.max_length)
        out = {"optimizer": optimizer, "lr": lr, "epochs": epochs, "nll": nll, "mean_nll": sum(nll) / len(nll),
               "update_norm_ratio": update_norm_ratio(model), "train_seconds": round(seconds, 1)}
        echo(f"select recipe {optimizer} lr {_fmt_lr(lr)} x{epochs}: validation gold NLL {out['mean_nll']:.4f}, "
             f"||dW||/||W|| {out['update_norm_ratio']:.2e}, {seconds:.0f} s")
        del model
        return out

    untrained = student_run.model()
    before = gold_nll(untrained, inputs.tokenizer, rows, instruction, base.max_length)
    del untrained
    mean_before = sum(before) / len(before)
    echo(f"select recipe: base student, validation gold NLL {mean_before:.4f}")
    results = [run(opt, lr, 1) for opt, lr in (candidates or CANDIDATES)]
    best = min(results, key=lambda r: (r["mean_nll"], r["epochs"]))
    more = run(best["optimizer"], best["lr"], EPOCHS_MORE)
    results.append(more)
    diffs = [a - b for a, b in zip(more["nll"], best["nll"])]
    p_more = 1.0 if all(d == 0 for d in diffs) else float(wilcoxon(diffs).pvalue)
    if more["mean_nll"] < best["mean_nll"] and p_more < 0.05:
        chosen, why = more, f"{EPOCHS_MORE} epochs beat one by a Wilcoxon test (p = {p_more:.3g})"
    else:
        chosen, why = best, f"{EPOCHS_MORE} epochs did not beat one detectably (Wilcoxon p = {p_more:.3g})"
    table = [[r["optimizer"], _fmt_lr(r["lr"]), str(r["epochs"]), f"{r['update_norm_ratio']:.2e}",
              f"{mean_before:.4f}", f"{r['mean_nll']:.4f}", f"{r['mean_nll'] - mean_before:+.4f}",
              f"{r['train_seconds']:.0f}"] for r in results]
    block = {"title": f"Training recipe: students distilled on teacher@{strategy}'s responses ({len(examples)} "
                      f"examples), validation gold NLL per token before and after (lower is better)",
             "headers": ["optimizer", "lr", "epochs", "||dW||/||W||", "NLL before", "NLL after", "change",
                         "train s"],
             "rows": table}
    decision = (f"Recipe: `{chosen['optimizer']}`, lr {_fmt_lr(chosen['lr'])}, {chosen['epochs']} epoch(s): the lowest "
                f"validation gold NLL among the one-epoch candidates; {why}.")
    raw = {f"{r['optimizer']}|{r['lr']}|{r['epochs']}": r["nll"] for r in results}
    sel = _update(root, c.profile, len(rows), "recipe", block, decision, raw={**raw, "before": before})
    return sel | {"best": {"optimizer": chosen["optimizer"], "lr": chosen["lr"], "epochs": chosen["epochs"]}}

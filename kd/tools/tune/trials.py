"""One `kd tune` trial: sample the values (a per-trial seeded TPE), train the student exactly as
distill@<strategy> does (same examples, teacher signal, seed, schedule; only the searched values differ), report the
validation gold NLL to the pruner, and score the objective on the validation split."""

from __future__ import annotations

import os
import socket
import tempfile
import time
import warnings
from pathlib import Path
from typing import Callable

from kd.config.params import Params
from kd.core.errors import KdError
from kd.core.io import read_jsonl
from kd.tools.tune.results import objective_label
from kd.tools.tune.storage import finished


def seed_sampler(trial, seed: int) -> None:
    """A TPE sampler seeded with `seed` + the trial's number, before the trial samples anything: a trial's values
    depend only on the study's history and its number (a resumed or shared study is as reproducible as a fresh
    one), and no two trials, in any process, share a seed (two workers started together would otherwise propose
    the same points)."""
    import optuna

    trial.study.sampler = optuna.samplers.TPESampler(seed=(seed + trial.number) % 2**32)  # numpy's range


def suggest(trial, c: Params) -> dict:
    seed_sampler(trial, c.seed)
    space = c.tune.space
    values = {"alpha": trial.suggest_float("alpha", *space.alpha),
              "temperature": trial.suggest_float("temperature", *space.temperature, log=True)}
    if space.lr is not None:
        values["lr"] = trial.suggest_float("lr", *space.lr, log=True)
    if space.lora_r is not None:
        values["lora_r"] = trial.suggest_categorical("lora_r", space.lora_r)
    return values


class Trials:
    """What every trial shares, loaded once per process: tokenizer, teacher signal, training examples, validation
    rows (kd.train.inputs, as distill@<strategy> reads them)."""

    def __init__(self, c: Params, root: Path = Path(".")):
        from kd.data.prompting import check_context
        from kd.train.inputs import load_kd_inputs

        self.c, self.root = c, Path(root)
        t, s, d = c.tune, c.student, c.distill
        self.val_rows = read_jsonl(self.root / "data/prepared/validation.jsonl")
        if not self.val_rows:
            raise KdError("prepare.validation_size is 0: nothing to tune on (raise it and `dvc repro prepare`)")
        self.inputs = load_kd_inputs(self.root, t.strategy, s.trust_remote_code)
        self.vocab, self.tok = self.inputs.vocab, self.inputs.tokenizer
        check_context(c, self.root, {"student": self.tok}, uses=("distill",))  # as distill@*: before any weights
        _, self.examples, _ = self.inputs.examples(d.response_filter, c.prompting.instruction,
                                                   d.max_length, d.hard_target)
        if not self.examples:
            raise KdError("kd tune: no training examples (see distill.max_length and distill.response_filter)")
        self.steps = c.distill.epochs * len(self.examples)

    def run(self, values: dict):
        """distill@<tune.strategy>'s student run with the trial's values (alpha, temperature, lr, lora_r)."""
        from dataclasses import replace

        from kd.train.run import StudentRun

        # lr and lora_r only when searched (tune.space.lr / lora_r not null); otherwise as params hold them
        searched = {k: values[k] for k in ("lr", "lora_r") if k in values}
        run = StudentRun.of(self.c, self.root).varied(**searched)
        return replace(run, alpha=values["alpha"], temperature=values["temperature"])

    def nll(self, model) -> float:
        from kd.train.distill import gold_nll

        per_q = gold_nll(model, self.tok, self.val_rows, self.c.prompting.instruction,
                         self.c.distill.max_length)
        return sum(per_q) / len(per_q)

    def student(self, values: dict):
        return self.run(values).model()

    def accuracy(self, model, work: Path) -> dict:
        """Validation strict/flexible accuracy through lm-eval, exactly as eval@kd-<strategy> scores eval."""
        from kd.eval.evaluate import ModelSpec, evaluate_docs
        from kd.train.run import save_adapter

        s = self.c.student
        save_adapter(model, work / "adapter")
        spec = ModelSpec("kd-tune", self.root / "models/student", work / "adapter", s.dtype,
                         s.trust_remote_code, "task", s.quantization)
        every_question = self.c.model_copy(update={"eval": self.c.eval.model_copy(update={"limit": None})})
        _, m = evaluate_docs(spec, self.val_rows, every_question)
        return m

    def train(self, model, values: dict, on_step: Callable[[int, dict], None], work: Path) -> None:
        from kd.train.checkpoint import Checkpoint

        checkpoint = Checkpoint(work / "ckpt.safetensors", "tune")  # never written: a trial is not resumed
        self.run(values).train(model, self.examples, self.inputs.teacher_for, checkpoint, on_step,
                               width=self.vocab["kd_width"])

    def calibrate(self) -> dict:
        """Seconds for one training step and one validation NLL pass (for the expected wall time)."""
        values = {"alpha": 0.5, "temperature": 2.0}
        model = self.student(values)
        from kd.train.distill import example_loss

        d = self.c.distill
        t_step, t_nll = [], []
        for ex in self.examples[:2]:  # the first call of each pays one-off costs: keep the faster
            t0 = time.perf_counter()
            losses = example_loss(model, ex, self.inputs.teacher_for(ex.id), 0.5, 2.0, d.loss,
                                  d.hard_target, d.kd_chunk, self.vocab["kd_width"])
            losses["loss"].backward()
            t_step.append(time.perf_counter() - t0)
            t0 = time.perf_counter()
            self.nll(model)
            t_nll.append(time.perf_counter() - t0)
        return {"step_s": min(t_step), "nll_s": min(t_nll)}

    def objective(self, echo: Callable[[str], None], n_total: int) -> Callable:
        import optuna

        every, objective = self.c.tune.report_every, self.c.tune.objective

        def run(trial: optuna.Trial) -> float:
            t0 = time.perf_counter()
            values = suggest(trial, self.c)
            trial.set_user_attr("worker", f"{socket.gethostname()}:{os.getpid()}")
            with warnings.catch_warnings():
                warnings.simplefilter("ignore", optuna.exceptions.ExperimentalWarning)
                retry = optuna.storages.RetryHeartbeatStaleTrialCallback.retried_trial_number(
                    trial.storage.get_trial(trial._trial_id))  # set when this trial re-runs a killed one
            shown = ", ".join(f"{k}={v:.4g}" for k, v in values.items())
            echo(f"trial {trial.number}{f' (retry of {retry})' if retry is not None else ''}: {shown}")
            model = self.student(values)
            last = {}

            def on_step(step, rec):
                if step % every and step != self.steps:
                    return
                last["nll"] = self.nll(model)
                model.train()  # gold_nll leaves eval mode; LoRA dropout must stay on while training
                trial.report(last["nll"], step)
                if trial.should_prune():
                    echo(f"trial {trial.number}: pruned at step {step}/{self.steps} (validation gold NLL "
                         f"{last['nll']:.4f}), {time.perf_counter() - t0:.1f} s")
                    raise optuna.TrialPruned()

            with tempfile.TemporaryDirectory(prefix="kd-tune-") as work:
                try:
                    self.train(model, values, on_step, Path(work))
                except KdError as e:
                    if "non-finite loss" not in str(e):
                        raise
                    # a diverged run (lr too high) is a bad point, not a broken harness: count it, do not retry
                    echo(f"trial {trial.number}: diverged ({e}); pruned")
                    raise optuna.TrialPruned() from None
                trial.set_user_attr("gold_nll", last["nll"])
                if objective == "nll":
                    value = last["nll"]
                else:
                    m = self.accuracy(model, Path(work))
                    trial.set_user_attr("accuracy_strict", m["accuracy_strict"])
                    trial.set_user_attr("accuracy_flexible", m["accuracy_flexible"])
                    value = 1.0 - m["accuracy_strict"]
            seconds = time.perf_counter() - t0
            trial.set_user_attr("seconds", seconds)
            done = len(finished(trial.study)) + 1
            nll = f" (gold NLL {last['nll']:.4f})" if objective != "nll" else ""
            echo(f"trial {trial.number}: {objective_label(objective)} {value:.4f}{nll}, {seconds:.1f} s "
                 f"[{done}/{n_total} finished]")
            return value

        return run

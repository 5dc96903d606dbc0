"""`kd tune`: an Optuna study of alpha and temperature (optionally distill.lr and distill.lora.r) on the validation
split, in a real database, resumable, and applied through DVC.

Honesty rules:
- the objective is measured on data/prepared/validation.jsonl only; the eval split is never opened;
- the objective never depends on the searched values' own definitions (the total loss changes meaning with alpha and
  T): it is either the validation error rate (1 - strict accuracy, scored by lm-eval as eval@* does) or the student's
  validation negative log-likelihood per token of the gold solutions (kd.train.distill.gold_nll: cheap). The study always
  minimises, so the intermediate values (gold NLL every `tune.report_every` training steps, what the median pruner
  compares) point the same way as the objective;
- every trial trains exactly as distill@<strategy> does (same examples, teacher signal, seed, schedule): only the
  searched values differ.

Storage is Optuna's RDB storage (any SQLAlchemy URL; SQLite under the project by default). Trials send heartbeats:
a trial whose process died (SIGKILL, power loss) is marked FAIL by the next `kd tune` on the study once it has been
silent for 2 x `tune.heartbeat` s, and re-queued with the same parameters (RetryHeartbeatStaleTrialCallback), so no
trial is lost; the study counts only COMPLETE and PRUNED trials toward `tune.n_trials`, so none is counted twice.
Several `kd tune` processes on one storage share the study (each trial is claimed in a database transaction).

The parts: kd.tools.tune.storage (study, database), kd.tools.tune.trials (one trial: train, prune, score), kd.tools.tune.results
(metrics/tune.json, report, plots), kd.tools.tune.apply (`kd tune --apply`). This module runs the study.
"""

from __future__ import annotations

import warnings
from pathlib import Path
from typing import TYPE_CHECKING, Callable

from kd.tools.tune.results import objective_label, write_results
from kd.tools.tune.storage import finished, load_study, redact
from kd.tools.tune.trials import Trials

if TYPE_CHECKING:
    from kd.config.params import Params


def run_study(c: Params, root: Path = Path("."), *, n_trials: int | None = None, timeout: int | None = None,
              echo: Callable[[str], None] = print) -> dict:
    """Run (or resume, or join) the study until it holds `n_trials` finished trials; then write the results."""
    import optuna

    optuna.logging.set_verbosity(optuna.logging.WARNING)  # our own progress line per trial instead
    warnings.filterwarnings("ignore", category=FutureWarning, module="transformers")
    t = c.tune
    n_total = n_trials or t.n_trials
    timeout = timeout if timeout is not None else t.timeout
    trials = Trials(c, root)  # every artefact check before the database is touched
    study = load_study(c, root)
    with warnings.catch_warnings():
        warnings.simplefilter("ignore", optuna.exceptions.ExperimentalWarning)
        optuna.storages.fail_stale_trials(study)  # a killed trial is failed and re-queued before counting
    done = len(finished(study))
    left = max(n_total - done, 0)
    echo(f"study {study.study_name} in {redact(t.storage)}: {done} finished trial(s), {left} to run to "
         f"{n_total}; objective: {objective_label(t.objective)}; strategy {t.strategy}; "
         f"{len(trials.examples)} training examples x {c.distill.epochs} epoch(s), "
         f"{len(trials.val_rows)} validation questions")
    if left:
        per_trial, how = expected_trial_seconds(study, trials, t.objective)
        echo(f"expected wall time: {left} trial(s) x {per_trial:.0f} s = {fmt_seconds(left * per_trial)} ({how}; "
             f"pruned trials are cheaper; {'timeout ' + str(timeout) + ' s' if timeout else 'no timeout'})")
        from optuna.study import MaxTrialsCallback
        from optuna.trial import TrialState

        # n_trials bounds this process; MaxTrialsCallback stops it when other processes finished the rest
        study.optimize(trials.objective(echo, n_total), n_trials=left, timeout=timeout, gc_after_trial=True,
                       callbacks=[MaxTrialsCallback(n_total, states=(TrialState.COMPLETE, TrialState.PRUNED))])
    return write_results(study, c, root, echo)


def expected_trial_seconds(study, trials: Trials, objective: str) -> tuple[float, str]:
    from optuna.trial import TrialState

    past = [tr.user_attrs["seconds"] for tr in study.get_trials(deepcopy=False, states=(TrialState.COMPLETE,))
            if "seconds" in tr.user_attrs]
    if past:
        return sum(past) / len(past), f"mean of {len(past)} finished trial(s)"
    c = trials.calibrate()
    n_reports = trials.steps // trials.c.tune.report_every + (trials.steps % trials.c.tune.report_every > 0)
    est = trials.steps * c["step_s"] + n_reports * c["nll_s"]
    how = (f"calibrated: {trials.steps} steps x {c['step_s']:.2f} s + {n_reports} validation NLL passes x "
           f"{c['nll_s']:.2f} s")
    if objective == "accuracy":
        how += "; excludes the lm-eval scoring of each trial, measured from the first trial on"
    return est, how


def fmt_seconds(s: float) -> str:
    return f"{s:.0f} s" if s < 120 else f"{s / 60:.1f} min" if s < 7200 else f"{s / 3600:.1f} h"

"""`kd tune`: an Optuna study of alpha and temperature (optionally distill.lr and distill.lora.r) on the validation
split, in a real database, resumable, and applied through DVC.

Honesty rules:
- the objective is measured on data/prepared/validation.jsonl only; the eval split is never opened;
- the objective never depends on the searched values' own definitions (the total loss changes meaning with alpha and
  T): it is either the validation error rate (1 - strict accuracy, scored by lm-eval as eval@* does) or the student's
  validation negative log-likelihood per token of the gold solutions (kd.select.gold_nll: cheap). The study always
  minimises, so the intermediate values (gold NLL every `tune.report_every` training steps, what the median pruner
  compares) point the same way as the objective;
- every trial trains exactly as distill@<strategy> does (same examples, teacher signal, seed, schedule): only the
  searched values differ.

Storage is Optuna's RDB storage (any SQLAlchemy URL; SQLite under the project by default). Trials send heartbeats:
a trial whose process died (SIGKILL, power loss) is marked FAIL by the next `kd tune` on the study once it has been
silent for 2 x `tune.heartbeat` s, and re-queued with the same parameters (RetryHeartbeatStaleTrialCallback), so no
trial is lost; the study counts only COMPLETE and PRUNED trials toward `tune.n_trials`, so none is counted twice.
Several `kd tune` processes on one storage share the study (each trial is claimed in a database transaction).
"""

from __future__ import annotations

import math
import os
import socket
import tempfile
import time
import warnings
from pathlib import Path
from typing import Callable

from kd.errors import KdError
from kd.io import read_json, read_jsonl, write_json, write_text

PAPER = {"alpha": 0.6093348343631224, "temperature": 5.942267335064758, "trials": 35,
         "note": "Optuna TPE, 35 trials, on the GSM8K test split, another model pair"}
METRICS = Path("metrics/tune.json")
REPORT_DIR = Path("reports/tune")
# where a best value goes in params.yaml
PARAM_KEYS = {"alpha": ("alpha",), "temperature": ("temperature",), "lr": ("distill", "lr"),
              "lora_r": ("distill", "lora", "r")}


def study_name(p: dict) -> str:
    t = p["tune"]
    return t["study"] or f"{p['profile'] or 'custom'}-{t['strategy']}-{t['objective']}"


def open_storage(url: str, heartbeat: int, root: Path = Path(".")):
    """Optuna's RDB storage with heartbeats and retry of stale (killed) trials. A relative SQLite path is relative
    to the project root; its folder is created."""
    import optuna
    from sqlalchemy.engine import make_url
    from sqlalchemy.exc import ArgumentError

    try:
        parsed = make_url(url)
    except ArgumentError as e:
        raise KdError(f"tune.storage: {url!r} is not an SQLAlchemy URL ({e}); e.g. sqlite:///tune/optuna.db or "
                      "postgresql+psycopg2://user@host/db") from None
    engine_kwargs = {}
    if parsed.get_backend_name() == "sqlite":
        if parsed.database and parsed.database != ":memory:":
            db = Path(parsed.database)
            db = db if db.is_absolute() else Path(root) / db
            db.parent.mkdir(parents=True, exist_ok=True)
            url = parsed.set(database=str(db)).render_as_string(hide_password=False)
        # several processes write one file: wait for the lock instead of failing after SQLite's default 5 s
        engine_kwargs = {"connect_args": {"timeout": 300}}
    with warnings.catch_warnings():
        warnings.simplefilter("ignore", optuna.exceptions.ExperimentalWarning)
        from sqlalchemy.exc import IntegrityError, OperationalError

        for attempt in range(5):
            try:
                return optuna.storages.RDBStorage(
                    url, engine_kwargs=engine_kwargs, heartbeat_interval=heartbeat, grace_period=2 * heartbeat,
                    heartbeat_stale_trial_callback=optuna.storages.RetryHeartbeatStaleTrialCallback(max_retry=3))
            except ImportError as e:
                raise KdError(f"tune.storage: the database driver for {parsed.drivername!r} is not installed "
                              f"({e})") from None
            except (IntegrityError, OperationalError):
                # two processes creating a new database's schema at once: the loser finds it made next time
                if attempt == 4:
                    raise
                time.sleep(1 + attempt)


def redact(url: str) -> str:
    from sqlalchemy.engine import make_url

    return make_url(url).render_as_string(hide_password=True)


def load_study(p: dict, root: Path = Path(".")):
    """Create or join the study (the TPE sampler is seeded per trial: see `seed_sampler`)."""
    import optuna

    t = p["tune"]
    storage = open_storage(t["storage"], t["heartbeat"], root)
    pruner = optuna.pruners.MedianPruner(n_startup_trials=t["pruner"]["startup_trials"],
                                         n_warmup_steps=t["pruner"]["warmup_steps"])
    name = study_name(p)
    study = optuna.create_study(storage=storage, study_name=name, direction="minimize", load_if_exists=True,
                                pruner=pruner)
    study.sampler = optuna.samplers.TPESampler(seed=p["seed"])
    study.set_user_attr("objective", t["objective"])
    return study


def seed_sampler(trial, seed: int) -> None:
    """A TPE sampler seeded with `seed` + the trial's number, before the trial samples anything: a trial's values
    depend only on the study's history and its number (a resumed or shared study is as reproducible as a fresh
    one), and no two trials, in any process, share a seed (two workers started together would otherwise propose
    the same points)."""
    import optuna

    trial.study.sampler = optuna.samplers.TPESampler(seed=seed + trial.number)


def suggest(trial, p: dict) -> dict:
    seed_sampler(trial, p["seed"])
    space = p["tune"]["space"]
    values = {"alpha": trial.suggest_float("alpha", *space["alpha"]),
              "temperature": trial.suggest_float("temperature", *space["temperature"], log=True)}
    if space["lr"] is not None:
        values["lr"] = trial.suggest_float("lr", *space["lr"], log=True)
    if space["lora_r"] is not None:
        values["lora_r"] = trial.suggest_categorical("lora_r", space["lora_r"])
    return values


def finished(study) -> list:
    from optuna.trial import TrialState

    return study.get_trials(deepcopy=False, states=(TrialState.COMPLETE, TrialState.PRUNED))


class Trials:
    """What every trial shares, loaded once per process: tokenizer, teacher signal, training examples, validation
    rows. Mirrors stages/distill.py."""

    def __init__(self, p: dict, root: Path = Path(".")):
        from kd.distill import build_examples, select_responses
        from kd.loading import load_tokenizer
        from kd.prompting import check_context
        from kd.teacher_signal import TeacherSignal
        from kd.vocab import check_same_vocab

        self.p, self.root = p, Path(root)
        t, s = p["tune"], p["student"]
        strategy = t["strategy"]
        self.val_rows = read_jsonl(self.root / "data/prepared/validation.jsonl")
        if not self.val_rows:
            raise KdError("prepare.validation_size is 0: nothing to tune on (raise it and `dvc repro prepare`)")
        responses = read_jsonl(self.root / f"data/teacher/{strategy}/responses.jsonl")
        questions = {r["id"]: r for r in read_jsonl(self.root / "data/prepared/transfer.jsonl")}
        self.signal = TeacherSignal(self.root / f"data/logits/{strategy}", responses, self.root / "models/teacher",
                                    transfer_ids=list(questions))
        self.vocab = check_same_vocab(self.root / "models/teacher", self.root / "models/student",
                                      s["trust_remote_code"])
        self.tok = load_tokenizer(self.root / "models/student", s["trust_remote_code"])
        check_context(p, self.root, {"student": self.tok}, uses=("distill",))  # as distill@*: before any weights
        kept = select_responses(responses, p["distill"]["response_filter"])
        self.examples, _ = build_examples(kept, questions, self.tok, p["prompting"]["instruction"],
                                          p["distill"]["max_length"], p["distill"]["hard_target"])
        if not self.examples:
            raise KdError("kd tune: no training examples (see distill.max_length and distill.response_filter)")
        self.steps = p["distill"]["epochs"] * len(self.examples)

    def cfg(self, values: dict) -> dict:
        d = self.p["distill"]
        return {**d, "lr": values.get("lr", d["lr"]), "lora": {**d["lora"], "r": values.get("lora_r", d["lora"]["r"])}}

    def nll(self, model) -> float:
        from kd.select import gold_nll

        per_q = gold_nll(model, self.tok, self.val_rows, self.p["prompting"]["instruction"],
                         self.p["distill"]["max_length"])
        return sum(per_q) / len(per_q)

    def student(self, values: dict):
        from kd.seeding import seed_everything
        from kd.trainer import lora_student

        s = self.p["student"]
        seed_everything(self.p["seed"])
        return lora_student(self.root / "models/student", s["dtype"], s["trust_remote_code"],
                            self.cfg(values)["lora"], self.p["seed"], quantization=s["quantization"])

    def accuracy(self, model, work: Path) -> dict:
        """Validation strict/flexible accuracy through lm-eval, exactly as eval@kd-<strategy> scores eval."""
        from kd.evaluate import ModelSpec, evaluate_docs
        from kd.trainer import save_adapter

        s = self.p["student"]
        save_adapter(model, work / "adapter")
        spec = ModelSpec("kd-tune", self.root / "models/student", work / "adapter", s["dtype"],
                         s["trust_remote_code"], "task", s["quantization"])
        _, m = evaluate_docs(spec, self.val_rows, {**self.p, "eval": {**self.p["eval"], "limit": None}})
        return m

    def train(self, model, values: dict, on_step: Callable[[int, dict], None], work: Path) -> None:
        from kd.distill import Checkpoint, train

        signal = self.signal
        train(model, self.examples, lambda i: (lambda a, b: signal.logits(i, a, b)), self.cfg(values),
              values["alpha"], values["temperature"], self.p["seed"], Checkpoint(work / "ckpt.safetensors", "tune"),
              10**9, on_step, width=self.vocab["kd_width"])

    def calibrate(self) -> dict:
        """Seconds for one training step and one validation NLL pass (for the expected wall time)."""
        values = {"alpha": 0.5, "temperature": 2.0}
        model = self.student(values)
        from kd.distill import example_loss

        signal, d = self.signal, self.p["distill"]
        t_step, t_nll = [], []
        for ex in self.examples[:2]:  # the first call of each pays one-off costs: keep the faster
            t0 = time.perf_counter()
            losses = example_loss(model, ex, lambda a, b, i=ex.id: signal.logits(i, a, b), 0.5, 2.0, d["loss"],
                                  d["hard_target"], d["kd_chunk"], self.vocab["kd_width"])
            losses["loss"].backward()
            t_step.append(time.perf_counter() - t0)
            t0 = time.perf_counter()
            self.nll(model)
            t_nll.append(time.perf_counter() - t0)
        return {"step_s": min(t_step), "nll_s": min(t_nll)}

    def objective(self, echo: Callable[[str], None], n_total: int) -> Callable:
        import optuna

        every, objective = self.p["tune"]["report_every"], self.p["tune"]["objective"]

        def run(trial: optuna.Trial) -> float:
            t0 = time.perf_counter()
            values = suggest(trial, self.p)
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


def objective_label(objective: str) -> str:
    return "validation error (1 - strict accuracy)" if objective == "accuracy" else "validation gold NLL/token"


def run_study(p: dict, root: Path = Path("."), *, n_trials: int | None = None, timeout: int | None = None,
              echo: Callable[[str], None] = print) -> dict:
    """Run (or resume, or join) the study until it holds `n_trials` finished trials; then write the results."""
    import optuna

    optuna.logging.set_verbosity(optuna.logging.WARNING)  # our own progress line per trial instead
    warnings.filterwarnings("ignore", category=FutureWarning, module="transformers")
    t = p["tune"]
    n_total = n_trials or t["n_trials"]
    timeout = timeout if timeout is not None else t["timeout"]
    trials = Trials(p, root)  # every artefact check before the database is touched
    study = load_study(p, root)
    with warnings.catch_warnings():
        warnings.simplefilter("ignore", optuna.exceptions.ExperimentalWarning)
        optuna.storages.fail_stale_trials(study)  # a killed trial is failed and re-queued before counting
    done = len(finished(study))
    left = max(n_total - done, 0)
    echo(f"study {study.study_name} in {redact(t['storage'])}: {done} finished trial(s), {left} to run to "
         f"{n_total}; objective: {objective_label(t['objective'])}; strategy {t['strategy']}; "
         f"{len(trials.examples)} training examples x {p['distill']['epochs']} epoch(s), "
         f"{len(trials.val_rows)} validation questions")
    if left:
        per_trial, how = expected_trial_seconds(study, trials, t["objective"])
        echo(f"expected wall time: {left} trial(s) x {per_trial:.0f} s = {fmt_seconds(left * per_trial)} ({how}; "
             f"pruned trials are cheaper; {'timeout ' + str(timeout) + ' s' if timeout else 'no timeout'})")
        from optuna.study import MaxTrialsCallback
        from optuna.trial import TrialState

        # n_trials bounds this process; MaxTrialsCallback stops it when other processes finished the rest
        study.optimize(trials.objective(echo, n_total), n_trials=left, timeout=timeout, gc_after_trial=True,
                       callbacks=[MaxTrialsCallback(n_total, states=(TrialState.COMPLETE, TrialState.PRUNED))])
    return write_results(study, p, root, echo)


def expected_trial_seconds(study, trials: Trials, objective: str) -> tuple[float, str]:
    from optuna.trial import TrialState

    past = [tr.user_attrs["seconds"] for tr in study.get_trials(deepcopy=False, states=(TrialState.COMPLETE,))
            if "seconds" in tr.user_attrs]
    if past:
        return sum(past) / len(past), f"mean of {len(past)} finished trial(s)"
    c = trials.calibrate()
    n_reports = trials.steps // trials.p["tune"]["report_every"] + (trials.steps % trials.p["tune"]["report_every"] > 0)
    est = trials.steps * c["step_s"] + n_reports * c["nll_s"]
    how = (f"calibrated: {trials.steps} steps x {c['step_s']:.2f} s + {n_reports} validation NLL passes x "
           f"{c['nll_s']:.2f} s")
    if objective == "accuracy":
        how += "; excludes the lm-eval scoring of each trial, measured from the first trial on"
    return est, how


def fmt_seconds(s: float) -> str:
    return f"{s:.0f} s" if s < 120 else f"{s / 60:.1f} min" if s < 7200 else f"{s / 3600:.1f} h"


# ------------------------------------------------------------------------------------------------ results


def summarise_study(study, p: dict) -> dict:
    from optuna.trial import TrialState

    all_trials = study.get_trials(deepcopy=False)
    count = {s.name.lower(): sum(tr.state == s for tr in all_trials) for s in TrialState}
    complete = [tr for tr in all_trials if tr.state == TrialState.COMPLETE]
    out = {"study": study.study_name, "storage": redact(p["tune"]["storage"]), "objective": p["tune"]["objective"],
           "objective_meaning": objective_label(p["tune"]["objective"]) + " (minimised)",
           "strategy": p["tune"]["strategy"], "profile": p["profile"], "split": "validation",
           "validation_questions": None, "trials": count,
           "space": p["tune"]["space"], "paper": PAPER}
    seconds = [tr.user_attrs["seconds"] for tr in complete if "seconds" in tr.user_attrs]
    out["seconds_per_trial"] = sum(seconds) / len(seconds) if seconds else None
    if complete:
        best = study.best_trial
        out["best"] = {"trial": best.number, "value": best.value, "params": dict(best.params),
                       **{k: best.user_attrs[k] for k in ("gold_nll", "accuracy_strict", "accuracy_flexible")
                          if k in best.user_attrs}}
    return out


def write_results(study, p: dict, root: Path = Path("."), echo: Callable[[str], None] = print) -> dict:
    root = Path(root)
    summary = summarise_study(study, p)
    summary["validation_questions"] = len(read_jsonl(root / "data/prepared/validation.jsonl"))
    plots = write_plots(study, root / REPORT_DIR, p["seed"])
    summary["plots"] = [str(REPORT_DIR / name) for name in plots]
    write_json(root / METRICS, summary)
    write_text(root / REPORT_DIR / "index.md", markdown(summary))
    if "best" in summary:
        b = summary["best"]
        echo(f"best: trial {b['trial']}, {', '.join(f'{k}={v:.4g}' for k, v in b['params'].items())} -> "
             f"{b['value']:.4f} (paper: alpha={PAPER['alpha']:.3f}, T={PAPER['temperature']:.2f})")
    echo(f"wrote {METRICS} and {REPORT_DIR}/ ({', '.join(plots) or 'no plots: no complete trial'}); "
         "`kd tune --apply` writes the best values into params.yaml")
    return summary


def markdown(s: dict) -> str:
    c = s["trials"]
    lines = [f"# Hyperparameter study `{s['study']}`", "",
             f"Optuna TPE on the **validation** split ({s['validation_questions']} questions; the eval split is never "
             f"read), strategy `{s['strategy']}`, profile `{s['profile']}`. Objective: {s['objective_meaning']}. "
             f"Trials: {c['complete']} complete, {c['pruned']} pruned, {c['fail']} failed (killed and retried), "
             f"{c['running']} running." +
             (f" Mean cost of a complete trial: {s['seconds_per_trial']:.1f} s." if s["seconds_per_trial"] else ""), ""]
    if "best" in s:
        b = s["best"]
        other = ", ".join(f"{k}={v:.4g}" for k, v in b["params"].items() if k not in ("alpha", "temperature"))
        lines += ["| | alpha | temperature | other | trials | split |", "|---|---|---|---|---|---|",
                  f"| this study (trial {b['trial']}) | {b['params']['alpha']:.3f} | {b['params']['temperature']:.2f} "
                  f"| {other or '—'} | {c['complete'] + c['pruned']} | validation |",
                  f"| paper | {PAPER['alpha']:.3f} | {PAPER['temperature']:.2f} | — | {PAPER['trials']} | test |", "",
                  f"Best objective value: {b['value']:.4f}."
                  + (f" Validation strict accuracy {100 * b['accuracy_strict']:.1f} %." if "accuracy_strict" in b
                     else ""), ""]
    for name, title in (("history.png", "Optimisation history"), ("importance.png", "Parameter importances"),
                        ("contour.png", "alpha–T contour")):
        if str(REPORT_DIR / name) in s["plots"]:
            lines += [f"![{title}]({name})", ""]
    return "\n".join(lines)


def write_plots(study, out_dir: Path, seed: int) -> list[str]:
    """Optuna's matplotlib plots as byte-stable PNGs (no Software stamp; fANOVA seeded). A plot that needs more
    complete trials than the study has is left out."""
    import io

    import matplotlib
    import optuna
    from optuna.trial import TrialState

    from kd.report import PNG_DPI, RC

    complete = study.get_trials(deepcopy=False, states=(TrialState.COMPLETE,))
    vis = optuna.visualization.matplotlib
    plots = {"history.png": (1, lambda: vis.plot_optimization_history(study))}
    if len(complete) >= 2:
        plots["importance.png"] = (2, lambda: vis.plot_param_importances(
            study, evaluator=optuna.importance.FanovaImportanceEvaluator(seed=seed)))
        plots["contour.png"] = (2, lambda: vis.plot_contour(study, params=["alpha", "temperature"]))
    written = []
    out_dir.mkdir(parents=True, exist_ok=True)
    for name, (need, make) in plots.items():
        path = out_dir / name
        if len(complete) < need:
            continue
        with warnings.catch_warnings(), matplotlib.rc_context(RC):
            warnings.simplefilter("ignore")  # optuna marks its matplotlib plots experimental
            matplotlib.use("Agg")
            ax = make()
            ax = ax.flat[0] if hasattr(ax, "flat") else ax
            fig = ax.get_figure()
            fig.set_size_inches(6.4, 4.2)
            fig.tight_layout()
            buf = io.BytesIO()
            fig.savefig(buf, format="png", dpi=PNG_DPI, metadata={"Software": None})
            import matplotlib.pyplot as plt

            plt.close(fig)
        from kd.io import atomic_path

        with atomic_path(path) as tmp:
            Path(tmp).write_bytes(buf.getvalue())
        written.append(name)
    for stale in set(p.name for p in out_dir.glob("*.png")) - set(written):
        (out_dir / stale).unlink()
    return written


# -------------------------------------------------------------------------------------------------- apply


def apply_best(root: Path = Path("."), params_path: str = "params.yaml") -> dict[str, tuple]:
    """Write metrics/tune.json's best values into params.yaml, keeping its comments and layout (ruamel round trip);
    the result is validated before it replaces the file. Returns {dotted key: (old, new)}."""
    from ruamel.yaml import YAML

    from kd.params import load_params, validate

    root = Path(root)
    mpath = root / METRICS
    if not mpath.exists():
        raise KdError(f"{METRICS}: no study results; run `kd tune` first")
    best = (read_json(mpath).get("best") or {}).get("params")
    if not best:
        raise KdError(f"{METRICS}: the study has no complete trial yet; nothing to apply")
    unknown = sorted(set(best) - set(PARAM_KEYS))
    if unknown:
        raise KdError(f"{METRICS}: unknown parameter {unknown[0]!r} (allowed: {', '.join(PARAM_KEYS)})")
    path = root / params_path
    load_params(path, root=root)  # the strict reader first (no anchors, duplicate keys, oversized files)
    rt = YAML(typ="rt")  # round-trip (safe: builds only plain mappings/lists/scalars): comments, order, flow lists kept
    rt.preserve_quotes = True
    rt.width = 4096
    rt.representer.add_representer(  # keep `null` written as null, not as an empty value
        type(None), lambda r, _: r.represent_scalar("tag:yaml.org,2002:null", "null"))
    doc = rt.load(path.read_text(encoding="utf-8"))
    changes = {}
    for name, value in best.items():
        keys = PARAM_KEYS[name]
        node = doc
        for k in keys[:-1]:
            node = node[k]
        old = node[keys[-1]]
        new = int(value) if name == "lora_r" else float(value)
        if old != new:
            node[keys[-1]] = new
            changes[".".join(keys)] = (old, new)
    buf = __import__("io").StringIO()
    rt.dump(doc, buf)
    import yaml

    validate(yaml.safe_load(buf.getvalue()), root=root)  # never write a params file that does not validate
    write_text(path, buf.getvalue())
    return changes


def dvc_stale(root: Path) -> list[str]:
    """Stages `dvc status` reports out of date (what `dvc repro` would re-run first)."""
    import json
    import subprocess
    import sys

    res = subprocess.run([sys.executable, "-m", "dvc", "status", "--json"], cwd=root, capture_output=True, text=True)
    if res.returncode != 0:
        raise KdError(f"dvc status failed: {res.stderr.strip()[-500:]}")
    return sorted(json.loads(res.stdout or "{}"))

"""`kd tune`'s results: the study summarised into metrics/tune.json, reports/tune/index.md and Optuna's plots as
byte-stable PNGs."""

from __future__ import annotations

import warnings
from pathlib import Path
from typing import TYPE_CHECKING, Callable

from kd.core.io import read_jsonl, write_json, write_text
from kd.tools.tune.storage import redact

if TYPE_CHECKING:
    from kd.config.params import Params

PAPER = {"alpha": 0.6093348343631224, "temperature": 5.942267335064758, "trials": 35,
         "note": "Optuna TPE, 35 trials, on the GSM8K test split, another model pair"}
METRICS = Path("metrics/tune.json")
REPORT_DIR = Path("reports/tune")


def objective_label(objective: str) -> str:
    return "validation error (1 - strict accuracy)" if objective == "accuracy" else "validation gold NLL/token"


def summarise_study(study, c: Params) -> dict:
    from optuna.trial import TrialState

    all_trials = study.get_trials(deepcopy=False)
    count = {s.name.lower(): sum(tr.state == s for tr in all_trials) for s in TrialState}
    complete = [tr for tr in all_trials if tr.state == TrialState.COMPLETE]
    out = {"study": study.study_name, "storage": redact(c.tune.storage), "objective": c.tune.objective,
           "objective_meaning": objective_label(c.tune.objective) + " (minimised)",
           "strategy": c.tune.strategy, "profile": c.profile, "split": "validation",
           "validation_questions": None, "trials": count,
           "space": c.tune.space.model_dump(), "paper": PAPER}
    seconds = [tr.user_attrs["seconds"] for tr in complete if "seconds" in tr.user_attrs]
    out["seconds_per_trial"] = sum(seconds) / len(seconds) if seconds else None
    if complete:
        best = study.best_trial
        out["best"] = {"trial": best.number, "value": best.value, "params": dict(best.params),
                       **{k: best.user_attrs[k] for k in ("gold_nll", "accuracy_strict", "accuracy_flexible")
                          if k in best.user_attrs}}
    return out


def write_results(study, c: Params, root: Path = Path("."), echo: Callable[[str], None] = print) -> dict:
    root = Path(root)
    summary = summarise_study(study, c)
    summary["validation_questions"] = len(read_jsonl(root / "data/prepared/validation.jsonl"))
    plots = write_plots(study, root / REPORT_DIR, c.seed)
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

    from kd.report.plots import PNG_DPI, RC

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
        from kd.core.io import atomic_path

        with atomic_path(path) as tmp:
            Path(tmp).write_bytes(buf.getvalue())
        written.append(name)
    for stale in set(p.name for p in out_dir.glob("*.png")) - set(written):
        (out_dir / stale).unlink()
    return written

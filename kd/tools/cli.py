"""`kd`: the command line around the pipeline. Stages themselves run through DVC (`dvc repro`)."""

from __future__ import annotations

import os
import subprocess
import sys
from pathlib import Path

import click

from kd.core.errors import KdError


def _uncommitted(path: Path) -> bool | None:
    """True if `path` has edits git does not hold; None outside a git checkout."""
    try:
        res = subprocess.run(["git", "status", "--porcelain", "--", path.name], cwd=path.parent,
                             capture_output=True, text=True, check=True)
    except (OSError, subprocess.CalledProcessError):
        return None
    return bool(res.stdout.strip())


@click.group(context_settings={"help_option_names": ["-h", "--help"]})
def cli():
    """kd-prime: response-priming knowledge distillation, reproducibly (see README.md)."""


@cli.command()
@click.argument("name")
@click.option("--force", is_flag=True, help="Overwrite params.yaml even if it has uncommitted edits.")
def profile(name, force):
    """Write profile NAME (profiles/base.yaml + profiles/NAME.yaml) into params.yaml, validated first."""
    import yaml

    from kd.config import profiles
    from kd.config.params import validate
    from kd.core.io import write_text

    root = Path.cwd()
    text = profiles.render(name, root)  # refuses anything but a listed profile's name
    validate(yaml.safe_load(text), root=root)  # a profile that does not validate is never written
    dst = root / "params.yaml"
    if dst.exists() and not force and dst.read_text(encoding="utf-8") != text:
        state = _uncommitted(dst)
        same_as_profile = any(dst.read_text(encoding="utf-8") == profiles.render(n, root) for n in profiles.names(root))
        if state or (state is None and not same_as_profile):
            raise KdError("params.yaml has uncommitted edits; commit them or pass --force to overwrite")
    write_text(dst, text)
    click.echo(f"params.yaml <- profiles/base.yaml + profiles/{name}.yaml")


@cli.command()
@click.option("--params", "path", default="params.yaml", show_default=True)
def validate(path):
    """Check every key of a params file; exit 2 naming the first bad key."""
    from kd.config.params import load_config
    from kd.data.prompting import check_context

    c = load_config(path)
    check_context(c, Path.cwd(), current_only=True)  # where models/<role> exist: does the shortest prompt fit their context?
    click.echo(f"{path}: ok (profile {c.profile}, strategies {', '.join(c.prompting.strategies)})")


@cli.command()
@click.option("--profile", "profile_name", default="tiny", show_default=True, help="Profile both runs use.")
@click.option("--tolerance", is_flag=True,
              help="Where bit-exactness is impossible (GPU): compare metrics within --rtol/--atol instead.")
@click.option("--rtol", type=float, default=None, help="Relative tolerance for --tolerance (default 0.01).")
@click.option("--atol", type=float, default=None, help="Absolute tolerance for --tolerance (default 0.01).")
@click.option("--skip-invalidation", is_flag=True, help="Only compare the two runs.")
@click.option("--quick", is_flag=True,
              help="No runs: check invalidation and code deps on a placeholder project (seconds).")
@click.option("--keep", is_flag=True, help="Keep the temporary project copies (their path is printed).")
@click.option("--workdir", default=None,
              help="Where the copies go (default $TMPDIR).")
@click.option("--committed", is_flag=True,
              help="Re-run a sample of stages in a fresh clone and compare with the committed artefacts "
                   "(identical, or a drift report where the environment differs). docs/reproducibility.md")
@click.option("--stage", "stages", multiple=True,
              help="With --committed: a stage to re-run (repeatable; default teacher@<first strategy>, eval_student@student).")
def verify(profile_name, tolerance, rtol, atol, skip_invalidation, quick, keep, workdir, committed, stages):
    """Run the pipeline twice from scratch in temp copies; compare every output and metric; check that each
    param/file change invalidates exactly the stages that use it. Exit 1 naming the first difference."""
    from kd.harness.dvc_project import project_root
    from kd.harness.run_compare import DEFAULT_ATOL, DEFAULT_RTOL
    from kd.harness.verify import render
    from kd.harness.verify import verify as run_verify

    if stages and not committed:
        raise click.UsageError("--stage needs --committed")
    if committed:
        from kd.harness.verify_committed import exit_code, verify_committed
        from kd.harness.verify_committed import render as render_committed

        checks = verify_committed(Path.cwd(), list(stages) or None, Path(workdir) if workdir else None, keep,
                                  echo=click.echo)
        click.echo(render_committed(checks))
        sys.exit(exit_code(checks))

    if (rtol is not None or atol is not None) and not tolerance:
        raise click.UsageError("--rtol/--atol need --tolerance")
    if quick and skip_invalidation:
        raise click.UsageError("--quick and --skip-invalidation leave nothing to check")
    if workdir is not None and not Path(workdir).is_dir():
        raise KdError(f"--workdir {workdir}: {'is not a folder' if Path(workdir).exists() else 'does not exist'} "
                      "(create it, or leave --workdir out for $TMPDIR)")
    if workdir is not None and not os.access(workdir, os.W_OK | os.X_OK):
        raise KdError(f"--workdir {workdir}: not writable")
    from kd.core.names import profile as check_profile

    check_profile(profile_name)
    tol = (DEFAULT_RTOL if rtol is None else rtol, DEFAULT_ATOL if atol is None else atol) if tolerance else None
    root = project_root()
    v = run_verify(root, profile_name, tol, Path(workdir) if workdir else None, keep, not skip_invalidation,
                   reproduce=not quick, echo=click.echo)
    click.echo(render(v))
    sys.exit(0 if v.ok else 1)


@cli.command()
@click.argument("run_a", type=click.Path(file_okay=False, exists=True))
@click.argument("run_b", type=click.Path(file_okay=False, exists=True))
def compare(run_a, run_b):
    """Two finished runs of the project (folders holding dvc.lock and the outputs): every output hash and every
    metric, compared exactly. Exit 1 naming the first difference. E.g. the tiny pipeline before and after a code
    change: `kd verify --skip-invalidation --keep --workdir W` at each commit, then `kd compare W1/.../run-A/project
    W2/.../run-A/project` (docs/reproducibility.md)."""
    from kd.harness.run_compare import compare_projects
    from kd.harness.verify import Verdict, render

    rows, diffs, first = compare_projects(Path(run_a), Path(run_b))
    click.echo(render(Verdict(first is None, first, rows, diffs, [], [], None, {})).replace("run A vs run B",
                                                                                           f"{run_a} vs {run_b}"))
    sys.exit(0 if first is None else 1)


@cli.command("pr-report")
@click.argument("base")
@click.argument("head", default="HEAD")
@click.option("--plots", "plots_dir", default="pr-report", show_default=True,
              help="Folder for the report's PNGs (linked from the Markdown); only ever holds them. '' for none.")
def pr_report(base, head, plots_dir):
    """Markdown to stdout: what changed from commit BASE to HEAD (params, re-run stages, accuracy per arm with the
    paired exact test on the shared questions, teacher, environment, plots), from what git holds. docs/ci.md"""
    from kd.report.pr import check_plots_dir
    from kd.report.pr import pr_report as run

    plots = check_plots_dir(plots_dir) if plots_dir else None
    click.echo(run(Path.cwd(), base, head, plots), nl=False)


@cli.command("code-deps")
@click.option("--check", is_flag=True, help="Only say whether dvc.yaml is stale (exit 1 if it is); write nothing.")
def code_deps(check):
    """Regenerate dvc.yaml's kd/*.py deps: each stage's script's import closure (kd/harness/code_deps.py)."""
    from kd.core.io import write_text
    from kd.harness.code_deps import generated_dvc_yaml
    from kd.harness.dvc_project import project_root

    root = project_root()
    text = generated_dvc_yaml(root)
    if (root / "dvc.yaml").read_text(encoding="utf-8") == text:
        click.echo("dvc.yaml: code deps up to date")
        return
    if check:
        click.echo("dvc.yaml: code deps are stale: run `kd code-deps`", err=True)
        sys.exit(1)
    write_text(root / "dvc.yaml", text)
    click.echo("dvc.yaml: code deps regenerated from the stages' imports")


@cli.command("invalidation-table")
@click.option("--write", is_flag=True, help="Put it into docs/reproducibility.md (between its markers).")
def invalidation_table(write):
    """The invalidation table (kd/harness/invalidation.py: change -> stages out of date) as Markdown."""
    from kd.core.io import write_text
    from kd.harness.dvc_project import project_root
    from kd.harness.invalidation import DOC, doc_with_table, render_table

    if not write:
        click.echo(render_table(), nl=False)
        return
    doc = project_root() / DOC
    write_text(doc, doc_with_table(doc.read_text(encoding="utf-8")))
    click.echo(f"wrote the invalidation table into {doc}")


@cli.command()
@click.option("--profile", "size", type=click.Choice(["tiny", "real"]), default=None,
              help="tiny: build the tiny random pair in a temp dir (seconds); real: models/teacher and "
                   "models/student. Default: real if those folders exist, else tiny.")
@click.option("--models", "models_dir", type=click.Path(file_okay=False), default=None,
              help="Folder holding teacher/ and student/ (implies the real sizes unless --profile tiny).")
@click.option("--dtype", type=click.Choice(["bfloat16", "float32"]), default=None,
              help="Default: params.yaml's student.dtype (what the pipeline computes in), else bfloat16.")
@click.option("--out", type=click.Path(dir_okay=False), default="reports/bench.json", show_default=True)
@click.option("--no-train", is_flag=True, help="Skip items 3-4 (training steps).")
@click.option("--no-growth", is_flag=True, help="Skip item 6 (time at 1x and 4x the questions).")
@click.option("--only-invariance", is_flag=True, help="Only item 7 (batch invariance and its cost).")
@click.option("--only-dtypes", is_flag=True, help="Only item 8 (bf16 vs float32 matmul speed at the models' shapes; "
                                                  "seconds, no weights loaded).")
@click.option("--threads", type=click.IntRange(min=1), default=None,
              help="torch threads (default: torch's own). On a machine shared with other work, 1 avoids "
                   "threads spinning against each other (measured 10x slower decoding at 2 threads under load).")
def bench(size, models_dir, dtype, out, no_train, no_growth, only_invariance, only_dtypes, threads):
    """Speed ratios measured side by side (decoder, training step, dvc); writes --out and prints a table."""
    from kd.tools.bench.command import run

    run(size, Path(models_dir) if models_dir else None, dtype, Path(out), train=not no_train, growth=not no_growth,
        only_invariance=only_invariance, only_dtypes=only_dtypes, threads=threads, echo=click.echo)


@cli.command(context_settings={"ignore_unknown_options": True, "allow_extra_args": True})
@click.argument("dvc_args", nargs=-1, type=click.UNPROCESSED)
def repro(dvc_args):
    """Check params, strategies, data and models cheaply (naming the bad key or file), then `dvc repro DVC_ARGS`.
    A stage that still fails gets its previous outputs back, so nothing already produced is lost."""
    from kd.harness.repro import repro as run_repro

    sys.exit(run_repro(Path.cwd(), list(dvc_args), echo=click.echo))


@cli.group()
def select():
    """Measure the profile's prompt and training-target choices on the validation split (never eval) and record the
    evidence in selection/<profile>.json, which the report shows. Needs `dvc repro` up to the stages named below."""


@select.command("instruction")
@click.option("--strategy", "strategies", multiple=True,
              help="Strategies to measure under (repeatable; default: every strategy of the profile).")
@click.option("--candidate", "candidates", multiple=True,
              help="Candidates to measure (repeatable; default all). Earlier measurements of this profile are kept.")
def select_instruction(strategies, candidates):
    """Teacher accuracy on the validation questions under each candidate answer-format instruction (kd/tools/select/instruction_targets.py).
    Needs models/teacher and data/prepared (`dvc repro model@teacher prepare`)."""
    from kd.config.params import load_config
    from kd.tools.select.instruction_targets import select_instruction as run

    c = load_config()
    bad = [s for s in strategies if s not in c.prompting.strategies]
    if bad:
        raise KdError(f"--strategy {bad[0]!r} is not in prompting.strategies "
                      f"(allowed: {', '.join(c.prompting.strategies)})")
    from kd.tools.select.instruction_targets import INSTRUCTIONS

    bad = [x for x in candidates if x not in INSTRUCTIONS]
    if bad:
        raise KdError(f"--candidate {bad[0]!r} is not a candidate (allowed: {', '.join(INSTRUCTIONS)})")
    sel = run(c, Path.cwd(), list(strategies) or None, list(candidates) or None, echo=click.echo)
    click.echo(f"{sel['decision']}\nset prompting.instruction to: {sel['best']!r}")


@select.command("targets")
@click.argument("strategy")
def select_targets(strategy):
    """Distil one student per (hard target, response filter) pair on STRATEGY's transfer responses and compare their
    validation gold NLL. Needs `dvc repro logits@STRATEGY model@student`."""
    from kd.config.params import load_config
    from kd.tools.select.instruction_targets import select_targets as run

    c = load_config()
    if strategy not in c.prompting.strategies:
        raise KdError(f"strategy {strategy!r} is not in prompting.strategies "
                      f"(allowed: {', '.join(c.prompting.strategies)})")
    sel = run(c, Path.cwd(), strategy, echo=click.echo)
    click.echo(sel["decision"])


@select.command("recipe")
@click.argument("strategy")
def select_recipe(strategy):
    """Distil one student per candidate optimiser and learning rate (then the best one with more epochs) on
    STRATEGY's transfer responses and compare their validation gold NLL (kd/tools/select/recipe.py). Needs
    `dvc repro logits@STRATEGY model@student`."""
    from kd.config.params import load_config
    from kd.tools.select.recipe import select_recipe as run

    c = load_config()
    if strategy not in c.prompting.strategies:
        raise KdError(f"strategy {strategy!r} is not in prompting.strategies "
                      f"(allowed: {', '.join(c.prompting.strategies)})")
    sel = run(c, Path.cwd(), strategy, echo=click.echo)
    b = sel["best"]
    click.echo(f"{sel['decision']}\nset distill.optimizer: {b['optimizer']}, distill.lr: {b['lr']}, "
               f"distill.epochs: {b['epochs']}")


@cli.command()
@click.option("--trials", "n_trials", type=click.IntRange(1), default=None,
              help="Finished trials the study should hold (default: params tune.n_trials).")
@click.option("--timeout", type=click.IntRange(1), default=None,
              help="Seconds this process may run; it stops after the trial in progress (default: tune.timeout).")
@click.option("--apply", "apply_", is_flag=True,
              help="Run no trial: write metrics/tune.json's best values into params.yaml (alpha, temperature, and "
                   "distill.lr / distill.lora.r when searched), keeping its comments; then `dvc repro` re-runs "
                   "distill@* and what follows, never teacher or logits.")
@click.option("--report", "report_only", is_flag=True,
              help="Run no trial: rewrite metrics/tune.json and reports/tune/ from the study as it stands.")
def tune(n_trials, timeout, apply_, report_only):
    """Search alpha and temperature (optionally distill.lr, distill.lora.r) with an Optuna study on the VALIDATION
    split; the eval split is never read.

    \b
    Each trial distils the student on tune.strategy's teacher responses exactly as distill@<strategy> does, with
    the trial's values, and is scored by tune.objective:
      accuracy  validation strict accuracy through lm-eval (the study minimises 1 - accuracy; default)
      nll       the student's validation gold-solution NLL per token (kd select's measure; minutes, not hours)
    Every tune.report_every steps the trial reports its validation gold NLL; the median pruner stops trials worse
    than the median of earlier ones at the same step.

    \b
    The study lives in tune.storage (default sqlite:///tune/optuna.db): re-running `kd tune` resumes it (a trial
    killed mid-way is failed and re-run with the same values; only complete and pruned trials count toward
    tune.n_trials), and several `kd tune` processes on one storage share it (PostgreSQL across machines).
    Results: metrics/tune.json, reports/tune/ (history, importances, alpha-T contour). Then `kd tune --apply`.

    Needs `dvc repro logits@<tune.strategy> model@student prepare`."""
    from kd.config.params import load_config
    from kd.tools.tune.apply import apply_best
    from kd.tools.tune.results import write_results
    from kd.tools.tune.storage import load_study
    from kd.tools.tune.study import run_study

    root = Path.cwd()
    if apply_ and report_only:
        raise KdError("--apply and --report exclude each other")
    if apply_:
        changes = apply_best(root)
        for key, (old, new) in changes.items():
            click.echo(f"params.yaml: {key}: {old} -> {new}")
        click.echo("now `dvc status` lists the stages these keys feed (distill@*, finetune, report: the table in "
                   "docs/reproducibility.md); `dvc repro` re-runs them" if changes else
                   "params.yaml already holds the study's best values")
        return
    c = load_config()
    if report_only:
        write_results(load_study(c, root), c, root, echo=click.echo)
        return
    run_study(c, root, n_trials=n_trials, timeout=timeout, echo=click.echo)


@cli.command()
@click.option("--mde", type=float, required=True,
              help="The difference to detect, in accuracy points (e.g. 10 = 10 percentage points).")
@click.option("--disagreement", type=float, default=None,
              help="Share of questions the two arms disagree on, in (0, 1]. Default: measured on the committed "
                   "results/eval/<arm>.jsonl (the largest of the first comparison family), else "
                   "report.planning_disagreement.")
@click.option("--seconds-per-question", "seconds", type=float, default=None,
              help="Eval seconds per question and arm. Default: measured (results/eval/<arm>.json, reports/bench.json).")
def plan(mde, disagreement, seconds):
    """How many eval questions a detectable difference needs, and what evaluating them costs on this machine."""
    from kd.config.params import load_config
    from kd.tools.plan import plan as plan_questions

    if not 0 < mde <= 100:
        raise KdError(f"kd plan: --mde is {mde}; allowed: accuracy points in (0, 100]")
    if seconds is not None and not seconds > 0:
        raise KdError(f"kd plan: --seconds-per-question is {seconds}; allowed: a number > 0")
    for line in plan_questions(load_config(), mde / 100, disagreement, Path.cwd(), seconds):
        click.echo(line)


def main():
    from kd.core.entry import handle

    handle(lambda: cli(standalone_mode=False))


if __name__ == "__main__":
    main()

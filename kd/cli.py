"""`kd`: the command line around the pipeline. Stages themselves run through DVC (`dvc repro`)."""

from __future__ import annotations

import shutil
import subprocess
import sys
from pathlib import Path

import click

from kd.errors import KdError


def _profiles(root: Path) -> list[str]:
    return sorted(p.stem for p in (root / "profiles").glob("*.yaml"))


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
    """Write profiles/NAME.yaml into params.yaml (validated first)."""
    from kd.params import load_params

    root = Path.cwd()
    src = root / "profiles" / f"{name}.yaml"
    if not src.exists():
        raise KdError(f"profile {name!r} does not exist (allowed: {', '.join(_profiles(root))})")
    load_params(src)  # a profile that does not validate is never written
    dst = root / "params.yaml"
    if dst.exists() and not force and dst.read_bytes() != src.read_bytes():
        state = _uncommitted(dst)
        same_as_profile = any(dst.read_bytes() == p.read_bytes() for p in (root / "profiles").glob("*.yaml"))
        if state or (state is None and not same_as_profile):
            raise KdError("params.yaml has uncommitted edits; commit them or pass --force to overwrite")
    shutil.copyfile(src, dst)
    click.echo(f"params.yaml <- profiles/{name}.yaml")


@cli.command()
@click.option("--params", "path", default="params.yaml", show_default=True)
def validate(path):
    """Check every key of a params file; exit 2 naming the first bad key."""
    from kd.params import load_params

    p = load_params(path)
    click.echo(f"{path}: ok (profile {p['profile']}, strategies {', '.join(p['prompting']['strategies'])})")


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
@click.option("--workdir", type=click.Path(file_okay=False), default=None,
              help="Where the copies go (default $TMPDIR).")
@click.option("--committed", is_flag=True,
              help="Re-run a sample of stages in a fresh clone and compare with the committed artefacts "
                   "(identical, or a drift report where the environment differs). docs/reproducibility.md")
@click.option("--stage", "stages", multiple=True,
              help="With --committed: a stage to re-run (repeatable; default teacher@<first strategy>, eval@student).")
def verify(profile_name, tolerance, rtol, atol, skip_invalidation, quick, keep, workdir, committed, stages):
    """Run the pipeline twice from scratch in temp copies; compare every output and metric; check that each
    param/file change invalidates exactly the stages that use it. Exit 1 naming the first difference."""
    from kd.verify import DEFAULT_ATOL, DEFAULT_RTOL, ROOT, render, verify as run_verify

    if stages and not committed:
        raise click.UsageError("--stage needs --committed")
    if committed:
        from kd.verify_committed import exit_code, render as render_committed, verify_committed

        checks = verify_committed(Path.cwd(), list(stages) or None, Path(workdir) if workdir else None, keep,
                                  echo=click.echo)
        click.echo(render_committed(checks))
        sys.exit(exit_code(checks))

    if (rtol is not None or atol is not None) and not tolerance:
        raise click.UsageError("--rtol/--atol need --tolerance")
    if quick and skip_invalidation:
        raise click.UsageError("--quick and --skip-invalidation leave nothing to check")
    tol = (DEFAULT_RTOL if rtol is None else rtol, DEFAULT_ATOL if atol is None else atol) if tolerance else None
    root = Path.cwd() if (Path.cwd() / "dvc.yaml").exists() else ROOT
    v = run_verify(root, profile_name, tol, Path(workdir) if workdir else None, keep, not skip_invalidation,
                   reproduce=not quick, echo=click.echo)
    click.echo(render(v))
    sys.exit(0 if v.ok else 1)


@cli.command(context_settings={"ignore_unknown_options": True, "allow_extra_args": True})
@click.argument("dvc_args", nargs=-1, type=click.UNPROCESSED)
def repro(dvc_args):
    """Check params, strategies, data and models cheaply (naming the bad key or file), then `dvc repro DVC_ARGS`.
    A stage that still fails gets its previous outputs back, so nothing already produced is lost."""
    from kd.verify import repro as run_repro

    sys.exit(run_repro(Path.cwd(), list(dvc_args), echo=click.echo))


def main():
    try:
        cli(standalone_mode=False)
    except KdError as e:
        click.echo(f"error: {e}", err=True)
        sys.exit(2)
    except click.exceptions.Abort:
        sys.exit(1)
    except click.exceptions.ClickException as e:
        e.show()
        sys.exit(e.exit_code)


if __name__ == "__main__":
    main()

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

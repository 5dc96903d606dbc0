"""Shared entry-point behaviour: a KdError prints one clear line and exits 2 (no traceback)."""

from __future__ import annotations

import sys

from kd.errors import KdError


def run_stage(command) -> None:
    try:
        command(standalone_mode=False)
    except KdError as e:
        print(f"error: {e}", file=sys.stderr)
        sys.exit(2)
    except Exception as e:  # click usage errors
        import click

        if isinstance(e, click.exceptions.ClickException):
            e.show()
            sys.exit(e.exit_code)
        raise

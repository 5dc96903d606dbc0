"""Shared entry-point behaviour: a KdError prints one clear line and exits 2 (no traceback).

Anything else is a bug or an unforeseen environment problem: one `error: internal error ...` line and exit 1, with
the traceback only under KD_DEBUG=1 (then every error re-raises, KdError included, to show where it came from)."""

from __future__ import annotations

import os
import sys

from kd.core.errors import KdError


def debug() -> bool:
    return os.environ.get("KD_DEBUG", "") not in ("", "0", "false", "no")


def handle(call) -> None:
    """Run `call()`; turn what it raises into the one-line contract above."""
    import click

    try:
        call()
    except KdError as e:
        if debug():
            raise
        print(f"error: {' '.join(str(e).split())}" if "\n" not in str(e).strip() else f"error: {e}", file=sys.stderr)
        sys.exit(2)
    except click.exceptions.Abort:
        sys.exit(1)
    except click.exceptions.ClickException as e:  # usage errors (exit 2): one line too, `--help` says the rest
        if debug():
            raise
        hint = " (see --help)" if isinstance(e, click.exceptions.UsageError) else ""
        print(f"error: {' '.join(e.format_message().split())}{hint}", file=sys.stderr)
        sys.exit(e.exit_code)
    except (SystemExit, KeyboardInterrupt):
        raise
    except MemoryError:
        if debug():
            raise
        print("error: out of memory (an input far larger than expected?); KD_DEBUG=1 shows where", file=sys.stderr)
        sys.exit(1)
    except Exception as e:  # noqa: BLE001 - the one place that turns the unexpected into one line
        if debug():
            raise
        first = (str(e).strip().splitlines() or [""])[0][:300]
        print(f"error: internal error {type(e).__name__}: {first} (re-run with KD_DEBUG=1 for the traceback)",
              file=sys.stderr)
        sys.exit(1)


def run_stage(command) -> None:
    handle(lambda: command(standalone_mode=False))

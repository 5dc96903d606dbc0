"""`kd repro`'s way of running DVC: `python -m kd.harness.dvc_compat ARGS` is DVC's own CLI with one workaround applied
in this process only, so `kd repro --dry` works on a fresh clone. It is not installed as `dvc`: the `dvc` command is
DVC's own, untouched (tests/integration/test_dvc_interface.py checks both).

The bug (treeverse/dvc#9818, open): a dry run asks the run cache about every stage that would run, and the run
cache hashes the stage's dependencies (`dvc.stage.cache._can_hash` calls `dep.get_hash()`); a dependency that an
earlier stage has not produced yet (on a fresh clone: data/prepared/transfer.jsonl, models/teacher, ...) makes it
crash with `No such file or directory` instead of listing the stage. No fix has been released: DVC 3.67.1, the
newest release when this was written, still calls `dep.get_hash()` without checking that the dependency exists.
The workaround skips the run-cache lookup for a stage whose local dependencies do not all exist (without their
contents there is nothing to look up). It is applied only while the installed DVC's `_can_hash` has no existence
check of its own (`needs_fix`), so it becomes a no-op if a DVC release adds one.
"""

from __future__ import annotations

import sys


def needs_fix() -> bool:
    """True when the installed DVC's run cache still hashes dependencies without checking that they exist."""
    import inspect

    from dvc.stage import cache

    return "dep.exists" not in inspect.getsource(cache._can_hash)


def apply() -> None:
    """Patch `dvc.stage.cache._can_hash`, in this process: a missing local dependency -> no run-cache lookup."""
    from dvc.stage import cache

    if not needs_fix():
        return
    original = cache._can_hash

    def _can_hash(stage):
        if any(dep.protocol == "local" and dep.def_path and not dep.exists for dep in stage.deps):
            return False  # without their contents there is no cached run to look up
        return original(stage)

    cache._can_hash = _can_hash


def main(argv: list[str] | None = None) -> int:
    from dvc.cli import main as dvc_main

    apply()
    return dvc_main(sys.argv[1:] if argv is None else argv)


if __name__ == "__main__":
    sys.exit(main())

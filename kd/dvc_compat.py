"""`python -m kd.dvc_compat ARGS`: the `dvc` command with one upstream fix that DVC 3.67.1 (the newest release)
lacks, so `dvc repro --dry` works on a fresh clone.

The bug (treeverse/dvc#9818): a dry run asks the run cache about every stage that would run, and the run cache
hashes the stage's dependencies; a dependency that an earlier stage has not produced yet (on a fresh clone:
data/prepared/transfer.jsonl, models/teacher, ...) makes it crash with `No such file or directory` instead of
listing the stage. DVC's main branch fixed `_can_hash` by checking `dep.exists` first; this module applies exactly
that check, and only when the installed DVC still crashes (`needs_fix`), so it becomes a no-op once a fixed DVC is
released. `kd repro` runs DVC through this module.
"""

from __future__ import annotations

import sys


def needs_fix() -> bool:
    """True when the installed DVC's run cache still hashes dependencies without checking that they exist."""
    import inspect

    from dvc.stage import cache

    return "dep.exists" not in inspect.getsource(cache._can_hash)


def apply() -> None:
    """Patch `dvc.stage.cache._can_hash` to the upstream version (missing dependency -> no run-cache lookup)."""
    from dvc.stage import cache

    if not needs_fix():
        return
    original = cache._can_hash

    def _can_hash(stage):
        if any(dep.protocol == "local" and dep.def_path and not dep.exists for dep in stage.deps):
            return False  # upstream: "Without their contents we cannot look up a cached run."
        return original(stage)

    cache._can_hash = _can_hash


def main(argv: list[str] | None = None) -> int:
    from dvc.cli import main as dvc_main

    apply()
    return dvc_main(sys.argv[1:] if argv is None else argv)


if __name__ == "__main__":
    sys.exit(main())

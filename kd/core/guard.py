"""The one path guard: every path kd-prime writes, deletes, locks or snapshots resolves inside the project, or is a
place outside it that the user named explicitly (docs/threat-model.md). Like kd/core/names.py it only accepts or refuses
(it never changes an output), so stages need not declare it (kd/harness/code_deps.py)."""

from __future__ import annotations

from pathlib import Path

WORK_DIR = Path(".kd-work")  # resumable work folders of the stages (.kd-work/<stage>/<strategy>/)
KD_TMP = Path(".dvc/tmp")  # kd repro's lock and output snapshots
VALIDATED = Path("params.valid")  # stage validate's output: every stage depends on it (stages/validate.py)


def guard(path, root=None, what: str = "write to"):
    """The one path guard (threat model: docs/threat-model.md). Every path kd-prime writes, deletes, locks or
    snapshots passes here. A relative path, or an absolute one under the project root (`root`, default the current
    folder), must resolve, after every symlink, inside the project; an absolute path outside it was named
    explicitly by the user (KD_CACHE, a DVC cache, an absolute storage URL) and is taken as it is. Anything else is
    refused in one KdError line naming the path and the link that leads out. Returns `path` unchanged."""
    import os

    from kd.core.errors import KdError

    base = Path(os.path.abspath(root if root is not None else os.getcwd()))
    real_base = Path(os.path.realpath(base))
    p = Path(path)
    lexical = Path(os.path.abspath(base / p))
    if p.is_absolute() and not (lexical.is_relative_to(base) or lexical.is_relative_to(real_base)):
        return path  # named explicitly, outside the project
    if not (lexical.is_relative_to(base) or lexical.is_relative_to(real_base)):
        raise KdError(f"{path}: a relative path that leaves the project {real_base}; kd-prime will not {what} it "
                      "(write an absolute path if you mean a place outside the project)")
    real = Path(os.path.realpath(lexical))
    if real.is_relative_to(real_base):
        return path
    link = next((a for a in reversed([lexical, *lexical.parents]) if a.is_symlink()), lexical)
    shown = link.relative_to(base) if link.is_relative_to(base) else link
    raise KdError(f"{path}: resolves to {real}, outside the project {real_base} (through the symlink {shown}); "
                  f"kd-prime will not {what} it: remove the link (`rm {shown}`) and re-run")


def check_layout(root=".") -> None:
    """Before any stage runs: no output, work or lock location of the project is a symlink, or holds one, that
    leads outside it (a cloned repository can plant them); a stage output that is itself a symlink is refused even
    when it points inside (DVC would take the target's files into its cache). One KdError line naming the link."""
    import os

    from kd.core.errors import KdError
    from kd.harness.dvc_project import output_prefixes

    root = Path(root)
    for rel in sorted(set(output_prefixes(root)) | {f"{WORK_DIR}/", f"{KD_TMP}/"}):
        path = root / rel.rstrip("/")
        templated = rel.endswith("/") and rel.rstrip("/") not in (str(WORK_DIR), str(KD_TMP))
        guard(path, root)
        if path.is_symlink() and rel != "dvc.lock":
            raise KdError(f"{rel.rstrip('/')}: is a symlink (to {os.readlink(path)}); a stage output, work or lock "
                          "location must be a real file or folder in the project: remove the link and re-run")
        if not path.is_dir():
            continue
        for dirpath, dirs, files in os.walk(path):
            for name in dirs + files:
                q = Path(dirpath) / name
                if not q.is_symlink():
                    continue
                guard(q, root)
                if templated and q.parent == path:  # data/teacher/<s>, models/kd-<s>: an output itself
                    raise KdError(f"{q.relative_to(root)}: is a symlink (to {os.readlink(q)}); a stage output must "
                                  "be a real file or folder in the project: remove the link and re-run")

"""The code-deps check: every kd module a stage script imports (transitively, by its AST) must be a declared dep of
that stage in dvc.yaml, and every declared kd/*.py must be imported."""

from __future__ import annotations

import re
from dataclasses import dataclass
from pathlib import Path

import yaml

# kd modules a stage may import without declaring them: shared plumbing that validates input or writes files the same
# way for every stage. Declaring them everywhere would make any edit to them re-run the whole (hours-long) pipeline;
# their behaviour is pinned by the unit tests and by `kd verify`'s two-run comparison instead.
# kd/core/names.py only accepts or refuses a name (it never changes an output), like params.py's validation.
CODE_DEPS_OK = {"kd/__init__.py", "kd/core/errors.py", "kd/core/io.py", "kd/config/params.py", "kd/core/entry.py", "kd/core/names.py",
                "kd/core/guard.py"}
# Per stage: modules its imports reach that cannot change its output (module -> why). Empty: every stage declares
# exactly what it imports.
STAGE_CODE_DEPS_OK: dict[str, dict[str, str]] = {}


def _imports(path: Path, root: Path) -> set[str]:
    """kd modules (as repo-relative .py paths) that `path` imports anywhere (top level or inside functions)."""
    import ast

    tree = ast.parse(path.read_text(encoding="utf-8"), filename=str(path))
    found: set[str] = set()

    def add(module: str) -> None:
        parts = module.split(".")
        if parts[0] != "kd":
            return
        for i in range(2, len(parts) + 1):  # kd.tasks.x -> kd/eval/tasks/x.py or kd/eval/tasks/__init__.py
            f = root.joinpath(*parts[:i]).with_suffix(".py")
            if f.exists():
                found.add(str(f.relative_to(root)))

    for node in ast.walk(tree):
        if isinstance(node, ast.Import):
            for a in node.names:
                add(a.name)
        elif isinstance(node, ast.ImportFrom) and node.module and node.level == 0:
            add(node.module)
            for a in node.names:
                add(f"{node.module}.{a.name}")
    return found


def stage_imports(script: Path, root: Path) -> set[str]:
    """The kd modules a stage script reaches, following imports transitively but not through CODE_DEPS_OK."""
    seen: set[str] = set()
    todo = [script]
    while todo:
        for mod in _imports(todo.pop(), root):
            if mod not in seen:
                seen.add(mod)
                if mod not in CODE_DEPS_OK:
                    todo.append(root / mod)
    return seen


@dataclass
class CodeDepRow:
    stage: str
    script: str
    missing: list[str]      # imported, not declared
    unused: list[str]       # declared kd/*.py that the script never imports


def check_code_deps(root: Path) -> list[CodeDepRow]:
    """For each stage of dvc.yaml: its script's transitive kd imports vs. the .py deps it declares."""
    data = yaml.safe_load((root / "dvc.yaml").read_text(encoding="utf-8"))
    rows = []
    for name, stage in data["stages"].items():
        body = stage.get("do", stage)
        m = re.match(r"python -m (stages\.\w+)", body["cmd"])
        if not m:
            continue
        script = m.group(1).replace(".", "/") + ".py"
        deps = {d for d in body.get("deps", []) if isinstance(d, str)}
        imported = stage_imports(root / script, root)
        missing = sorted(imported - deps - CODE_DEPS_OK - set(STAGE_CODE_DEPS_OK.get(name, {})))
        unused = sorted(d for d in deps if d.startswith("kd/") and d.endswith(".py") and d not in imported)
        if script not in deps:
            missing.insert(0, script)
        rows.append(CodeDepRow(name, script, missing, unused))
    return rows


_STAGE = re.compile(r"^  (\w+):\s*$")
_CMD = re.compile(r"^\s+cmd: python -m (stages\.\w+)")
_KD_DEP = re.compile(r"^(\s+)- (kd/\S+\.py)\b")


def generated_dvc_yaml(root: Path) -> str:
    """dvc.yaml with each stage's kd/*.py deps replaced by its script's import closure (sorted, right after the
    script's own `- stages/<x>.py` line). Deps in CODE_DEPS_OK that a stage declares by hand stay, as do all
    non-Python deps (task YAML, data, models)."""
    lines = (root / "dvc.yaml").read_text(encoding="utf-8").split("\n")
    scripts: dict[str, str] = {}  # stage -> stages/<x>.py, from its cmd
    stage = None
    for line in lines:
        if m := _STAGE.match(line):
            stage = m.group(1)
        elif stage and (m := _CMD.match(line)):
            scripts[stage] = m.group(1).replace(".", "/") + ".py"
    out, stage = [], None
    for line in lines:
        if m := _STAGE.match(line):
            stage = m.group(1)
        dep = _KD_DEP.match(line)
        if dep and dep.group(2) not in CODE_DEPS_OK:
            continue  # regenerated below
        out.append(line)
        script = scripts.get(stage or "")
        if script and line.strip() == f"- {script}":
            indent = line[: len(line) - len(line.lstrip())]
            closure = stage_imports(root / script, root) - CODE_DEPS_OK - set(STAGE_CODE_DEPS_OK.get(stage, {}))
            out += [f"{indent}- {mod}" for mod in sorted(closure)]
    return "\n".join(out)


def stale_code_deps(root: Path) -> bool:
    """True when dvc.yaml's kd code deps differ from what `kd code-deps` would write."""
    return generated_dvc_yaml(root) != (root / "dvc.yaml").read_text(encoding="utf-8")

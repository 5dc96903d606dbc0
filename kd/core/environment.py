"""The environment in the lineage: what a stage's outputs depend on beyond params and code.

Model math on a CPU depends on the kernels the math libraries pick at run time (oneDNN, MKL, ATen dispatch by
ISA: AVX2 / AVX-512 / AVX512-BF16 / AMX), on the thread count (reduction order) and on the package versions.
Each model stage writes `environment/<stage>.json` (a cache: false output of its own, so a machine that
changes only this file does not re-run the stages downstream); the report reads them all, writes the headline
`metrics/environment.json` (the fingerprint, so `dvc metrics diff` between two machines shows that they differed)
and a table. Everything here is a property of the machine and installation, never of the run: no time,
host name, PID or path, so two runs on one machine write the same bytes.
"""

from __future__ import annotations

import hashlib
import json
import os
import platform
import re
from importlib import metadata
from pathlib import Path

ENV_DIR = Path("environment")
HEADLINE = Path("metrics/environment.json")

# CPU flags that decide which matmul / vector kernels run (the rest of /proc/cpuinfo's flags do not).
_ISA = re.compile(r"^(sse4_2|avx|avx2|fma|f16c|avx_vnni.*|avx512.*|amx.*)$")
PACKAGES = ("torch", "transformers", "peft", "lm_eval", "dvc", "accelerate", "safetensors", "tokenizers", "numpy")
# Variables that change kernels or threading. PYTHONHASHSEED is not here: it changes no number (kd verify runs
# with two different ones), and CUBLAS_WORKSPACE_CONFIG is set by kd.core.seeding itself.
_ENV_VARS = re.compile(r"^(ONEDNN_.*|DNNL_.*|MKL_.*|OMP_.*|KMP_.*|ATEN_CPU_CAPABILITY|TORCH_.*|CUDA_VISIBLE_DEVICES"
                       r"|KD_.*)$")
# installer inputs (the installed torch is recorded instead), and a flag a library sets inside the process
_ENV_SKIP = {"KD_TORCH", "KD_TORCH_INDEX", "KMP_DUPLICATE_LIB_OK"}


def _cpu() -> dict:
    model, flags = platform.processor() or "unknown", set()
    try:
        text = Path("/proc/cpuinfo").read_text(encoding="utf-8", errors="replace")
    except OSError:
        text = ""
    for line in text.splitlines():
        key, _, value = line.partition(":")
        key = key.strip()
        if key == "model name" and model in ("unknown", "x86_64", ""):
            model = value.strip()
        elif key in ("flags", "Features") and not flags:
            flags = set(value.split())
    return {"model": model, "machine": platform.machine(), "isa": sorted(f for f in flags if _ISA.match(f))}


def _version(dist: str) -> str | None:
    try:
        return metadata.version(dist.replace("_", "-"))
    except metadata.PackageNotFoundError:
        return None


def _torch() -> dict:
    import torch

    config = torch.__config__.show()
    mkl = re.search(r"Math Kernel Library Version ([\w.\-]+)", config)
    dnnl = re.search(r"MKL-DNN v([\w.\-]+)", config)
    out = {
        "cpu_capability": torch.backends.cpu.get_cpu_capability(),  # the ATen kernels dispatched (AVX2, AVX512, ...)
        "threads": torch.get_num_threads(),
        "interop_threads": torch.get_num_interop_threads(),
        "mkldnn": bool(torch.backends.mkldnn.is_available() and torch.backends.mkldnn.enabled),
        "onednn_version": dnnl.group(1) if dnnl else None,
        "mkl_version": mkl.group(1) if mkl else None,
        "cuda": torch.version.cuda,
    }
    if torch.cuda.is_available():
        out["gpus"] = sorted(torch.cuda.get_device_name(i) for i in range(torch.cuda.device_count()))
    return out


def fingerprint_of(env: dict) -> str:
    body = {k: v for k, v in env.items() if k != "fingerprint"}
    return hashlib.sha256(json.dumps(body, sort_keys=True).encode()).hexdigest()[:12]


def collect() -> dict:
    """This process's environment, as it affects model math. Call it after torch is set up (threads, seeds)."""
    env = {
        "cpu": _cpu(),
        "python": platform.python_version(),
        "packages": {p: _version(p) for p in PACKAGES},
        "torch": _torch(),
        "env_vars": {k: v for k, v in sorted(os.environ.items()) if _ENV_VARS.match(k) and k not in _ENV_SKIP},
    }
    env["fingerprint"] = fingerprint_of(env)
    return env


def record_environment(stage: str, root: str | os.PathLike = ".") -> dict:
    """Write environment/<stage>.json (stage names use '-' for DVC's '@': teacher-none, eval-student)."""
    from kd.core.io import write_json

    env = {"stage": stage, **collect()}
    write_json(Path(root) / ENV_DIR / f"{stage}.json", env)
    return env


def load_environments(root: str | os.PathLike = ".") -> dict[str, dict]:
    """Every recorded stage environment under root, by stage name."""
    d = Path(root) / ENV_DIR
    return {p.stem: json.loads(p.read_text(encoding="utf-8")) for p in sorted(d.glob("*.json"))} if d.is_dir() else {}


def isa_summary(isa: list[str]) -> str:
    """The widest matmul path a CPU offers: what decides bf16 kernels (AMX > AVX512-BF16 > AVX-512 > AVX2)."""
    s = set(isa)
    for flag, name in (("amx_bf16", "AMX"), ("avx512_bf16", "AVX512_BF16"), ("avx512f", "AVX512"), ("avx2", "AVX2")):
        if flag in s:
            return name
    return "pre-AVX2"


def headline(envs: dict[str, dict]) -> dict:
    """metrics/environment.json: the one key `dvc metrics diff` needs to show that two runs ran in different
    environments (`mixed` where the stages did); the report's environment table has the rest."""
    if not envs:
        return {"fingerprint": "none recorded"}
    fps = sorted({e["fingerprint"] for e in envs.values()})
    return {"fingerprint": fps[0] if len(fps) == 1 else "mixed"}


def write_headline(root: str | os.PathLike = ".") -> dict:
    from kd.core.io import write_json

    h = headline(load_environments(root))
    write_json(Path(root) / HEADLINE, h)
    return h


def render_table(envs: dict[str, dict]) -> str:
    """Markdown: one row per distinct environment, with the stages that ran in it (for the report)."""
    groups: dict[str, list[str]] = {}
    for stage, e in sorted(envs.items()):
        groups.setdefault(e["fingerprint"], []).append(stage)
    rows = ["| fingerprint | CPU | ISA (widest matmul path) | ATen kernels | threads | torch | transformers | peft "
            "| lm-eval | oneDNN / MKL | settings | stages |", "|" + "---|" * 12]
    for fp, stages in groups.items():
        e = envs[stages[0]]
        t, pk = e["torch"], e["packages"]
        settings = ", ".join(f"{k}={v}" for k, v in e["env_vars"].items()) or "defaults"
        rows.append(f"| `{fp}` | {e['cpu']['model']} | {isa_summary(e['cpu']['isa'])} | {t['cpu_capability']} | "
                    f"{t['threads']} | {pk['torch']} | {pk['transformers']} | {pk['peft']} | {pk['lm_eval']} | "
                    f"{t['onednn_version']} / {t['mkl_version']} | {settings} | {', '.join(stages)} |")
    if len(groups) > 1:
        rows.append("\nThe stages ran in different environments: bit-identical re-runs need the same fingerprint.")
    return "\n".join(rows) + "\n"

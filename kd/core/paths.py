"""Where things live in the project, named once."""

from pathlib import Path

# the checkout kd-prime runs from (stages/, dvc.yaml, tests/ beside kd/): kd/core/paths.py is two folders below it
SOURCE_ROOT = Path(__file__).resolve().parents[2]
GSM8K_TASK = SOURCE_ROOT / "kd" / "eval" / "tasks" / "gsm8k_kd.yaml"  # the lm-eval task, with kd's answer parsing
SELECTION_DIR = Path("selection")  # selection/<profile>.json: the measured choices behind a profile (kd select)
ATTENTION_DIR = Path("reports/attention")  # reports/attention/<arm>.json: per-layer attention statistics of a student arm

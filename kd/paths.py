"""Where things live in the project, named once."""

from pathlib import Path

SELECTION_DIR = Path("selection")  # selection/<profile>.json: the measured choices behind a profile (kd select)
ATTENTION_DIR = Path("reports/attention")  # reports/attention/<arm>.json: per-layer attention statistics of a student arm

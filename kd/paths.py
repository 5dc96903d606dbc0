"""Where things live in the project, named once."""

from pathlib import Path

SELECTION_DIR = Path("selection")  # selection/<profile>.json: the measured choices behind a profile (kd select)

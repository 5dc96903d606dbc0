import os
import sys
from pathlib import Path

import pytest

ROOT = Path(__file__).resolve().parents[1]
sys.path.insert(0, str(ROOT))
os.environ.setdefault("HF_HUB_OFFLINE", "1")
os.environ.setdefault("TOKENIZERS_PARALLELISM", "false")


@pytest.fixture(scope="session")
def tiny_models(tmp_path_factory):
    """Tiny random teacher and student folders (built once per test session)."""
    from kd.models.tiny import save_tiny

    root = tmp_path_factory.mktemp("tiny")
    save_tiny("tiny-teacher", root / "teacher")
    save_tiny("tiny-student", root / "student")
    return root

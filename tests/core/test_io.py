"""kd.core.io: a full disk while a writer that is not Python's own (safetensors' Rust serializer) writes an output is
the same one-line error as anywhere else, naming the file; the previous version stays."""

from __future__ import annotations

import subprocess
import sys

CHILD = """
import resource, signal, sys, torch
from kd.core.io import save_safetensors
from kd.core.entry import handle
signal.signal(signal.SIGXFSZ, signal.SIG_IGN)  # a file-size limit standing in for a full disk: EFBIG, not a kill
resource.setrlimit(resource.RLIMIT_FSIZE, (4096, 4096))
handle(lambda: save_safetensors({"w": torch.zeros(4096)}, sys.argv[1]))
"""


def test_full_disk_inside_safetensors_is_one_clear_line(tmp_path):
    out = tmp_path / "shard.safetensors"
    out.write_bytes(b"previous")
    res = subprocess.run([sys.executable, "-c", CHILD, str(out)], capture_output=True, text=True, cwd=tmp_path)
    lines = res.stderr.strip().splitlines()
    assert res.returncode == 2 and len(lines) == 1, res.stderr
    assert lines[0].startswith(f"error: {out}: could not write it (File too large)") and "disk is full" in lines[0]
    assert out.read_bytes() == b"previous" and [p.name for p in tmp_path.iterdir()] == ["shard.safetensors"]

"""The README's first command works: the demo runs end to end (real components)."""

import os
import subprocess
import sys
from pathlib import Path

import pytest

TOP = Path(__file__).resolve().parents[2]


@pytest.mark.e2e
def test_demo_runs_with_zero_layer_downloads():
    if os.geteuid() != 0:
        pytest.skip("the demo needs root")
    res = subprocess.run([sys.executable, str(TOP / "demo" / "demo.py")], capture_output=True, text=True,
                         timeout=600)
    assert res.returncode == 0, res.stdout[-4000:] + res.stderr[-4000:]
    assert "cvmfs-snapshotter: 0 layer downloads" in res.stdout
    assert "deleted file stays deleted" in res.stdout
    assert "podman run: 'keep'" in res.stdout or "podman not installed" in res.stdout

"""The README's first command works: the demo runs end to end (real components)."""

import os
import re
import subprocess
import sys
from pathlib import Path

import pytest

TOP = Path(__file__).resolve().parents[2]


@pytest.mark.e2e
def test_demo_runs_with_zero_layer_downloads():  # and prints its table
    if os.geteuid() != 0:
        pytest.skip("the demo needs root")
    res = subprocess.run([sys.executable, str(TOP / "demo" / "demo.py")], capture_output=True, text=True,
                         timeout=600)
    assert res.returncode == 0, res.stdout[-4000:] + res.stderr[-4000:]
    out = res.stdout
    # the summary table: the repository side downloads no layer, the plain side all of them
    assert re.search(r"^cvmfs-snapshotter +0 of (\d+) +0 B +[\d.]+ s$", out, re.M), out[-2000:]
    n = re.search(r"^cvmfs-snapshotter +0 of (\d+)", out, re.M).group(1)
    assert re.search(rf"^plain overlayfs +{n} of {n} +[\d.]+ MB +[\d.]+ s$", out, re.M), out[-2000:]
    assert re.search(r"^ratio +[\d.]+x faster$", out, re.M), out[-2000:]
    assert "deleted file stays deleted" in out
    assert "podman run: 'keep'" in out or "podman not installed" in out
    assert "apptainer exec apptainer:v1: FOO=bar baz PATH=/opt/tool/bin:/usr/bin:/bin" in out \
        or "apptainer not installed" in out

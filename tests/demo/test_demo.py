"""The README's first command works: the demo runs end to end (real components)."""

import os
import re
import shutil
import subprocess
import sys
from pathlib import Path

import pytest

TOP = Path(__file__).resolve().parents[2]

pytestmark = pytest.mark.e2e


@pytest.fixture(scope="module")
def demo_output() -> str:
    """One run of demo/demo.py for the checks below."""
    if os.geteuid() != 0:
        pytest.skip("the demo needs root")
    res = subprocess.run([sys.executable, str(TOP / "demo" / "demo.py")], capture_output=True, text=True,
                         timeout=600)
    assert res.returncode == 0, res.stdout[-4000:] + res.stderr[-4000:]
    return res.stdout


def test_demo_runs_with_zero_layer_downloads(demo_output):  # and prints its table
    out = demo_output
    # the summary table: the repository side downloads no layer, the plain side all of them
    assert re.search(r"^cvmfs-snapshotter +0 of (\d+) +0 B +[\d.]+ s$", out, re.M), out[-2000:]
    n = re.search(r"^cvmfs-snapshotter +0 of (\d+)", out, re.M).group(1)
    assert re.search(rf"^plain overlayfs +{n} of {n} +[\d.]+ MB +[\d.]+ s$", out, re.M), out[-2000:]
    assert re.search(r"^ratio +[\d.]+x faster$", out, re.M), out[-2000:]
    assert "deleted file stays deleted" in out


def test_demo_podman_runs_from_the_repository(demo_output):
    if shutil.which("podman") is None:
        pytest.skip("podman is not installed: the demo skipped its podman half")
    assert "podman run: 'keep'" in demo_output, demo_output[-2000:]


def test_demo_apptainer_runs_the_flat_link(demo_output):
    if shutil.which("apptainer") is None:
        pytest.skip("apptainer is not installed: the demo skipped its apptainer half")
    assert "apptainer exec apptainer:v1: FOO=bar baz PATH=/opt/tool/bin:/usr/bin:/bin" in demo_output, \
        demo_output[-2000:]

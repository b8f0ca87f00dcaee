"""The systemd units pass `systemd-analyze verify` and keep containerd's view of our paths."""

import configparser
import shutil
import subprocess
import sys
from pathlib import Path

import pytest

UNITS = Path(__file__).resolve().parents[2] / "systemd"
VENV_BIN = Path(sys.executable).parent


def _unit(name: str) -> configparser.ConfigParser:
    cp = configparser.ConfigParser(strict=False, interpolation=None)
    cp.optionxform = str
    cp.read(UNITS / name)
    return cp


@pytest.mark.parametrize("name", ["cvmfs-snapshotter.service", "cvmfs-publisher.service"])
def test_systemd_analyze_verify(name, tmp_path):
    if shutil.which("systemd-analyze") is None:
        pytest.skip("systemd-analyze not installed")
    # Point ExecStart at this venv so verify can check the binary exists.
    text = (UNITS / name).read_text().replace("/opt/cvmfs-images/.venv/bin", str(VENV_BIN))
    unit = tmp_path / name
    unit.write_text(text)
    res = subprocess.run(["systemd-analyze", "verify", str(unit)], capture_output=True, text=True)
    problems = [line for line in (res.stdout + res.stderr).splitlines() if name in line or "error" in line.lower()]
    assert res.returncode == 0 and not problems, res.stdout + res.stderr


def test_snapshotter_unit_keeps_paths_valid_for_containerd():
    svc = _unit("cvmfs-snapshotter.service")
    assert "containerd.service" in svc["Unit"]["Before"]
    assert svc["Service"].get("PrivateTmp", "no") == "no"
    assert svc["Service"].get("PrivateMounts", "no") == "no"
    assert "ProtectSystem" not in svc["Service"]
    assert svc["Service"]["RuntimeDirectory"] == "containerd-cvmfs-grpc"
    assert "/tmp" not in svc["Service"]["ExecStart"]


def test_publisher_unit_runs_loop_outside_cvmfs():
    svc = _unit("cvmfs-publisher.service")
    assert " loop " in svc["Service"]["ExecStart"]
    assert not svc["Service"]["WorkingDirectory"].startswith("/cvmfs")


def test_snapshotter_unit_waits_for_readiness():
    # Type=notify: systemd starts containerd only after READY=1 (sent once the socket listens,
    # tests/snapshotter/test_sdnotify.py), from the main process.
    svc = _unit("cvmfs-snapshotter.service")
    assert svc["Service"]["Type"] == "notify"
    assert svc["Service"].get("NotifyAccess", "main") == "main"


def test_publisher_unit_shows_listen_and_metrics():
    text = (UNITS / "cvmfs-publisher.service").read_text()
    commented = [line for line in text.splitlines() if line.startswith("#")]
    assert any("--listen" in line for line in commented)
    assert any("--metrics-address" in line for line in commented)


def test_publisher_unit_leaves_the_cvmfs_client_alone_on_stop():
    # The client's cvmfs2 that publish remounts runs in the unit's group; a stop that signals
    # it leaves /cvmfs/REPO dead (tests/cvmfs/test_operations.py builds that state).
    svc = _unit("cvmfs-publisher.service")
    assert svc["Service"]["KillMode"] == "process"

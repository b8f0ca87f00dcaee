"""containerd 1.6's own snapshotter test suite (snapshots/testsuite), run against
cvmfs-snapshotter through containerd's gRPC proxy client. See suite_test.go.

The Go test binary is built offline from Debian's golang-*-dev packages in GOPATH mode
and cached under build/containerd_testsuite/ (keyed by the harness, Go and the
containerd sources' versions). Not optional: only a non-root run skips."""
from __future__ import annotations

import os
import shutil
import subprocess

import pytest

from tests.fixtures.snapshotter import snapshotter_command

from .gosuite import BUILD, build_suite, failure_report, parse_results

# Builds and runs containerd's own code against a real snapshotter process.
pytestmark = pytest.mark.real


@pytest.mark.timeout(1800)
def test_containerd_snapshotter_suite():
    if os.geteuid() != 0:
        pytest.skip("containerd's snapshotter suite mounts overlays: needs root")
    binary = build_suite()
    env = dict(os.environ)
    env["CVMFS_SNAPSHOTTER_CMD"] = " ".join(snapshotter_command() + ["serve"])
    log = BUILD / "last-run.log"
    logdir = BUILD / "snapshotter-logs"
    shutil.rmtree(logdir, ignore_errors=True)
    logdir.mkdir(parents=True)
    env["CVMFS_SNAPSHOTTER_LOGDIR"] = str(logdir)
    res = subprocess.run([str(binary), "-test.v", "-test.parallel", "2", "-test.timeout", "25m"],
                         env=env, capture_output=True, text=True, timeout=1700,
                         stdin=subprocess.DEVNULL)
    output = res.stdout + res.stderr
    log.write_text(output)
    results = parse_results(output)
    subtests = {k: v for k, v in results.items() if "/" in k}
    failed = sorted(k for k, v in subtests.items() if v == "FAIL")
    assert subtests, f"no subtest ran (exit {res.returncode}); output:\n{output[-5000:]}"
    assert not failed and res.returncode == 0, (
        f"{len(failed)} of {len(subtests)} subtests failed (full log: {log}):\n"
        + failure_report(output, failed) + ("" if failed else output[-5000:]))
    assert len(subtests) >= 21, f"containerd 1.6's suite has 21 subtests; ran {sorted(subtests)}"
    # Upstream skips Rename unconditionally (snapshots/testsuite/issues.go); nothing else.
    assert {k for k, v in subtests.items() if v == "SKIP"} <= {"TestCvmfsSnapshotter/Rename"}

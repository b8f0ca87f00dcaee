"""containerd's own snapshotter test suite of the release in each root fs (1.7 on trixie, 2.1 on
sid; Debian's golang-github-containerd-containerd-dev) against cvmfs-snapshotter through
containerd's proxy client. The harness is tests/containerd_testsuite/suite_test.go, with the
import paths of containerd 2.x's module where needed; built offline in GOPATH mode inside the
container and cached on the host (build/runtimes_suite/, keyed by harness and root fs).

containerd 2.3 is not in Debian: its suite is built from the v2.3.4 source tree with its
vendored modules ($CVMFS_TEST_CONTAINERD_SRC, or build/containerd-v2.3.4-src), the harness
placed inside that module, with sid's Go (2.3 needs Go >= 1.26)."""
from __future__ import annotations

import hashlib
import os
import shutil
from pathlib import Path

import pytest

from tests.containerd_testsuite.gosuite import failure_report, parse_results

from .stack import RUNTIMES, Runtime

pytestmark = [pytest.mark.e2e, pytest.mark.runtimes]

REPO = Path(__file__).resolve().parents[2]
HARNESS = REPO / "tests" / "containerd_testsuite" / "suite_test.go"
CACHE = REPO / "build" / "runtimes_suite"
CONTAINERD23_SRC = Path(os.environ.get("CVMFS_TEST_CONTAINERD_SRC", REPO / "build" / "containerd-v2.3.4-src"))
# containerd 2.x moved the packages into its /v2 module and the logger into containerd/log.
V2_IMPORTS = {
    '"github.com/containerd/containerd/log"': '"github.com/containerd/log"',
    '"github.com/containerd/containerd/snapshots"': '"github.com/containerd/containerd/v2/core/snapshots"',
    '"github.com/containerd/containerd/snapshots/proxy"': '"github.com/containerd/containerd/v2/core/snapshots/proxy"',
    '"github.com/containerd/containerd/snapshots/testsuite"':
        '"github.com/containerd/containerd/v2/core/snapshots/testsuite"',
}
# 1.7 skips Rename unconditionally ("still fails on some kernels with overlay"); 2.x runs it.
ALLOWED_SKIPS = {"TestCvmfsSnapshotter/Rename"}


def harness_source(rt: Runtime) -> str:
    text = HARNESS.read_text()
    if rt.major >= 2:
        for old, new in V2_IMPORTS.items():
            assert old in text, f"{HARNESS.name} no longer imports {old}"
            text = text.replace(old, new)
    return text


@pytest.mark.timeout(1800)
@pytest.mark.parametrize("rt", RUNTIMES, ids=lambda r: r.id)
def test_containerd_snapshotter_suite(rt, rootfs_factory):
    source = harness_source(rt)
    CACHE.mkdir(parents=True, exist_ok=True)
    if rt.tarball and not (CONTAINERD23_SRC / "core/snapshots/testsuite/testsuite.go").is_file():
        pytest.skip(f"containerd {rt.containerd}'s suite needs its source tree with vendor/ "
                    f"($CVMFS_TEST_CONTAINERD_SRC or {CONTAINERD23_SRC}): not in Debian")
    c = rootfs_factory(rt.spec, binds=[(str(CACHE), "/cache", False)])
    key = hashlib.sha256(source.encode() + c.rootfs.name.encode() + rt.id.encode()).hexdigest()[:16]
    binary = f"/cache/{rt.id}-{key}.test"
    if not (CACHE / Path(binary).name).exists():
        if rt.tarball:  # inside the release's own module, with its vendored dependencies
            shutil.copytree(CONTAINERD23_SRC, c.host_w / "csrc", symlinks=True)
            (c.host_w / "csrc/cvmfssuite").mkdir()
            (c.host_w / "csrc/cvmfssuite/suite_test.go").write_text(source)
            build = ("cd /w/csrc/cvmfssuite && GOFLAGS=-mod=vendor GOTOOLCHAIN=local GOCACHE=/w/gocache "
                     f"go test -c -o {binary}.tmp .")
        else:
            (c.host_w / "gopath/src/cvmfssuite").mkdir(parents=True)
            (c.host_w / "gopath/src/cvmfssuite/suite_test.go").write_text(source)
            build = ("cd /w/gopath/src/cvmfssuite && GO111MODULE=off GOPATH=/w/gopath:/usr/share/gocode "
                     f"GOCACHE=/w/gocache GOFLAGS= go test -c -o {binary}.tmp .")
        c.exec(f"rm -f /cache/{rt.id}-*.test; {build} && mv {binary}.tmp {binary}", timeout=1500)
    res = c.exec(f"mkdir -p /w/sn-logs && {binary} -test.v -test.parallel 2 -test.timeout 25m",
                 env={"CVMFS_SNAPSHOTTER_CMD": "/opt/venv/bin/python -m snapshotter serve",
                      "CVMFS_SNAPSHOTTER_LOGDIR": "/w/sn-logs", "TMPDIR": "/w",
                      # Rename: overlayfs's exemption (a lower dir cannot be renamed), see the harness
                      "CVMFS_SUITE_NAME": "overlayfs"},
                 check=False, timeout=1700)
    output = res.stdout + res.stderr
    (CACHE / f"last-run-{rt.id}.log").write_text(output)
    results = parse_results(output)
    subtests = {k: v for k, v in results.items() if "/" in k}
    failed = sorted(k for k, v in subtests.items() if v == "FAIL")
    assert subtests, f"no subtest ran (exit {res.returncode}); output:\n{output[-5000:]}"
    # failure_report reads the snapshotter logs by their path inside the container (/w/...).
    report = failure_report(output.replace("/w/sn-logs/", f"{c.host_w}/sn-logs/"), failed)
    assert not failed and res.returncode == 0, (
        f"{len(failed)} of {len(subtests)} subtests failed on containerd {rt.containerd}:\n" + report
        + ("" if failed else output[-5000:]))
    assert len(subtests) >= 21, f"ran only {sorted(subtests)}"
    assert {k for k, v in subtests.items() if v == "SKIP"} <= ALLOWED_SKIPS

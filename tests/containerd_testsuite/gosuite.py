"""Building and reading containerd 1.6's own snapshotter test suite (snapshots/testsuite):
the Go test binary, built offline from Debian's golang-*-dev packages in GOPATH mode and
cached under build/containerd_testsuite/, and its verbose output parsed per subtest."""
from __future__ import annotations

import hashlib
import os
import re
import shutil
import subprocess
from pathlib import Path

import pytest

HERE = Path(__file__).resolve().parent
REPO = HERE.parents[1]
BUILD = REPO / "build" / "containerd_testsuite"
GOCODE = Path("/usr/share/gocode")
CONTAINERD_SRC = GOCODE / "src/github.com/containerd/containerd"
# Debian packages the build needs (the rest come in as their dependencies).
GO_PACKAGES = "golang-go golang-github-containerd-containerd-dev golang-github-gotestyourself-gotest.tools-dev"


def _go_env(gopath: Path) -> dict[str, str]:
    env = dict(os.environ)
    env.update(GO111MODULE="off", GOPATH=f"{gopath}:{GOCODE}", GOCACHE=str(BUILD / "gocache"),
               GOFLAGS="", CGO_ENABLED=env.get("CGO_ENABLED", "1"))
    return env


def _cache_key() -> str:
    h = hashlib.sha256((HERE / "suite_test.go").read_bytes())
    h.update(subprocess.run(["go", "version"], capture_output=True, text=True).stdout.encode())
    h.update((CONTAINERD_SRC / "snapshots/testsuite/testsuite.go").read_bytes())
    h.update((CONTAINERD_SRC / "snapshots/proxy/proxy.go").read_bytes())
    return h.hexdigest()[:16]


def build_suite() -> Path:
    """The compiled test binary (built once per harness/toolchain version)."""
    if shutil.which("go") is None or not CONTAINERD_SRC.is_dir():
        pytest.fail(f"cannot build containerd's snapshotter suite: install {GO_PACKAGES}")
    binary = BUILD / f"cvmfssuite-{_cache_key()}.test"
    if binary.exists():
        return binary
    for stale in BUILD.glob("cvmfssuite-*.test"):
        stale.unlink()
    gopath = BUILD / "gopath"
    pkg = gopath / "src" / "cvmfssuite"
    pkg.mkdir(parents=True, exist_ok=True)
    shutil.copy2(HERE / "suite_test.go", pkg / "suite_test.go")
    res = subprocess.run(["go", "test", "-c", "-o", str(binary), "."], cwd=pkg,
                         env=_go_env(gopath), capture_output=True, text=True, timeout=900)
    if res.returncode != 0:
        pytest.fail(f"go test -c failed (Debian packages needed: {GO_PACKAGES}):\n"
                    f"{res.stdout}\n{res.stderr}")
    return binary


_RESULT = re.compile(r"^\s*--- (PASS|FAIL|SKIP): (\S+) \(")


def parse_results(output: str) -> dict[str, str]:
    """{"TestCvmfsSnapshotter/Basic": "PASS", …} from `-test.v` output."""
    return {m[2]: m[1] for m in map(_RESULT.match, output.splitlines()) if m}


_MARKER = re.compile(r"^\s*(?:=== (?:RUN|CONT|PAUSE|NAME)\s+|--- (?:PASS|FAIL|SKIP): )(\S+)")
_LOGPATH = re.compile(r"cvmfs-snapshotter log: (\S+?)\"?(?:\s|$)")


def sections(output: str) -> dict[str, list[str]]:
    """Output lines grouped by the (sub)test `go test -v` said they belong to."""
    out: dict[str, list[str]] = {}
    current = ""
    for line in output.splitlines():
        m = _MARKER.match(line)
        if m:
            current = m[1]
        out.setdefault(current, []).append(line)
    return out


def failure_report(output: str, failed: list[str], log_limit: int = 2500) -> str:
    """Per failed subtest: what the suite printed, and the tail of its snapshotter's log."""
    by_test = sections(output)
    parts = []
    for name in failed:
        lines = by_test.get(name, [])
        text = "\n".join(lines)
        logs = ""
        for path in dict.fromkeys(_LOGPATH.findall(text)):
            try:
                content = Path(path).read_text(errors="replace")
            except OSError:
                continue
            logs += f"\n  [snapshotter log {path}, tail]\n" + content[-log_limit:]
        parts.append(f"=== {name}\n{text[-6000:]}{logs}")
    return "\n\n".join(parts)


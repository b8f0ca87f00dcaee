"""Helpers shared by the snapshotter benches: the machine line, percentiles, work dirs,
and the real components from tests/fixtures (registry, containerd, cvmfs-snapshotter).

Import after `sys.path.insert(0, REPO)`; every bench script does that first."""
from __future__ import annotations

import os
import platform
import subprocess
import sys
from contextlib import contextmanager
from pathlib import Path
from typing import Iterator, Sequence

REPO = Path(__file__).resolve().parents[1]
OUT = REPO / "bench" / "out"  # cached inputs (gitignored)


def machine() -> str:
    """`nproc`, total memory (`free -g`), kernel: the line every result table notes."""
    mem_gib = os.sysconf("SC_PAGE_SIZE") * os.sysconf("SC_PHYS_PAGES") / (1 << 30)
    return f"nproc={os.cpu_count()} mem={mem_gib:.0f}GiB kernel={platform.release()} python={sys.version.split()[0]}"


def percentile(values: Sequence[float], p: float) -> float:
    """Nearest-rank percentile (p in 0..100) of a non-empty sample."""
    ordered = sorted(values)
    rank = max(1, -(-len(ordered) * p // 100))  # ceil(n * p / 100), at least 1
    return ordered[int(rank) - 1]


def fmt_ms(seconds: float) -> str:
    return f"{seconds * 1000:8.2f}"


def ratio(ours: float, base: float) -> str:
    return f"{ours / base:.2f}x" if base > 0 else "n/a"


def require_root() -> None:
    if os.geteuid() != 0:
        sys.exit("this bench needs root (real containerd, overlay mounts)")


def compiled_bytecode() -> None:
    """Measure Python processes as installed: with .pyc files. A shell that sets
    PYTHONDONTWRITEBYTECODE would otherwise make every `cvmfs-snapshotter` start compile
    the project's modules from source (~30 ms more per process)."""
    os.environ.pop("PYTHONDONTWRITEBYTECODE", None)
    packages = [str(REPO / p) for p in ("snapshotter", "cvmfs_common", "cvmfs_api", "publisher")]
    subprocess.run([sys.executable, "-m", "compileall", "-q", *packages], capture_output=True)


@contextmanager
def workdir(prefix: str, keep: bool = False) -> Iterator[Path]:
    """A short temp dir (unix socket paths are limited) unmounted and removed at the end."""
    from tests.fixtures.workdirs import new_workdir, remove_workdir

    path = new_workdir(prefix)
    try:
        yield path
    finally:
        if keep:
            print(f"kept {path}", file=sys.stderr)
        else:
            remove_workdir(path)


def drop_caches() -> None:
    """Write back dirty pages and drop the page cache (a "cold" start)."""
    os.sync()
    try:
        Path("/proc/sys/vm/drop_caches").write_text("3\n")
    except OSError:
        pass


def rss_kib(pid: int) -> int:
    """Resident set size of a process (VmRSS, KiB)."""
    for line in Path(f"/proc/{pid}/status").read_text().splitlines():
        if line.startswith("VmRSS:"):
            return int(line.split()[1])
    raise RuntimeError(f"no VmRSS for pid {pid}")


def pss_kib(pid: int) -> int:
    """Proportional set size (shared library pages split among their users), KiB."""
    for line in Path(f"/proc/{pid}/smaps_rollup").read_text().splitlines():
        if line.startswith("Pss:"):
            return int(line.split()[1])
    raise RuntimeError(f"no Pss for pid {pid}")


def run(cmd: Sequence[str], **kwargs) -> subprocess.CompletedProcess:
    res = subprocess.run(list(cmd), capture_output=True, text=True, **kwargs)
    if res.returncode != 0:
        raise RuntimeError(f"{' '.join(cmd)} failed ({res.returncode}):\n{res.stdout[-3000:]}\n{res.stderr[-3000:]}")
    return res

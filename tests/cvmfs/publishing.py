"""Publishing inside the stratum 0 and reading it back as a client does: one convert run,
and what a client mount legitimately shows differently from the image (the catalog markers,
hard links split across directories)."""
from __future__ import annotations

import time
from collections.abc import Callable

from publisher.backend.catalogs import CATALOG_MARKER
from tests.fixtures.images import BuiltImage

from .stratum0 import Repository, Stratum0

IGNORE = frozenset({"/" + CATALOG_MARKER})


def convert(s0: Stratum0, repo: Repository, wishlist: str, db: str = "/w/state/publish.db", extra: str = ""):
    """One convert run; its output also goes to /w/convert-REPO.log (kept with CVMFS_TEST_KEEP=1)."""
    log = f"/w/convert-{repo.name}.log"
    r = s0.c.exec(f"cd / && cvmfs-publisher convert {wishlist} --backend cvmfs --repository-root {repo.root} "
                  f"--state-db {db} --log-level debug {extra} >/w/convert.out 2>&1; rc=$?; "
                  f"cat /w/convert.out >>{log}; exit $rc", timeout=900, check=False)
    out = (s0.host_w / "convert.out").read_text(errors="replace")
    assert r.returncode == 0, f"convert failed ({r.returncode}), see {log}:\n{out[-8000:]}"
    r.stdout = "\n".join(line for line in out.splitlines() if " DEBUG " not in line)
    return r


def assert_check_clean(repo: Repository) -> None:
    """`cvmfs_server check` finds nothing wrong and no transaction is left open."""
    out = repo.check()
    assert not repo.in_transaction()
    assert "error" not in out.lower(), out


def split_hardlinks(img: BuiltImage, tree, problems: list[str]) -> list[str]:
    """CernVM-FS (CVMFS_IGNORE_XDIR_HARDLINKS=true) turns every hard-link group that spans
    directories into separate files; chains and flat dirs share their files' inodes with the
    layer dirs, so on a client NO hard link of an image survives: each member is a file of its
    own with the same content (the storage keeps one copy). Returns the other problems."""
    for group in img.tree.hardlinks:
        inos = [tree.inodes[p] for p in group]
        assert len(set(inos)) == len(inos), f"{sorted(group)} kept a hard link: {inos}"
        sizes = {tree.entries[p].size for p in group}
        assert len(sizes) == 1, (group, sizes)
    return [p for p in problems if not p.startswith("hardlinks broken")]


def kill9_when(s0: Stratum0, name: str, cmd: str, until: Callable[[], bool], *, group: bool = False,
               timeout: float = 300, poll: float = 0.2) -> None:
    """Run ``cmd`` in the container in the background (its output in /w/NAME.log) and kill -9
    it as soon as ``until()`` holds; ``group``: its whole process group (``cmd`` started with
    setsid), the ``cvmfs_server`` calls it is waiting on included."""
    s0.sh(f"cd / && {cmd} >/w/{name}.log 2>&1 & echo $! >/w/{name}.pid")
    end = time.monotonic() + timeout
    while not until():
        assert time.monotonic() < end, (s0.host_w / f"{name}.log").read_text(errors="replace")[-4000:]
        time.sleep(poll)
    pid = (s0.host_w / f"{name}.pid").read_text().strip()
    # (a run that ended before the kill is gone: PID 1 reaps it; the caller sees what it left)
    r = s0.sh(f"bash -c 'kill -9 -- -{pid}'" if group else f"kill -9 {pid}", check=False)
    assert r.returncode == 0 or "No such process" in r.stderr, r.stderr

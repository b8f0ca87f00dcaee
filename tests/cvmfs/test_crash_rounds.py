"""Opt-in stress: kill -9 a convert or gc at a random moment, again and again, into one
repository on the real stratum 0; the next run must repair whatever the kill left
(docs/cvmfs-backend.md, Crash recovery). CVMFS_CRASH_ROUNDS=N runs N rounds; each prints
where its kill landed (the `cvmfs_server` subcommands running just before it)."""
from __future__ import annotations

import collections
import os
import random
import signal
import time
from collections.abc import Callable, Iterator
from pathlib import Path

import pytest

from cvmfs_common.repo.paths import RepositoryLayout
from tests.fixtures.images import BuiltImage, StandardImages
from tests.publisher.clirun import write_wishlist

from .conftest import running_stratum0
from .stratum0 import Stratum0
from .test_operations import assert_recovered

ROUNDS = int(os.environ.get("CVMFS_CRASH_ROUNDS") or 0)

pytestmark = [pytest.mark.e2e, pytest.mark.timeout(300 + 60 * ROUNDS), pytest.mark.skipif(
    ROUNDS <= 0, reason="opt-in stress run: set CVMFS_CRASH_ROUNDS=N (N kill -9 rounds of ~5 s each)")]

NAME = "unpacked.crashrounds.test"
DB = f"/w/state/{NAME}.db"
WISHLIST = f"/w/{NAME}.yaml"
CONVERT = f"convert {WISHLIST} --backend cvmfs --repository-root /cvmfs/{NAME} --state-db {DB}"
GC = f"gc --older-than 0s --backend cvmfs --repository-root /cvmfs/{NAME} --state-db {DB}"


# What the next run says it repaired (publisher/backend/cvmfs.py's warnings)
REPAIRS = (("waited for an orphan", "left running by an earlier run"), ("aborted", "aborting it"),
           ("removed a stale lock", "left by a killed publish"), ("unmounted a dead client", "is dead"))


def processes() -> list[tuple[int, int, list[str]]]:
    """(pid, pgid, argv) of every process seen from here, the container's included."""
    found = []
    for entry in os.listdir("/proc"):
        if entry.isdigit():
            try:
                with open(f"/proc/{entry}/cmdline", "rb") as f:
                    argv = [a.decode(errors="replace") for a in f.read().split(b"\0") if a]
                found.append((int(entry), os.getpgid(int(entry)), argv))
            except OSError:
                continue
    return found


def named(argv: list[str], program: str) -> bool:
    return any(os.path.basename(a) == program for a in argv[:2])


def publisher(procs: list[tuple[int, int, list[str]]]) -> tuple[int, int] | None:
    """(pid, pgid) of the publisher working on NAME (the container's cvmfs-publisher execs
    `python -m publisher`)."""
    found = [(pid, pgid) for pid, pgid, argv in procs if argv[1:3] == ["-m", "publisher"] and f"/cvmfs/{NAME}" in argv]
    return found[0] if found else None


def kill9(group: bool) -> str:
    """kill -9 the publisher working on NAME (``group``: its process group) from here, at
    once (a `podman exec` costs 0.1-0.3 s, longer than a `transaction`); returns the
    `cvmfs_server` subcommands it ran into (+cvmfs2: a client starting in its group),
    "publisher" or "after exit"."""
    procs = processes()
    pub = publisher(procs)
    if pub is None:
        return "after exit"
    pid, pgid = pub
    subs = set()
    for _, g, argv in procs:
        for i, a in enumerate(argv[:2]):
            if os.path.basename(a) == "cvmfs_server" and i + 1 < len(argv) and (g == pgid or NAME in argv):
                subs.add(argv[i + 1])
        if g == pgid and named(argv, "cvmfs2"):
            subs.add("cvmfs2")
    try:
        os.killpg(pgid, signal.SIGKILL) if group else os.kill(pid, signal.SIGKILL)
    except ProcessLookupError:
        return "after exit"
    return "+".join(sorted(subs)) or "publisher"


def running(sub: str) -> bool:
    """Is `cvmfs_server SUB NAME` running, or for "cvmfs2" a client starting in the
    publisher's process group (a `publish` or `ingest` remounting it)?"""
    procs = processes()
    if sub == "cvmfs2":
        pub = publisher(procs)
        return pub is not None and any(g == pub[1] and named(argv, "cvmfs2") for _, g, argv in procs)
    return any(named(argv, "cvmfs_server") and sub in argv and NAME in argv for _, _, argv in procs)


def aimed(sub: str, within: float, give_up: float) -> Callable[[], bool]:
    """True ``within`` seconds after `cvmfs_server SUB` shows up, or at ``give_up``."""
    kill_at = [give_up]

    def until() -> bool:
        now = time.monotonic()
        if kill_at[0] == give_up and running(sub):
            kill_at[0] = now + within
        return now >= kill_at[0]
    return until


def diagnose(s0: Stratum0) -> str:
    return s0.sh(f"cvmfs_server list; grep -E ' /cvmfs/{NAME}|{NAME}/rdonly' /proc/mounts; "
                 f"ls -la /var/spool/cvmfs/{NAME}/; ps -eo pid,pgid,args | grep -E 'cvmfs_(server|publish|swiss)'",
                 check=False).stdout


def run(s0: Stratum0, args: str) -> str:
    r = s0.sh(f"cd / && cvmfs-publisher {args} --log-level debug >/w/crash-next.out 2>&1", check=False, timeout=900)
    out = (s0.host_w / "crash-next.out").read_text(errors="replace")
    assert r.returncode == 0, f"{args} failed ({r.returncode}):\n{out[-6000:]}\n{diagnose(s0)}"
    return out


@pytest.fixture
def stratum0(e2e_base: Path) -> Iterator[Stratum0]:
    """A stratum 0 of its own whose PID 1 reaps orphans: each round's killed cvmfs_server
    calls (and every client a publish remounts) end as zombies of PID 1, and `sleep` as PID 1
    let them fill pids.max within ~80 rounds (then cvmfs_server PANICs: no new thread)."""
    with running_stratum0(e2e_base, init=True) as s0:
        yield s0


def test_kill9_rounds(stratum0: Stratum0, standard_images: StandardImages) -> None:
    seed = int(os.environ.get("CVMFS_CRASH_SEED") or time.time())
    rng = random.Random(seed)
    print(f"\nseed {seed} (CVMFS_CRASH_SEED)")
    repo = stratum0.mkfs(NAME)
    lay = RepositoryLayout(stratum0.host_view(repo.client))
    s = standard_images
    pool = [s.multilayer, s.multilayer_docker, *s.tagged.values(), s.apptainer, s.fifo]
    present: list[BuiltImage] = []

    def wish(images: list[BuiltImage]) -> None:
        write_wishlist(stratum0.host_w / f"{NAME}.yaml", [i.ref for i in images], repo=NAME)

    def add_some(k: int = 0) -> list[BuiltImage]:
        absent = [i for i in pool if i not in present]
        return present + rng.sample(absent, k or rng.randint(1, min(3, len(absent))))

    def drop_some() -> list[BuiltImage]:
        kept = rng.sample(present, len(present) - rng.randint(1, min(3, len(present) - 1)))
        wish(kept)
        run(stratum0, CONVERT)  # a full run without the dropped tags: gc's to take
        return kept

    # The normal duration of each kind of round, the kills' random delays range over it.
    normal = {}
    t0 = time.monotonic()
    present = add_some(3)
    wish(present)
    run(stratum0, CONVERT)
    normal["convert"] = time.monotonic() - t0
    present = drop_some()
    t0 = time.monotonic()
    run(stratum0, GC)
    normal["gc"] = time.monotonic() - t0
    print(f"normal durations: {', '.join(f'{k} {v:.1f} s' for k, v in normal.items())}")

    tally: collections.Counter = collections.Counter()
    for n in range(ROUNDS):
        kind = "gc" if len(present) > 2 and (len(present) == len(pool) or rng.random() < 0.35) else "convert"
        group = n % 2 == 1
        if kind == "convert":
            present = add_some()
            wish(present)
        else:
            kept = drop_some()
        cmd = CONVERT if kind == "convert" else GC
        log = stratum0.host_w / f"crash-{n}.log"
        stratum0.sh(f"cd / && setsid cvmfs-publisher {cmd} --log-level debug >/w/{log.name} 2>&1 &")
        # Half the kills at a random moment, half aimed into a cvmfs_server call (the short
        # ones, transaction and abort, a random moment seldom hits).
        delay = rng.uniform(0, normal[kind])
        if rng.random() < 0.5:
            kill_at = time.monotonic() + delay
            until, aim = (lambda: time.monotonic() >= kill_at), f"at {delay:.2f} s"
        else:
            sub = rng.choice(["transaction", "publish", "cvmfs2"] + (["ingest"] if kind == "gc" else []))
            # (a client's start in the group lasts ~0.05 s)
            within = delay / 4 if sub != "cvmfs2" else delay / normal[kind] * 0.06
            until = aimed(sub, within, time.monotonic() + 2 * normal[kind])
            aim = f"{within:.3f} s into {sub}"
        while not until():
            time.sleep(0.002)
        where = kill9(group)
        if where == "publisher":  # between calls: after which one
            calls = [line.split("running cvmfs_server ", 1)[1].split()[0]
                     for line in log.read_text(errors="replace").splitlines() if "running cvmfs_server " in line]
            where += f" after {calls[-1]}" if calls else ""
        mode = "group" if group else "pid"
        tally[(kind, mode, where)] += 1
        out = run(stratum0, cmd)
        repaired = [what for what, said in REPAIRS if said in out]
        print(f"round {n}: {kind}, kill {mode} {aim}: {where}; next run: {', '.join(repaired) or '-'}", flush=True)
        if kind == "gc":
            gone = {i.config_digest for i in present} - {i.config_digest for i in kept}
            assert not [c for c in gone if lay.flat_dir(c).exists()], out[-4000:]
            present = kept
            out = run(stratum0, CONVERT)  # a gc's report has no "0 failed"
        assert_recovered(stratum0, repo, present, "\n".join(l for l in out.splitlines() if " DEBUG " not in l))
    print("kills (kind, mode, landed in):")
    for key, count in sorted(tally.items()):
        print(f"  {count:3d}  {' '.join(key)}")

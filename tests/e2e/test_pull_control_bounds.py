"""The pull control socket under load, through the real daemon, containerd and a registry:
connections beyond the bound, idle or trickling clients, and a task limit (a pids cgroup,
as systemd's TasksMax) that leaves no thread for a connection. The daemon refuses at once
what it cannot take, the `pull` command then pulls in-process and says so on its first line,
and the daemon takes pulls again afterwards."""

from __future__ import annotations

import json
import os
import socket
import time
from pathlib import Path

import pytest

from tests.e2e.daemonpull import check_tree, control, daemon_pulls, pull
from tests.fixtures.polling import wait_until

pytestmark = pytest.mark.e2e

MAX_CONNECTIONS = 64  # pull.daemon.MAX_CONNECTIONS
REQUEST_DEADLINE = 10  # pull.daemon.REQUEST_DEADLINE


def connect(path: str) -> socket.socket:
    s = socket.socket(socket.AF_UNIX)
    s.settimeout(30)
    s.connect(path)
    return s


def answer(s: socket.socket, within: float) -> dict | None:
    """The daemon's first line, or None when it closed without one."""
    s.settimeout(within)
    data = b""
    while not data.endswith(b"\n"):
        chunk = s.recv(4096)
        if not chunk:
            return None
        data += chunk
    return json.loads(data)


def admitted(path: str) -> socket.socket | None:
    """A connection the daemon took (it waits for the request); None when it refused it as
    busy, the connection closed."""
    s = connect(path)
    s.settimeout(0.5)
    try:
        data = s.recv(4096, socket.MSG_PEEK)
    except TimeoutError:
        s.settimeout(30)
        return s
    s.close()
    if b"busy" in data:
        return None
    raise AssertionError(f"the daemon answered a connection before its request: {data!r}")


@pytest.fixture
def stack(registry_factory, push_standard_images, snapshotter_factory, containerd_factory):
    reg = registry_factory()
    img = push_standard_images(reg).multilayer
    sn = snapshotter_factory()
    cd = containerd_factory(sn.address)
    return img, sn, cd


def test_connections_beyond_the_bound_are_refused_and_slow_ones_dropped(stack):
    img, sn, cd = stack
    idle = [connect(control(sn)) for _ in range(MAX_CONNECTIONS)]
    try:
        started = time.monotonic()
        extra = connect(control(sn))
        assert answer(extra, 5) == {"refused": f"busy: {MAX_CONNECTIONS} connections open"}
        assert time.monotonic() - started < 5
        # The command is refused the same way: it pulls in-process and says so first.
        res = pull(cd, img.ref, "--plain-http", "--control-socket", control(sn))
        first = res.stderr.splitlines()[0]
        assert first.startswith("pulling in this process") and "busy" in first, res.stderr
        assert daemon_pulls(sn) == 0
        check_tree(cd, img)
        # Idle connections get the request deadline, not a thread each for ever; so does one
        # that trickles its request (a byte a second).
        for s in idle[1:]:
            s.close()
        # (the daemon counts a closed connection out when its reader sees EOF: until
        # then a new one is still refused as busy)
        drip = wait_until(lambda: admitted(control(sn)), 10, "a connection admitted after 63 closed")
        started = time.monotonic()
        for byte in b'{"v": 1, "pull": {"image": "x"':
            drip.send(bytes([byte]))
            if time.monotonic() - started > REQUEST_DEADLINE + 10:
                break
            try:
                drip.settimeout(1)
                if drip.recv(4096, socket.MSG_PEEK):
                    break  # the daemon answered (refused, then closes)
            except TimeoutError:
                pass
        assert answer(drip, 10) == {"refused": "request not complete in time"}
        assert time.monotonic() - started < REQUEST_DEADLINE + 10
        assert answer(idle[0], REQUEST_DEADLINE + 10) == {"refused": "request not complete in time"}
    finally:
        for s in idle:
            s.close()
    res = pull(cd, img.ref, "--plain-http", "--daemon", "--control-socket", control(sn), namespace="after")
    assert res.stderr.splitlines()[0] == \
        f"pulling through the snapshotter daemon ({control(sn)}, from --control-socket)", res.stderr
    assert daemon_pulls(sn) == 1
    check_tree(cd, img, namespace="after")


PIDS_CGROUP = Path("/sys/fs/cgroup/pids")


@pytest.fixture
def task_limit(tmp_path):
    """A pids cgroup (cgroup v1) to put the daemon in, removed afterwards."""
    if not (PIDS_CGROUP / "cgroup.procs").exists() or not os.access(PIDS_CGROUP, os.W_OK):
        pytest.skip("no writable cgroup v1 pids controller to impose a task limit")
    group = PIDS_CGROUP / f"cvmfs-images-test-{os.getpid()}-{tmp_path.name}"
    group.mkdir()
    moved: list[int] = []
    yield group, moved
    for pid in moved:
        try:
            (PIDS_CGROUP / "cgroup.procs").write_text(str(pid))
        except OSError:
            pass
    group.rmdir()


def test_a_task_limit_costs_refused_connections_not_the_accept_thread(stack, task_limit):
    img, sn, cd = stack
    group, moved = task_limit
    pull(cd, img.ref, "--plain-http", "--daemon", "--control-socket", control(sn), namespace="warm")
    (group / "cgroup.procs").write_text(str(sn.pid))
    moved.append(sn.pid)
    (group / "pids.max").write_text(str(int((group / "pids.current").read_text()) + 2))
    held = [connect(control(sn)) for _ in range(2)]  # a thread each: the limit reached
    try:
        time.sleep(0.5)
        refused = [answer(connect(control(sn)), 5) for _ in range(3)]
        assert all(r is not None and r["refused"].startswith("busy: cannot start a thread") for r in refused), refused
        started = time.monotonic()
        res = pull(cd, img.ref, "--plain-http", "--control-socket", control(sn))
        first = res.stderr.splitlines()[0]
        assert first.startswith("pulling in this process") and "cannot start a thread" in first, res.stderr
        assert time.monotonic() - started < 60  # not the old 60 s wait for an accept thread long dead
        check_tree(cd, img)
    finally:
        for s in held:
            s.close()
        (group / "pids.max").write_text("max")
    # The accept thread lived through it: the daemon takes pulls again.
    pull(cd, img.ref, "--plain-http", "--daemon", "--control-socket", control(sn), namespace="after")
    check_tree(cd, img, namespace="after")

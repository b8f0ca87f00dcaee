"""Type=notify: the snapshotter tells systemd READY=1 only once its socket accepts connections,
so containerd (ordered after it) never dials a socket that is not there yet."""
from __future__ import annotations

import os
import signal
import socket
import subprocess
import uuid

import grpc

from cvmfs_api.containerd.services.snapshots.v1 import snapshots_pb2 as pb
from cvmfs_api.containerd.services.snapshots.v1 import snapshots_pb2_grpc as pb_grpc
from snapshotter.sdnotify import notify
from tests.fixtures.snapshotter import snapshotter_command


def test_ready_is_sent_only_once_the_socket_accepts_connections(tmp_path):
    notify_path = tmp_path / "notify.sock"
    receiver = socket.socket(socket.AF_UNIX, socket.SOCK_DGRAM)
    receiver.bind(str(notify_path))
    receiver.settimeout(180)  # generous: a loaded CI machine
    address = tmp_path / "sn.sock"
    env = {**os.environ, "NOTIFY_SOCKET": str(notify_path)}
    log = open(tmp_path / "sn.log", "wb")
    proc = subprocess.Popen([*snapshotter_command(), "serve", "--root", str(tmp_path / "root"),
                             "--address", str(address)], env=env, stdout=log, stderr=subprocess.STDOUT)
    try:
        message = receiver.recv(4096).decode()
        # At the moment systemd hears READY=1, a client can connect and get answers.
        with socket.socket(socket.AF_UNIX, socket.SOCK_STREAM) as s:
            s.settimeout(5)
            s.connect(str(address))
        with grpc.insecure_channel(f"unix:{address}") as ch:
            list(pb_grpc.SnapshotsStub(ch).List(pb.ListSnapshotsRequest(snapshotter="x"), timeout=10))
        assert message == "READY=1"
        proc.send_signal(signal.SIGTERM)
        assert receiver.recv(4096).decode() == "STOPPING=1", (tmp_path / "sn.log").read_text()
        assert proc.wait(timeout=30) == 0
    finally:
        if proc.poll() is None:
            proc.kill()
            proc.wait()
        log.close()
        receiver.close()


def test_notify_abstract_socket_and_absent_variable():
    name = f"cvmfs-test-{uuid.uuid4().hex}"
    with socket.socket(socket.AF_UNIX, socket.SOCK_DGRAM) as receiver:
        receiver.bind("\0" + name)
        receiver.settimeout(5)
        assert notify("READY=1", {"NOTIFY_SOCKET": "@" + name})
        assert receiver.recv(100) == b"READY=1"
    assert notify("READY=1", {}) is False
    # A socket that is gone is a warning, never an exception: serving matters more.
    assert notify("READY=1", {"NOTIFY_SOCKET": "/nonexistent/notify.sock"}) is False

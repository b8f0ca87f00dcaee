"""The real `cvmfs-snapshotter serve` process: socket hygiene, status codes, metrics, signals."""

from __future__ import annotations

import os
import signal
import socket
import stat
import subprocess
import sys
import urllib.request

import grpc
import pytest
from google.protobuf import field_mask_pb2

from cvmfs_api.containerd.services.snapshots.v1 import snapshots_pb2 as pb
from cvmfs_api.containerd.services.snapshots.v1 import snapshots_pb2_grpc as pb_grpc
from tests.fixtures._proc import free_port
from tests.fixtures.snapshotter import SnapshotterProcess


@pytest.fixture
def proc(tmp_path):
    port = free_port()
    p = SnapshotterProcess(tmp_path / "sn", extra_args=["--metrics-address", f"127.0.0.1:{port}"])
    p.start()
    p.metrics_port = port
    yield p
    p.stop()


@pytest.fixture
def stub(proc):
    with grpc.insecure_channel(f"unix:{proc.address}") as ch:
        yield pb_grpc.SnapshotsStub(ch)


def code_of(fn, *args) -> grpc.StatusCode:
    with pytest.raises(grpc.RpcError) as e:
        fn(*args)
    return e.value.code()


def test_socket_is_0660(proc):
    assert stat.S_IMODE(os.stat(proc.address).st_mode) == 0o660


def test_malformed_requests_get_the_right_codes(stub):
    assert code_of(stub.Prepare, pb.PrepareSnapshotRequest(key="")) == grpc.StatusCode.INVALID_ARGUMENT
    assert code_of(stub.Prepare, pb.PrepareSnapshotRequest(key="k", parent="nope")) == grpc.StatusCode.NOT_FOUND
    assert code_of(stub.Stat, pb.StatSnapshotRequest(key="nope")) == grpc.StatusCode.NOT_FOUND
    assert code_of(stub.Mounts, pb.MountsRequest(key="nope")) == grpc.StatusCode.NOT_FOUND
    assert code_of(stub.Remove, pb.RemoveSnapshotRequest(key="nope")) == grpc.StatusCode.NOT_FOUND
    assert code_of(stub.Usage, pb.UsageRequest(key="nope")) == grpc.StatusCode.NOT_FOUND
    stub.Prepare(pb.PrepareSnapshotRequest(key="k"))
    assert code_of(stub.Prepare, pb.PrepareSnapshotRequest(key="k")) == grpc.StatusCode.ALREADY_EXISTS
    assert code_of(stub.Commit, pb.CommitSnapshotRequest(key="k", name="")) == grpc.StatusCode.INVALID_ARGUMENT
    bad_update = pb.UpdateSnapshotRequest(info=pb.Info(name="k"), update_mask=field_mask_pb2.FieldMask(paths=["kind"]))
    assert code_of(stub.Update, bad_update) == grpc.StatusCode.INVALID_ARGUMENT
    for garbage in ["name==", "labels.\"x", "name=~x", "\x00"]:
        req = pb.ListSnapshotsRequest(filters=[garbage])
        assert code_of(lambda r: list(stub.List(r)), req) == grpc.StatusCode.INVALID_ARGUMENT, garbage
    # Still serving after all of that.
    assert stub.Stat(pb.StatSnapshotRequest(key="k")).info.name == "k"


def test_metrics_endpoint(proc, stub):
    stub.Prepare(pb.PrepareSnapshotRequest(key="m"))
    with pytest.raises(grpc.RpcError):
        stub.Stat(pb.StatSnapshotRequest(key="missing"))
    text = urllib.request.urlopen(f"http://127.0.0.1:{proc.metrics_port}/metrics", timeout=10).read().decode()
    assert 'cvmfs_snapshotter_rpc_seconds_count{code="OK",method="Prepare"} 1.0' in text
    assert 'cvmfs_snapshotter_rpc_seconds_count{code="NOT_FOUND",method="Stat"} 1.0' in text
    assert 'cvmfs_snapshotter_snapshots_created_total{kind="active"} 1.0' in text


def test_sigterm_stops_cleanly_and_removes_socket(proc):
    proc._proc.send_signal(signal.SIGTERM)
    assert proc._proc.wait(20) == 0
    assert not proc.address.exists()


def test_stale_socket_is_replaced_live_one_is_not(tmp_path):
    sock_path = tmp_path / "sn" / "snapshotter.sock"
    sock_path.parent.mkdir(parents=True)
    stale = socket.socket(socket.AF_UNIX)
    stale.bind(str(sock_path))
    stale.close()  # a socket file nobody listens on: what a crash leaves
    p = SnapshotterProcess(tmp_path / "sn").start()
    try:
        second = subprocess.run(
            [sys.executable, "-m", "snapshotter", "serve", "--root", str(tmp_path / "other"),
             "--address", str(p.address)],
            capture_output=True, text=True, timeout=60,
        )
        assert second.returncode == 1
        assert "another process is serving" in second.stderr
        with grpc.insecure_channel(f"unix:{p.address}") as ch:
            list(pb_grpc.SnapshotsStub(ch).List(pb.ListSnapshotsRequest(), timeout=10))
    finally:
        p.stop()


def test_second_process_on_the_same_root_is_refused(proc, tmp_path):
    second = subprocess.run(
        [sys.executable, "-m", "snapshotter", "serve", "--root", str(proc.root),
         "--address", str(tmp_path / "other.sock")],
        capture_output=True, text=True, timeout=60,
    )
    assert second.returncode == 1
    assert f"another cvmfs-snapshotter is using the root directory {proc.root}" in second.stderr
    assert "Traceback" not in second.stderr
    with grpc.insecure_channel(f"unix:{proc.address}") as ch:
        list(pb_grpc.SnapshotsStub(ch).List(pb.ListSnapshotsRequest(), timeout=10))


def test_kill9_then_restart_serves_and_cleanup_removes_orphans(tmp_path):
    p = SnapshotterProcess(tmp_path / "sn").start()
    with grpc.insecure_channel(f"unix:{p.address}") as ch:
        s = pb_grpc.SnapshotsStub(ch)
        s.Prepare(pb.PrepareSnapshotRequest(key="a"))
        s.Commit(pb.CommitSnapshotRequest(key="a", name="base"))
        s.Prepare(pb.PrepareSnapshotRequest(key="c", parent="base"))
    p.kill9()
    (p.root / "snapshots" / "99").mkdir()  # as if a crash hit between mkdir and the row commit
    p.start()
    with grpc.insecure_channel(f"unix:{p.address}") as ch:
        s = pb_grpc.SnapshotsStub(ch)
        (m,) = s.Mounts(pb.MountsRequest(key="c")).mounts
        assert m.type == "overlay"
        s.Cleanup(pb.CleanupRequest())
    p.stop()
    assert sorted(os.listdir(p.root / "snapshots")) == ["1", "2"]


def test_config_file_and_flags(tmp_path):
    from snapshotter.cli import build_parser
    from snapshotter.config import ConfigError, serve_config

    cfg_file = tmp_path / "config.toml"
    cfg_file.write_text('root = "/var/lib/x"\nrepository = "unpacked.cern.ch"\nstat-timeout = "3s"\n')
    args = build_parser().parse_args(["serve", "--config", str(cfg_file), "--address", "/run/x.sock"])
    cfg = serve_config(args)
    assert (str(cfg.root), str(cfg.address), cfg.repositories, cfg.stat_timeout) == (
        "/var/lib/x", "/run/x.sock", ["/cvmfs/unpacked.cern.ch"], 3.0)
    cfg_file.write_text('repositories = ["/a", "/b"]\nabsolute-mountpoint = "/c"\n')
    assert serve_config(build_parser().parse_args(["serve", "--config", str(cfg_file)])).repositories == [
        "/a", "/b", "/c"]
    cfg_file.write_text("bogus = 1\n")
    with pytest.raises(ConfigError, match="unknown keys"):
        serve_config(build_parser().parse_args(["serve", "--config", str(cfg_file)]))
    with pytest.raises(ConfigError, match="does not exist"):
        serve_config(build_parser().parse_args(["serve", "--config", str(tmp_path / "missing.toml")]))


def test_catastrophic_regex_filter_does_not_freeze_other_rpcs(stub):
    """`(a+)+$` against a long label backtracks for ever in Python's re (holding the GIL,
    so every RPC froze); RE2 answers in linear time and other RPCs keep answering."""
    import threading
    import time

    stub.Prepare(pb.PrepareSnapshotRequest(key="victim", labels={"a": "a" * 4000 + "b"}))
    result: dict = {}

    def redos() -> None:
        start = time.monotonic()
        try:
            result["names"] = [i.name for r in stub.List(
                pb.ListSnapshotsRequest(filters=['labels.a~="(a+)+$"']), timeout=60) for i in r.info]
        except grpc.RpcError as e:
            result["error"] = e.code().name
        result["seconds"] = time.monotonic() - start

    thread = threading.Thread(target=redos)
    thread.start()
    latencies = []
    while thread.is_alive() or len(latencies) < 20:
        start = time.monotonic()
        stub.Stat(pb.StatSnapshotRequest(key="victim"), timeout=60)
        latencies.append(time.monotonic() - start)
    thread.join()
    assert result.get("names") == [], result
    assert result["seconds"] < 30, result  # generous: the machine is shared
    assert max(latencies) < 10, max(latencies)
    bad = pb.ListSnapshotsRequest(filters=['labels.a~="(?=lookahead)"'])
    assert code_of(lambda r: list(stub.List(r)), bad) == grpc.StatusCode.INVALID_ARGUMENT


def test_labels_are_limited_like_containerd(stub):
    largest = {"k": "v" * 4095}  # key + value = 4096 bytes: allowed
    stub.Prepare(pb.PrepareSnapshotRequest(key="ok", labels=largest))
    assert stub.Stat(pb.StatSnapshotRequest(key="ok")).info.labels == largest
    too_big = {"k": "é" * 2048}  # 1 + 4096 bytes (UTF-8), 2049 characters
    for call, req in [
        (stub.Prepare, pb.PrepareSnapshotRequest(key="big", labels=too_big)),
        (stub.View, pb.ViewSnapshotRequest(key="big", labels=too_big)),
        (stub.Commit, pb.CommitSnapshotRequest(key="ok", name="c", labels=too_big)),
        (stub.Update, pb.UpdateSnapshotRequest(info=pb.Info(name="ok", labels=too_big))),
    ]:
        with pytest.raises(grpc.RpcError) as e:
            call(req)
        assert e.value.code() == grpc.StatusCode.INVALID_ARGUMENT
        assert "label key and value length (4097 bytes) greater than maximum size (4096 bytes)" in e.value.details()
    assert code_of(stub.Stat, pb.StatSnapshotRequest(key="big")) == grpc.StatusCode.NOT_FOUND
    assert stub.Stat(pb.StatSnapshotRequest(key="ok")).info.labels == largest


def test_list_batches_by_size_within_the_default_message_limit(stub):
    """Five snapshots of ~3.6 MB of labels each: 100-entry batches made an 18 MB message
    that a client with gRPC's default 4 MiB limit cannot receive."""
    heavy = {f"l{j:04d}": "x" * 4000 for j in range(900)}
    for i in range(5):
        stub.Prepare(pb.PrepareSnapshotRequest(key=f"heavy{i}", labels=heavy), timeout=60)
    for i in range(250):
        stub.Prepare(pb.PrepareSnapshotRequest(key=f"light{i}"), timeout=60)
    responses = list(stub.List(pb.ListSnapshotsRequest(), timeout=120))  # default 4 MiB receive limit
    names = [i.name for r in responses for i in r.info]
    assert sorted(names) == sorted([f"heavy{i}" for i in range(5)] + [f"light{i}" for i in range(250)])
    assert all(r.ByteSize() < 4 << 20 for r in responses)
    assert all(len(r.info) <= 100 for r in responses)
    assert len(responses) >= 5 + 3  # each heavy one alone, the light ones in batches of 100


BAD_CONFIGS = [
    ("root = 5", "root must be a string, not an integer (5)"),
    ('repositories = "/a"', "repositories must be an array of paths"),
    ("repositories = [1]", "repositories must be an array of paths"),
    ("repository = 1", "repository must be a string, not an integer"),
    ("stat-timeout = true", "stat-timeout must be a duration"),
    ("stat-timeout = 0", "stat-timeout must be greater than 0"),
    ('stat-timeout = "0s"', "stat-timeout must be greater than 0"),
    ("stat-timeout = -1", "stat-timeout"),
    ('stat-timeout = "-1s"', "stat-timeout: not a duration"),
    ("lookup-cache-ttl = []", "lookup-cache-ttl must be a duration"),
    ('log-format = "xml"', "log-format must be one of text, json, not 'xml'"),
    ("log-level = 5", "log-level must be a string"),
    ('log-level = "loud"', "log-level must be one of debug, info, warning, error"),
    ("metrics-address = 9102", "metrics-address must be a string"),
    ('metrics-address = "localhost"', "metrics-address must be HOST:PORT"),
    ("root = ", "not valid TOML"),
]


def _serve(tmp_path, *args: str, timeout: float = 60) -> subprocess.CompletedProcess:
    return subprocess.run(
        [sys.executable, "-m", "snapshotter", "serve", "--root", str(tmp_path / "root"),
         "--address", str(tmp_path / "s.sock"), *args],
        capture_output=True, text=True, timeout=timeout, stdin=subprocess.DEVNULL,
    )


@pytest.mark.parametrize("text, message", BAD_CONFIGS)
def test_bad_config_file_is_a_clear_error(tmp_path, text, message):
    cfg = tmp_path / "config.toml"
    cfg.write_text(text + "\n")
    res = _serve(tmp_path, "--config", str(cfg))
    assert res.returncode == 2, res.stderr
    assert "Traceback" not in res.stderr
    assert f"{cfg}: " in res.stderr and message in res.stderr, res.stderr
    assert not (tmp_path / "s.sock").exists()


@pytest.mark.parametrize("args, message", [
    (["--stat-timeout", "0"], "--stat-timeout must be greater than 0"),
    (["--stat-timeout=-1"], "--stat-timeout: not a duration"),
    (["--lookup-cache-ttl", "soon"], "--lookup-cache-ttl: not a duration"),
    (["--metrics-address", "9102"], "--metrics-address must be HOST:PORT"),
    (["--log-format", "xml"], "invalid choice: 'xml'"),
])
def test_bad_flags_are_a_clear_error(tmp_path, args, message):
    res = _serve(tmp_path, *args)
    assert res.returncode == 2, res.stderr
    assert "Traceback" not in res.stderr
    assert message in res.stderr, res.stderr


def test_missing_repository_is_a_warning_not_a_refusal(tmp_path):
    missing = tmp_path / "cvmfs" / "unpacked.cern.ch"
    p = SnapshotterProcess(tmp_path / "sn", repositories=[missing]).start()
    try:
        with grpc.insecure_channel(f"unix:{p.address}") as ch:
            list(pb_grpc.SnapshotsStub(ch).List(pb.ListSnapshotsRequest(), timeout=10))
        assert f"repository {missing} does not exist (yet)" in p.log()
    finally:
        p.stop()

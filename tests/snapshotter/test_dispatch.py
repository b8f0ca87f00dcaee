"""ReceiveFirstExecutor on a real grpcio server: which thread runs a handler, and that a
call answered in the serving thread behaves as one answered in the pool."""

from __future__ import annotations

import threading
from concurrent import futures
from typing import Iterator

import grpc
import pytest

from cvmfs_api.containerd.services.snapshots.v1 import snapshots_pb2 as pb
from cvmfs_api.containerd.services.snapshots.v1 import snapshots_pb2_grpc as pb_grpc
from snapshotter import dispatch
from snapshotter.dispatch import ReceiveFirstExecutor, non_blocking

POOL_PREFIX = "pool"


class Servicer(pb_grpc.SnapshotsServicer):
    def __init__(self) -> None:
        self.threads: dict[str, str] = {}
        self.release = threading.Event()
        self.blocked = threading.Semaphore(0)

    @non_blocking
    def Stat(self, request, context):  # noqa: N802
        self.threads["Stat"] = threading.current_thread().name
        if request.key == "missing":
            context.abort(grpc.StatusCode.NOT_FOUND, "no such snapshot")
        if request.key == "bug":
            raise RuntimeError("a bug in the handler")
        return pb.StatSnapshotResponse(info=pb.Info(name=request.key))

    def Prepare(self, request, context):  # noqa: N802
        self.threads["Prepare"] = threading.current_thread().name
        if request.key == "block":
            self.blocked.release()
            self.release.wait(30)
        return pb.PrepareSnapshotResponse()

    def List(self, request, context):  # noqa: N802
        self.threads["List"] = threading.current_thread().name
        yield pb.ListSnapshotsResponse(info=[pb.Info(name="a")])


@pytest.fixture
def served(tmp_path) -> Iterator[tuple[Servicer, grpc.Channel]]:
    servicer = Servicer()
    server = grpc.server(ReceiveFirstExecutor(futures.ThreadPoolExecutor(4, thread_name_prefix=POOL_PREFIX)))
    pb_grpc.add_SnapshotsServicer_to_server(servicer, server)
    address = f"unix:{tmp_path}/s.sock"
    server.add_insecure_port(address)
    server.start()
    with grpc.insecure_channel(address) as channel:
        yield servicer, channel
    servicer.release.set()
    server.stop(None).wait()


def test_the_pinned_grpcio_has_what_the_shortcut_uses() -> None:
    # A grpcio upgrade that changes these internals fails here instead of quietly
    # sending every call through the pool again.
    assert dispatch._internals() is not None


def test_a_non_blocking_handler_runs_in_the_serving_thread_the_others_in_the_pool(served) -> None:
    servicer, channel = served
    stub = pb_grpc.SnapshotsStub(channel)
    assert stub.Stat(pb.StatSnapshotRequest(key="k"), timeout=10).info.name == "k"
    stub.Prepare(pb.PrepareSnapshotRequest(key="k"), timeout=10)
    assert [i.name for r in stub.List(pb.ListSnapshotsRequest(), timeout=10) for i in r.info] == ["a"]
    assert not servicer.threads["Stat"].startswith(POOL_PREFIX)
    assert servicer.threads["Prepare"].startswith(POOL_PREFIX)
    assert servicer.threads["List"].startswith(POOL_PREFIX)


def test_errors_from_the_serving_thread_reach_the_client_and_serving_goes_on(served) -> None:
    _, channel = served
    stub = pb_grpc.SnapshotsStub(channel)
    with pytest.raises(grpc.RpcError) as e:
        stub.Stat(pb.StatSnapshotRequest(key="missing"), timeout=10)
    assert (e.value.code(), e.value.details()) == (grpc.StatusCode.NOT_FOUND, "no such snapshot")
    with pytest.raises(grpc.RpcError) as e:
        stub.Stat(pb.StatSnapshotRequest(key="bug"), timeout=10)
    assert e.value.code() == grpc.StatusCode.UNKNOWN
    garbage = channel.unary_unary("/containerd.services.snapshots.v1.Snapshots/Stat")
    with pytest.raises(grpc.RpcError) as e:
        garbage(b"\xff\xff\xff", timeout=10)  # not a StatSnapshotRequest
    assert e.value.code() == grpc.StatusCode.INTERNAL
    assert stub.Stat(pb.StatSnapshotRequest(key="k"), timeout=10).info.name == "k"


def test_the_serving_thread_answers_while_pool_handlers_block(served) -> None:
    servicer, channel = served
    stub = pb_grpc.SnapshotsStub(channel)
    pending = [stub.Prepare.future(pb.PrepareSnapshotRequest(key="block"), timeout=30) for _ in range(3)]
    for _ in pending:
        assert servicer.blocked.acquire(timeout=10)
    for i in range(50):
        assert stub.Stat(pb.StatSnapshotRequest(key=f"k{i}"), timeout=5).info.name == f"k{i}"
    servicer.release.set()
    for f in pending:
        f.result(timeout=10)


def test_without_the_internals_every_call_goes_to_the_pool(tmp_path, monkeypatch) -> None:
    monkeypatch.setattr(dispatch, "_internals", lambda: None)
    servicer = Servicer()
    server = grpc.server(ReceiveFirstExecutor(futures.ThreadPoolExecutor(2, thread_name_prefix=POOL_PREFIX)))
    pb_grpc.add_SnapshotsServicer_to_server(servicer, server)
    server.add_insecure_port(f"unix:{tmp_path}/s.sock")
    server.start()
    try:
        with grpc.insecure_channel(f"unix:{tmp_path}/s.sock") as channel:
            pb_grpc.SnapshotsStub(channel).Stat(pb.StatSnapshotRequest(key="k"), timeout=10)
    finally:
        server.stop(None).wait()
    assert servicer.threads["Stat"].startswith(POOL_PREFIX)

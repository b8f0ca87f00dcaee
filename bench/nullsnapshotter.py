#!/usr/bin/env python3
"""The floor of any Python proxy snapshotter: containerd's snapshots.v1 service served
from in-memory dicts by the same grpcio server set-up as cvmfs-snapshotter (a unix
socket, a 16-thread pool, Stat in grpcio's serving thread), with no files, no database
and no checks. Every mount is a bind mount of one scratch directory. Only for rpc_bench.py: what it measures above
this is our own work; what this costs above overlayfs is the proxy hop.

    python bench/nullsnapshotter.py SOCKET SCRATCH_DIR
"""
from __future__ import annotations

import argparse
import signal
import sys
import threading
import time
from concurrent import futures
from pathlib import Path

sys.path.insert(0, str(Path(__file__).resolve().parents[1]))

import grpc  # noqa: E402
from google.protobuf import empty_pb2  # noqa: E402

from cvmfs_api.containerd.services.snapshots.v1 import snapshots_pb2 as pb  # noqa: E402
from cvmfs_api.containerd.services.snapshots.v1 import snapshots_pb2_grpc as pb_grpc  # noqa: E402
from cvmfs_api.containerd.types import mount_pb2  # noqa: E402
from snapshotter.dispatch import ReceiveFirstExecutor, non_blocking  # noqa: E402


class NullSnapshots(pb_grpc.SnapshotsServicer):
    def __init__(self, scratch: Path) -> None:
        self.infos: dict[str, pb.Info] = {}
        self.lock = threading.Lock()
        self.mount = mount_pb2.Mount(type="bind", source=str(scratch), options=["rw", "rbind"])

    def _new(self, key: str, parent: str, kind: int, labels) -> pb.Info:
        info = pb.Info(name=key, parent=parent, kind=kind, labels=labels)
        info.created_at.FromNanoseconds(time.time_ns())
        info.updated_at.CopyFrom(info.created_at)
        return info

    def Prepare(self, request, context):  # noqa: N802 - gRPC method names
        with self.lock:
            self.infos[request.key] = self._new(request.key, request.parent, pb.ACTIVE, request.labels)
        return pb.PrepareSnapshotResponse(mounts=[self.mount])

    def View(self, request, context):  # noqa: N802
        with self.lock:
            self.infos[request.key] = self._new(request.key, request.parent, pb.VIEW, request.labels)
        return pb.ViewSnapshotResponse(mounts=[self.mount])

    def Mounts(self, request, context):  # noqa: N802
        return pb.MountsResponse(mounts=[self.mount])

    def Commit(self, request, context):  # noqa: N802
        with self.lock:
            old = self.infos.pop(request.key)
            self.infos[request.name] = self._new(request.name, old.parent, pb.COMMITTED, request.labels)
        return empty_pb2.Empty()

    def Remove(self, request, context):  # noqa: N802
        with self.lock:
            if self.infos.pop(request.key, None) is None:
                context.abort(grpc.StatusCode.NOT_FOUND, f"snapshot {request.key} not found")
        return empty_pb2.Empty()

    @non_blocking
    def Stat(self, request, context):  # noqa: N802
        info = self.infos.get(request.key)
        if info is None:
            context.abort(grpc.StatusCode.NOT_FOUND, f"snapshot {request.key} not found")
        return pb.StatSnapshotResponse(info=info)

    def List(self, request, context):  # noqa: N802
        infos = list(self.infos.values())
        for i in range(0, len(infos), 100):
            yield pb.ListSnapshotsResponse(info=infos[i:i + 100])

    def Usage(self, request, context):  # noqa: N802
        return pb.UsageResponse(size=0, inodes=0)


def main(argv: list[str] | None = None) -> int:
    ap = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    ap.add_argument("socket", type=Path)
    ap.add_argument("scratch", type=Path)
    args = ap.parse_args(argv)
    args.scratch.mkdir(parents=True, exist_ok=True)
    server = grpc.server(ReceiveFirstExecutor(futures.ThreadPoolExecutor(max_workers=16)))
    pb_grpc.add_SnapshotsServicer_to_server(NullSnapshots(args.scratch), server)
    server.add_insecure_port(f"unix:{args.socket}")
    stop = threading.Event()
    signal.signal(signal.SIGTERM, lambda *_: stop.set())
    server.start()
    stop.wait()
    server.stop(0).wait()
    return 0


if __name__ == "__main__":
    sys.exit(main())

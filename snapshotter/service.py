"""gRPC edge: containerd.services.snapshots.v1.Snapshots over the domain Snapshotter.

Domain errors map to status codes here, once; containerd's errdefs turn them back
into ErrNotFound, ErrAlreadyExists, ErrFailedPrecondition, ErrInvalidArgument.
"""

from __future__ import annotations

import logging
import time
from typing import Callable, Iterator, TypeVar

import grpc
from google.protobuf import empty_pb2

from cvmfs_api.containerd.services.snapshots.v1 import snapshots_pb2 as pb
from cvmfs_api.containerd.services.snapshots.v1 import snapshots_pb2_grpc as pb_grpc
from cvmfs_api.containerd.types import mount_pb2

from . import errors
from .core import Snapshotter
from .dispatch import non_blocking
from .metrics import Metrics
from .model import Info, Kind, Mount

log = logging.getLogger(__name__)

T = TypeVar("T")

_STATUS = {
    errors.NotFound: grpc.StatusCode.NOT_FOUND,
    errors.AlreadyExists: grpc.StatusCode.ALREADY_EXISTS,
    errors.FailedPrecondition: grpc.StatusCode.FAILED_PRECONDITION,
    errors.InvalidArgument: grpc.StatusCode.INVALID_ARGUMENT,
    errors.Unavailable: grpc.StatusCode.UNAVAILABLE,
}


def status_of(e: errors.SnapshotterError) -> grpc.StatusCode:
    """The code of the nearest class in `_STATUS` along e's class hierarchy: a subclass answers as its parent."""
    for cls in type(e).__mro__:
        status = _STATUS.get(cls)
        if status is not None:
            return status
    raise KeyError(type(e))  # an error class outside the table: a programming error


RESPONSE_MEMO_SIZE = 4096  # Stat/Mounts responses, kept for the objects the core keeps (see Stat)
LIST_BATCH = 100  # at most this many infos per List message, as containerd's own service sends them
LIST_BATCH_BYTES = 1 << 20  # and about this many bytes: well under gRPC's default 4 MiB limit


def _mounts(mounts: list[Mount]) -> list[mount_pb2.Mount]:
    return [mount_pb2.Mount(type=m.type, source=m.source, options=list(m.options)) for m in mounts]


def info_to_pb(info: Info) -> pb.Info:
    msg = pb.Info(name=info.name, parent=info.parent, kind=int(info.kind), labels=info.labels)
    msg.created_at.FromNanoseconds(info.created_ns)
    msg.updated_at.FromNanoseconds(info.updated_ns)
    return msg


def list_batches(infos: list[Info]) -> Iterator[list[pb.Info]]:
    """Infos in batches of at most LIST_BATCH entries and LIST_BATCH_BYTES serialized bytes
    (an info larger than that on its own goes alone: it cannot be split)."""
    batch: list[pb.Info] = []
    size = 0
    for info in infos:
        msg = info_to_pb(info)
        n = msg.ByteSize() + 6  # the repeated field's tag and length prefix
        if batch and (len(batch) >= LIST_BATCH or size + n > LIST_BATCH_BYTES):
            yield batch
            batch, size = [], 0
        batch.append(msg)
        size += n
    if batch:
        yield batch


def _remember(memo: dict[str, T], key: str, value: T) -> None:
    if len(memo) >= RESPONSE_MEMO_SIZE:
        memo.clear()  # a bound: refilled by the next calls
    memo[key] = value


def _namespace(context: grpc.ServicerContext) -> str:
    for key, value in context.invocation_metadata() or ():
        if key == "containerd-namespace":
            return value
    return ""


class SnapshotsService(pb_grpc.SnapshotsServicer):
    def __init__(self, snapshotter: Snapshotter, metrics: Metrics | None = None) -> None:
        self.sn = snapshotter
        self.metrics = metrics
        self._stat_memo: dict[str, tuple[Info, pb.StatSnapshotResponse]] = {}
        self._mounts_memo: dict[str, tuple[list[Mount], pb.MountsResponse]] = {}

    def _call(self, name: str, context: grpc.ServicerContext, key: str, fn: Callable[[], T]) -> T:
        start = time.perf_counter()
        code = "OK"
        try:
            return fn()
        except errors.SnapshotterError as e:
            status = status_of(e)
            code = status.name
            log.debug("%s %r (ns %s): %s", name, key, _namespace(context), e)
            context.abort(status, str(e))
        except Exception as e:  # noqa: BLE001 - every other failure is INTERNAL, logged once
            code = "INTERNAL"
            log.exception("%s %r (ns %s) failed", name, key, _namespace(context))
            context.abort(grpc.StatusCode.INTERNAL, f"{name} {key!r}: {e}")
        finally:
            elapsed = time.perf_counter() - start
            if self.metrics is not None:
                self.metrics.observe(name, code, elapsed)
            log.debug("%s %r -> %s in %.1f ms", name, key, code, elapsed * 1000)
        raise AssertionError("unreachable")  # context.abort raises

    def Prepare(self, request, context):  # noqa: N802 - gRPC method names
        mounts = self._call(
            "Prepare", context, request.key, lambda: self.sn.prepare(request.key, request.parent, dict(request.labels))
        )
        return pb.PrepareSnapshotResponse(mounts=_mounts(mounts))

    def View(self, request, context):  # noqa: N802
        mounts = self._call(
            "View", context, request.key, lambda: self.sn.view(request.key, request.parent, dict(request.labels))
        )
        return pb.ViewSnapshotResponse(mounts=_mounts(mounts))

    def Mounts(self, request, context):  # noqa: N802
        key = request.key
        mounts = self._call("Mounts", context, key, lambda: self.sn.mounts(key))
        memo = self._mounts_memo.get(key)  # the same list object while the snapshot exists
        if memo is not None and memo[0] is mounts:
            return memo[1]
        response = pb.MountsResponse(mounts=_mounts(mounts))
        _remember(self._mounts_memo, key, (mounts, response))
        return response

    def Commit(self, request, context):  # noqa: N802
        self._call(
            "Commit", context, request.key, lambda: self.sn.commit(request.name, request.key, dict(request.labels))
        )
        return empty_pb2.Empty()

    def Remove(self, request, context):  # noqa: N802
        self._call("Remove", context, request.key, lambda: self.sn.remove(request.key))
        return empty_pb2.Empty()

    # In grpcio's serving thread: from memory, or one read of the local database (WAL: a
    # read never waits for a writer). Never the repository. A List is a Stat per snapshot.
    @non_blocking
    def Stat(self, request, context):  # noqa: N802
        key = request.key
        info = self._call("Stat", context, key, lambda: self.sn.stat(key))
        # The store hands out the same Info object while the snapshot is unchanged, so its
        # response is built once (the messages are only read, by the serializer, afterwards).
        memo = self._stat_memo.get(key)
        if memo is not None and memo[0] is info:
            return memo[1]
        response = pb.StatSnapshotResponse(info=info_to_pb(info))
        _remember(self._stat_memo, key, (info, response))
        return response

    def Update(self, request, context):  # noqa: N802
        wanted = Info(request.info.name, "", Kind.COMMITTED, 0, 0, dict(request.info.labels))
        paths = list(request.update_mask.paths) if request.HasField("update_mask") else []
        info = self._call("Update", context, request.info.name, lambda: self.sn.update(wanted, paths))
        return pb.UpdateSnapshotResponse(info=info_to_pb(info))

    def List(self, request, context) -> Iterator[pb.ListSnapshotsResponse]:  # noqa: N802
        infos = self._call("List", context, ",".join(request.filters), lambda: self.sn.walk(list(request.filters)))
        for batch in list_batches(infos):
            yield pb.ListSnapshotsResponse(info=batch)

    def Usage(self, request, context):  # noqa: N802
        usage = self._call("Usage", context, request.key, lambda: self.sn.usage(request.key))
        return pb.UsageResponse(size=usage.size, inodes=usage.inodes)

    def Cleanup(self, request, context):  # noqa: N802
        self._call("Cleanup", context, "", self.sn.cleanup)
        return empty_pb2.Empty()

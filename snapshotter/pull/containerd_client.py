"""A small client of containerd's own gRPC API: what `pull` needs, nothing more.

Every call carries the `containerd-namespace` header, and the `containerd-lease`
header while a lease is held, so nothing we create is garbage-collected half-way.
"""

from __future__ import annotations

import datetime as dt
import queue
import threading
import time
import uuid
from contextlib import contextmanager
from dataclasses import dataclass, field
from typing import Callable, Iterable, Iterator

import grpc
from google.protobuf import field_mask_pb2

from cvmfs_api.containerd.services.content.v1 import content_pb2, content_pb2_grpc
from cvmfs_api.containerd.services.diff.v1 import diff_pb2, diff_pb2_grpc
from cvmfs_api.containerd.services.images.v1 import images_pb2, images_pb2_grpc
from cvmfs_api.containerd.services.leases.v1 import leases_pb2, leases_pb2_grpc
from cvmfs_api.containerd.services.snapshots.v1 import snapshots_pb2, snapshots_pb2_grpc
from cvmfs_api.containerd.types import descriptor_pb2, mount_pb2

LEASE_EXPIRE_LABEL = "containerd.io/gc.expire"
SMALL_BLOB = 1 << 20  # written in one request (below gRPC's 16 MiB message limit)


@dataclass
class ContainerdClient:
    address: str
    namespace: str = "default"
    timeout: float = 300.0
    lease: str | None = None
    # A channel shared with other clients (the daemon keeps one per containerd, warm): not
    # closed by close(). Without one the client opens its own.
    channel: grpc.Channel | None = field(default=None, repr=False)
    _channel: grpc.Channel = field(init=False, repr=False)

    def __post_init__(self) -> None:
        self._channel = self.channel or open_channel(self.address)
        self.content = content_pb2_grpc.ContentStub(self._channel)
        self.images = images_pb2_grpc.ImagesStub(self._channel)
        self.leases = leases_pb2_grpc.LeasesStub(self._channel)
        self.diff = diff_pb2_grpc.DiffStub(self._channel)
        self.snapshots = snapshots_pb2_grpc.SnapshotsStub(self._channel)

    def close(self) -> None:
        if self.channel is None:
            self._channel.close()

    def metadata(self) -> list[tuple[str, str]]:
        md = [("containerd-namespace", self.namespace)]
        if self.lease:
            md.append(("containerd-lease", self.lease))
        return md

    # -- leases ------------------------------------------------------------------

    @contextmanager
    def leased(self, expire: dt.timedelta = dt.timedelta(hours=24)) -> Iterator[str]:
        """Hold a lease for the block; it expires by itself if we die (kill -9)."""
        lease_id = f"cvmfs-pull-{uuid.uuid4().hex[:12]}"
        until = (dt.datetime.now(dt.timezone.utc) + expire).strftime("%Y-%m-%dT%H:%M:%SZ")
        self.leases.Create(
            leases_pb2.CreateRequest(id=lease_id, labels={LEASE_EXPIRE_LABEL: until}),
            metadata=self.metadata(),
            timeout=self.timeout,
        )
        self.lease = lease_id
        try:
            yield lease_id
        finally:
            self.lease = None
            self.leases.Delete(leases_pb2.DeleteRequest(id=lease_id), metadata=self.metadata(), timeout=self.timeout)

    # -- content -----------------------------------------------------------------

    def content_exists(self, digest: str) -> bool:
        try:
            self.content.Info(content_pb2.InfoRequest(digest=digest), metadata=self.metadata(), timeout=self.timeout)
            return True
        except grpc.RpcError as e:
            if e.code() == grpc.StatusCode.NOT_FOUND:
                return False
            raise

    def write_content(
        self, digest: str, size: int, chunks: Iterable[bytes] | Callable[[], Iterable[bytes]],
        labels: dict[str, str] | None = None, lock_wait: float = 600.0,
    ) -> bool:
        """Stream a blob into the content store; False if it was already there.

        Another writer of the same blob holds containerd's ref lock (UNAVAILABLE): wait
        with backoff, as containerd's own fetcher does, until it is done or we may write.
        `chunks` may be a callable so a retry can start the stream again.
        """
        deadline = time.monotonic() + lock_wait
        delay = 0.05
        while True:
            stream = chunks() if callable(chunks) else chunks
            try:
                if isinstance(stream, (list, tuple)) and sum(map(len, stream)) <= SMALL_BLOB:
                    return self._write_small_content(digest, size, b"".join(stream), labels)
                return self._write_content_once(digest, size, stream, labels)
            except grpc.RpcError as e:
                if e.code() != grpc.StatusCode.UNAVAILABLE or time.monotonic() > deadline:
                    raise
            if self.content_exists(digest):
                return False
            if not callable(chunks) and not isinstance(chunks, (list, tuple)):
                raise RuntimeError(f"content {digest} is locked by another writer and cannot be retried")
            time.sleep(delay)
            delay = min(delay * 2, 2.0)

    def _write_small_content(self, digest: str, size: int, data: bytes, labels: dict[str, str] | None) -> bool:
        """A manifest or config in one request: containerd writes a COMMIT's data before
        committing, so STAT + WRITE + COMMIT (three round trips) are not needed."""
        ref = f"cvmfs-pull-{digest}"
        request = content_pb2.WriteContentRequest(action=content_pb2.COMMIT, ref=ref, total=size, offset=0,
                                                  expected=digest, data=data, labels=labels or {})
        try:
            for _ in self.content.Write(iter([request]), metadata=self.metadata(), timeout=self.timeout):
                pass
        except grpc.RpcError as e:
            if e.code() == grpc.StatusCode.ALREADY_EXISTS:
                return False
            raise
        return True

    def _write_content_once(
        self, digest: str, size: int, chunks: Iterable[bytes], labels: dict[str, str] | None
    ) -> bool:
        """One attempt of the lock-step Write stream.

        containerd's Write is a lock-step stream (one response per request), so the
        requests come from a queue fed only after each response: no unbounded buffering.
        """
        requests: queue.Queue = queue.Queue(maxsize=1)
        done = object()

        def gen() -> Iterator[content_pb2.WriteContentRequest]:
            while True:
                item = requests.get()
                if item is done:
                    return
                yield item

        ref = f"cvmfs-pull-{digest}"
        responses = self.content.Write(gen(), metadata=self.metadata(), timeout=self.timeout * 10)
        try:
            requests.put(content_pb2.WriteContentRequest(action=content_pb2.STAT, ref=ref, total=size, expected=digest))
            status = next(responses)
            offset = status.offset
            sent = 0
            for chunk in chunks:
                # Resume after an interrupted earlier write of the same ref: skip what containerd has.
                if sent + len(chunk) <= offset:
                    sent += len(chunk)
                    continue
                start = max(0, offset - sent)
                requests.put(
                    content_pb2.WriteContentRequest(
                        action=content_pb2.WRITE, ref=ref, offset=sent + start, data=chunk[start:]
                    )
                )
                next(responses)
                sent += len(chunk)
            requests.put(
                content_pb2.WriteContentRequest(
                    # offset must be where we are: containerd truncates on offset 0
                    action=content_pb2.COMMIT, ref=ref, total=size, offset=size, expected=digest,
                    labels=labels or {},
                )
            )
            next(responses)
        except grpc.RpcError as e:
            if e.code() == grpc.StatusCode.ALREADY_EXISTS:
                return False
            raise
        finally:
            try:
                requests.put_nowait(done)
            except queue.Full:
                pass
        return True

    def set_content_labels(self, digest: str, labels: dict[str, str]) -> None:
        info = content_pb2.Info(digest=digest, labels=labels)
        mask = field_mask_pb2.FieldMask(paths=[f"labels.{k}" for k in labels])
        self.content.Update(content_pb2.UpdateRequest(info=info, update_mask=mask), metadata=self.metadata(),
                            timeout=self.timeout)

    # -- snapshots (through containerd's metadata layer) ---------------------------

    def existing_snapshots(self, snapshotter: str, keys: list[str]) -> set[str]:
        """Which of `keys` exist, asked all at once (one round trip's wait instead of one each)."""
        calls = [(key, self.snapshots.Stat.future(snapshots_pb2.StatSnapshotRequest(snapshotter=snapshotter, key=key),
                                                  metadata=self.metadata(), timeout=self.timeout)) for key in keys]
        found = set()
        for key, call in calls:
            try:
                call.result()
                found.add(key)
            except grpc.RpcError as e:
                if e.code() != grpc.StatusCode.NOT_FOUND:
                    raise
        return found

    def stat_snapshot(self, snapshotter: str, key: str) -> bool:
        try:
            self.snapshots.Stat(snapshots_pb2.StatSnapshotRequest(snapshotter=snapshotter, key=key),
                                metadata=self.metadata(), timeout=self.timeout)
            return True
        except grpc.RpcError as e:
            if e.code() == grpc.StatusCode.NOT_FOUND:
                return False
            raise

    def prepare_snapshot(
        self, snapshotter: str, key: str, parent: str, labels: dict[str, str]
    ) -> list[mount_pb2.Mount] | None:
        """Mounts to unpack into, or None when the snapshot already exists (remote or earlier)."""
        try:
            resp = self.snapshots.Prepare(
                snapshots_pb2.PrepareSnapshotRequest(snapshotter=snapshotter, key=key, parent=parent, labels=labels),
                metadata=self.metadata(),
                timeout=self.timeout,
            )
        except grpc.RpcError as e:
            if e.code() == grpc.StatusCode.ALREADY_EXISTS:
                return None
            raise
        return list(resp.mounts)

    def commit_snapshot(self, snapshotter: str, name: str, key: str, labels: dict[str, str] | None = None) -> bool:
        """False when `name` already exists (another pull of a shared layer won the race)."""
        try:
            self.snapshots.Commit(
                snapshots_pb2.CommitSnapshotRequest(snapshotter=snapshotter, name=name, key=key, labels=labels or {}),
                metadata=self.metadata(),
                timeout=self.timeout,
            )
        except grpc.RpcError as e:
            if e.code() == grpc.StatusCode.ALREADY_EXISTS:
                return False
            raise
        return True

    def remove_snapshot(self, snapshotter: str, key: str) -> None:
        try:
            self.snapshots.Remove(snapshots_pb2.RemoveSnapshotRequest(snapshotter=snapshotter, key=key),
                                  metadata=self.metadata(), timeout=self.timeout)
        except grpc.RpcError as e:
            if e.code() != grpc.StatusCode.NOT_FOUND:
                raise

    # -- diff and images -----------------------------------------------------------

    def apply(self, media_type: str, digest: str, size: int, mounts: list[mount_pb2.Mount]) -> str:
        resp = self.diff.Apply(
            diff_pb2.ApplyRequest(
                diff=descriptor_pb2.Descriptor(media_type=media_type, digest=digest, size=size), mounts=mounts
            ),
            metadata=self.metadata(),
            timeout=self.timeout * 10,
        )
        return resp.applied.digest

    def put_image(self, name: str, media_type: str, digest: str, size: int, labels: dict[str, str]) -> None:
        image = images_pb2.Image(
            name=name,
            labels=labels,
            target=descriptor_pb2.Descriptor(media_type=media_type, digest=digest, size=size),
        )
        try:
            self.images.Create(images_pb2.CreateImageRequest(image=image), metadata=self.metadata(),
                               timeout=self.timeout)
        except grpc.RpcError as e:
            if e.code() != grpc.StatusCode.ALREADY_EXISTS:
                raise
            mask = field_mask_pb2.FieldMask(paths=["target", "labels"])
            self.images.Update(images_pb2.UpdateImageRequest(image=image, update_mask=mask),
                               metadata=self.metadata(), timeout=self.timeout)


def open_channel(address: str) -> grpc.Channel:
    return grpc.insecure_channel(
        f"unix:{address}",
        options=[("grpc.max_send_message_length", 16 << 20), ("grpc.max_receive_message_length", 16 << 20)],
    )


def unique_key_part() -> str:
    """Like containerd's unpacker: a unique prefix for the temporary extract key."""
    return f"{threading.get_ident() & 0xFFFF:x}-{uuid.uuid4().hex[:16]}"

"""The serving daemon's pull control socket (docs/DESIGN.md#pull-daemon).

`cvmfs-snapshotter pull` hands its request here (control.py has the protocol) and the
daemon runs the same pull code as the command would (pull.job.execute), with its imports and
a gRPC channel to containerd already warm. Pulls run on a pool of their own, apart from the
gRPC server's: containerd calls back into our snapshots service while a pull waits for it,
so the two must never wait for the same threads. A pull whose client goes away, or that
runs past the timeout, is cancelled at its next step and cleans up as a failed pull does
(extract snapshot removed, lease deleted).
"""

from __future__ import annotations

import json
import logging
import os
import queue
import socket
import threading
import time
from concurrent.futures import ThreadPoolExecutor
from dataclasses import dataclass, field
from pathlib import Path
from typing import TYPE_CHECKING

import grpc

from ..sockets import prepare_socket_path
from .control import HEARTBEAT, PROTOCOL, encode
from .request import PullFailure, PullRequest, network_env

if TYPE_CHECKING:
    from .containerd_client import ContainerdClient
    from .image import PublishedLookup

log = logging.getLogger(__name__)

REQUEST_LIMIT = 1 << 20  # bytes of the request line (the caller's environment is in it)
REQUEST_DEADLINE = 10.0  # seconds for the whole request line (the client sends it at once)
MAX_CONNECTIONS = 64  # connections served at once (each a thread); more are refused at once
LOG_LEVELS = ("debug", "info", "warning", "error")
MAX_CHANNELS = 8
_DONE = object()


@dataclass(eq=False)  # a job is itself, in sets
class _Job:
    req: PullRequest
    events: queue.Queue = field(default_factory=queue.Queue)
    cancelled: str | None = None  # why, once cancelled
    started: float | None = None
    rc: int = 1
    error: str | None = None
    channel: "_Channel | None" = None  # the shared channel this pull uses

    def cancel(self, why: str) -> None:
        if self.cancelled is None:
            self.cancelled = why


class _JobProgress:
    """pull.Progress's interface: lines go to the client; a cancelled job stops at its next step."""

    def __init__(self, job: _Job) -> None:
        self.job = job

    def say(self, text: str) -> None:
        self.check()
        self.job.events.put({"say": text})

    def check(self) -> None:
        if self.job.cancelled is not None:
            raise PullFailure(f"{self.job.req.image}: {self.job.cancelled}")


class _ForwardLogs(logging.Handler):
    """The pull's log records (its worker thread's) to the client, as the command prints them."""

    def __init__(self, job: _Job, level: str) -> None:
        super().__init__(level.upper() if level in LOG_LEVELS else "WARNING")
        self.job = job
        self.thread = threading.get_ident()
        self.setFormatter(logging.Formatter("%(asctime)s %(levelname)s %(name)s: %(message)s"))

    def filter(self, record: logging.LogRecord) -> bool:
        return record.thread == self.thread

    def emit(self, record: logging.LogRecord) -> None:
        self.job.events.put({"log": self.format(record)})


@dataclass
class _Channel:
    address: str
    channel: grpc.Channel
    users: int = 0
    stale: bool = False


class PullControlServer:
    def __init__(self, path: Path, jobs: int = 4, timeout: float = 3600.0, max_waiting: int = 64,
                 published: "PublishedLookup | None" = None, max_connections: int = MAX_CONNECTIONS,
                 request_deadline: float = REQUEST_DEADLINE) -> None:
        self.path = Path(path)
        self.published = published  # the repositories' copies of tags (pull.image.pull_image)
        self.timeout = timeout
        self.max_waiting = max_waiting
        self.max_connections = max_connections
        self.request_deadline = request_deadline
        self._connections = 0
        self._pool = ThreadPoolExecutor(max_workers=jobs, thread_name_prefix="pull")
        self._lock = threading.Lock()
        self._jobs: set[_Job] = set()
        self._channels: dict[str, _Channel] = {}
        self._sock: socket.socket | None = None
        self._closing = False

    # -- life cycle ----------------------------------------------------------------

    def start(self) -> "PullControlServer":
        prepare_socket_path(self.path)
        sock = socket.socket(socket.AF_UNIX, socket.SOCK_STREAM)
        old_umask = os.umask(0o177)  # 0600 from its first moment: only root may ask for pulls
        try:
            sock.bind(str(self.path))
        finally:
            os.umask(old_umask)
        os.chmod(self.path, 0o600)
        sock.listen(64)
        self._sock = sock
        threading.Thread(target=self._accept, name="pull-accept", daemon=True).start()
        log.info("serving pulls on %s", self.path)
        return self

    def close(self, grace: float = 5.0) -> None:
        """Stop accepting, cancel running pulls and give them `grace` seconds to clean up."""
        self._closing = True
        if self._sock is not None:
            try:
                self._sock.shutdown(socket.SHUT_RDWR)  # wakes the blocked accept()
            except OSError:
                pass
            self._sock.close()
            try:
                os.unlink(self.path)
            except FileNotFoundError:
                pass
        with self._lock:
            jobs = list(self._jobs)
        for job in jobs:
            job.cancel("the snapshotter is stopping")
        self._pool.shutdown(wait=False, cancel_futures=True)
        deadline = time.monotonic() + grace
        while time.monotonic() < deadline:
            with self._lock:
                if not self._jobs:
                    break
            time.sleep(0.05)

    def _accept(self) -> None:
        """Never ends but at close: a connection it cannot serve is refused (the command then
        pulls in-process), whatever went wrong."""
        assert self._sock is not None
        while not self._closing:
            try:
                conn, _ = self._sock.accept()
            except OSError:
                if self._closing:
                    return
                time.sleep(0.1)  # e.g. EMFILE: do not spin
                continue
            try:
                self._hand_over(conn)
            except Exception:
                log.exception("pull control socket: a connection could not be handed over")
                _refuse_now(conn, "busy: the daemon could not take the connection")

    def _hand_over(self, conn: socket.socket) -> None:
        with self._lock:
            full = self._connections >= self.max_connections
            if not full:
                self._connections += 1
        if full:
            _refuse_now(conn, f"busy: {self.max_connections} connections open")
            return
        try:
            threading.Thread(target=self._serve_connection, args=(conn,), name="pull-conn", daemon=True).start()
        except BaseException as e:
            with self._lock:
                self._connections -= 1
            if not isinstance(e, RuntimeError):
                raise
            # "can't start new thread": a task limit (systemd TasksMax)
            log.warning("pull control socket: refusing a connection: %s", e)
            _refuse_now(conn, f"busy: cannot start a thread ({e})")

    # -- one connection ------------------------------------------------------------

    def _serve_connection(self, conn: socket.socket) -> None:
        try:
            with conn:
                self._serve(conn)
        finally:
            with self._lock:
                self._connections -= 1

    def _serve(self, conn: socket.socket) -> None:
        try:
            req = self._read_request(conn)
        except _Refused as e:
            _send(conn, {"refused": str(e)})
            return
        except OSError:
            return
        job = _Job(req)
        with self._lock:
            if len(self._jobs) >= self.max_waiting or self._closing:
                _send(conn, {"refused": "busy: too many pulls waiting"})
                return
            self._jobs.add(job)
        try:
            try:
                self._pool.submit(self._run, job)
            except RuntimeError as e:  # no thread for a worker (task limit), or closing
                job.cancel("refused")  # queued all the same: it ends at once when a worker takes it
                log.warning("pull control socket: refusing a pull: %s", e)
                _send(conn, {"refused": f"busy: cannot start a pull worker ({e})"})
                return
            if not _send(conn, {"accepted": True}):
                job.cancel("cancelled: the pull command went away")
            self._relay(conn, job)
        finally:
            with self._lock:
                self._jobs.discard(job)

    def _read_request(self, conn: socket.socket) -> PullRequest:
        line = _read_line(conn, REQUEST_LIMIT, time.monotonic() + self.request_deadline)
        try:
            msg = json.loads(line)
        except (ValueError, RecursionError):
            raise _Refused("request is not JSON") from None
        if not isinstance(msg, dict) or msg.get("v") != PROTOCOL:
            raise _Refused(f"protocol version {msg.get('v') if isinstance(msg, dict) else None!r} "
                           f"is not this daemon's ({PROTOCOL})")
        try:
            req = PullRequest.from_wire(msg.get("pull"))
        except (TypeError, ValueError) as e:
            raise _Refused(f"bad request: {e}") from None
        # requests reads proxies and CA bundles from the process environment: the daemon's
        # must be the caller's, else the pull runs in the caller's process.
        if network_env(req.env) != network_env(os.environ):
            raise _Refused("the caller's proxy/CA environment differs from the daemon's")
        return req

    def _relay(self, conn: socket.socket, job: _Job) -> None:
        """Progress to the client until the job is done; heartbeats while a step runs."""
        client_there = True
        while True:
            try:
                event = job.events.get(timeout=HEARTBEAT)
            except queue.Empty:
                event = {"alive": True}
            if event is _DONE:
                break
            if job.started is not None and time.monotonic() - job.started > self.timeout:
                job.cancel(f"timed out after {self.timeout:.0f}s")
            if client_there and not _send(conn, event):
                client_there = False
                job.cancel("cancelled: the pull command went away")
        seconds = time.monotonic() - (job.started or time.monotonic())
        log.info("pull of %s into namespace %s: %s in %.3fs", job.req.image, job.req.namespace,
                 "done" if job.rc == 0 else f"failed ({job.error})", seconds)
        if client_there:
            _send(conn, {"rc": job.rc, "error": job.error})

    def _run(self, job: _Job) -> None:
        job.started = time.monotonic()
        forward = _ForwardLogs(job, job.req.log_level)
        root = logging.getLogger()
        root.addHandler(forward)
        try:
            if job.cancelled is not None:
                raise PullFailure(f"{job.req.image}: {job.cancelled}")
            execute = _pull_code()
            execute(job.req, _JobProgress(job), client_factory=lambda a, ns: self._client(job, a, ns),
                    published=self.published)
            job.rc, job.error = 0, None
        except PullFailure as e:
            job.rc, job.error = e.rc, e.message
        except Exception as e:  # a bug: the client gets a message, the log the traceback
            log.exception("pull of %s failed", job.req.image)
            job.rc, job.error = 1, f"{job.req.image}: {e}"
        finally:
            root.removeHandler(forward)
            self._release(job)
            job.events.put(_DONE)

    # -- warm channels to containerd -------------------------------------------------

    def _client(self, job: _Job, address: str, namespace: str) -> ContainerdClient:
        from .containerd_client import ContainerdClient, open_channel

        with self._lock:
            entry = self._channels.get(address)
            if entry is None or entry.stale:
                entry = _Channel(address, open_channel(address))
                if len(self._channels) < MAX_CHANNELS or address in self._channels:
                    self._channels[address] = entry
                else:  # a caller naming many containerds: theirs, not cached
                    entry.stale = True
            entry.users += 1
            job.channel = entry
            return ContainerdClient(address, namespace, channel=entry.channel)

    def _release(self, job: _Job) -> None:
        """A pull that failed may have met a containerd that restarted: the next pull gets a
        fresh channel (this one may sit in reconnect back-off)."""
        entry, job.channel = job.channel, None
        if entry is None:
            return
        with self._lock:
            entry.users -= 1
            if job.rc != 0:
                entry.stale = True
            if entry.stale and self._channels.get(entry.address) is entry:
                del self._channels[entry.address]
            close = entry.stale and entry.users == 0
        if close:
            entry.channel.close()


def _pull_code():
    """pull.job.execute, imported at the first pull, not at start: requests, TLS, the registry
    client and containerd's API stubs are ~9 MB that a node which never pulls through us
    need not hold. Also what that first pull would import on its way (gRPC's client channel,
    the netrc lookup requests makes per request)."""
    import netrc  # noqa: F401
    import shlex  # noqa: F401

    from grpc import _channel  # noqa: F401

    from .job import execute

    return execute


class _Refused(Exception):
    pass


def _read_line(conn: socket.socket, limit: int, deadline: float) -> bytes:
    """One line, whole by `deadline`: a client that trickles its request does not keep a
    thread for longer (a per-recv timeout alone would let it)."""
    buf = bytearray()
    while True:
        left = deadline - time.monotonic()
        if left <= 0:
            raise _Refused("request not complete in time")
        conn.settimeout(left)
        try:
            chunk = conn.recv(65536)
        except TimeoutError:
            raise _Refused("request not complete in time") from None
        if not chunk:
            raise _Refused("request missing or too long")
        end = chunk.find(b"\n")
        if end >= 0:
            buf += chunk[:end + 1]
            return bytes(buf)
        buf += chunk
        if len(buf) > limit:
            raise _Refused("request missing or too long")


def _refuse_now(conn: socket.socket, why: str) -> None:
    """From the accept thread: never blocks (a full socket buffer drops the answer, the client
    then sees the connection closed, which also sends it in-process)."""
    try:
        conn.setblocking(False)
        try:
            drained = 0  # what the client sent: unread data would reset the connection
            while drained <= REQUEST_LIMIT:
                chunk = conn.recv(65536)
                if not chunk:
                    break
                drained += len(chunk)
        except OSError:
            pass
        conn.send(encode({"refused": why}))
    except OSError:
        pass
    finally:
        conn.close()


def _send(conn: socket.socket, message: dict) -> bool:
    try:
        conn.sendall(encode(message))
        return True
    except OSError:
        return False

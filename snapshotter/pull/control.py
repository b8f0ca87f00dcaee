"""The pull control socket's protocol and its client (docs/DESIGN.md#pull-daemon).

One JSON line from the client, `{"v": 1, "pull": {...PullRequest...}}`; then JSON lines from
the daemon: `{"accepted": true}` first, `{"say": text}` (progress, as the in-process pull prints it), `{"log": text}`
(the pull's log records at the asked level), `{"alive": true}` (every few seconds while a
step runs), and last `{"rc": N, "error": text|null}`. A first line `{"refused": reason}`
means "pull in-process instead" (another protocol version, the caller's proxy settings).

Standard library only: this is the `pull` command's hot path.
"""

from __future__ import annotations

import io
import json
import socket

from .request import PullRequest

PROTOCOL = 1
# Next to the default snapshots socket (config.DEFAULT_ADDRESS + ".ctl"; a test checks they agree).
DEFAULT_CONTROL = "/run/containerd-cvmfs-grpc/containerd-cvmfs-grpc.sock.ctl"
HEARTBEAT = 5.0  # seconds between the daemon's "alive" lines while a step runs
IDLE_TIMEOUT = 60.0  # the client gives up when the daemon says nothing for this long


class DaemonUnavailable(Exception):
    """No daemon pull: nobody listens, or the daemon refused; the reason says which."""


def encode(message: dict) -> bytes:
    return json.dumps(message, separators=(",", ":")).encode() + b"\n"


def pull_via_daemon(path: str, req: PullRequest, out: io.TextIOBase, idle_timeout: float = IDLE_TIMEOUT) -> int:
    """Have the daemon on `path` pull; its progress goes to `out`, errors as the in-process
    pull prints them. The exit code, or DaemonUnavailable before the pull started."""
    sock = socket.socket(socket.AF_UNIX, socket.SOCK_STREAM)
    try:
        sock.settimeout(idle_timeout)
        try:
            sock.connect(path)
            sock.sendall(encode({"v": PROTOCOL, "pull": req.to_wire()}))
        except OSError as e:  # no socket, nobody listening, not ours to use
            raise DaemonUnavailable(f"{path}: {e.strerror or e}") from None
        lines = sock.makefile("rb")
        first = True
        while True:
            try:
                line = lines.readline()
            except TimeoutError:
                return _fail(f"the snapshotter daemon on {path} said nothing for {idle_timeout:.0f}s; "
                             "it may be hung (its pull goes on or times out there)", out)
            except OSError:  # reset: the daemon died
                line = b""
            if not line:
                if first:
                    raise DaemonUnavailable(f"{path}: closed the connection without an answer")
                return _fail(f"the snapshotter daemon on {path} went away before the pull finished "
                             "(stopped or crashed); pull again", out)
            try:
                msg = json.loads(line)
            except ValueError:
                return _fail(f"the snapshotter daemon on {path} answered garbage: {line[:80]!r}", out)
            if first:
                if "refused" in msg:
                    raise DaemonUnavailable(f"{path}: {msg['refused']}")
                first = False  # {"accepted": true}: from now on the pull is the daemon's
            elif "say" in msg:
                print(msg["say"], file=out, flush=True)
            elif "log" in msg:
                print(msg["log"], file=out, flush=True)
            elif "rc" in msg:
                if msg.get("error"):
                    print(f"cvmfs-snapshotter pull: {msg['error']}", file=out, flush=True)
                return int(msg["rc"])
    finally:
        sock.close()


def _fail(message: str, out: io.TextIOBase) -> int:
    print(f"cvmfs-snapshotter pull: {message}", file=out, flush=True)
    return 1

"""The pull control socket's protocol and its client (docs/DESIGN.md#pull-daemon).

One JSON line from the client, `{"v": 1, "pull": {...PullRequest...}}`; then JSON lines from
the daemon: `{"accepted": true}` first, `{"say": text}` (progress, as the in-process pull prints it), `{"log": text}`
(the pull's log records at the asked level), `{"alive": true}` (every few seconds while a
step runs), and last `{"rc": N, "error": text|null}`. A first line `{"refused": reason}`
means "pull in-process instead" (another protocol version, the caller's proxy settings, a
busy daemon); so does no first line within ANSWER_TIMEOUT.

Standard library only: this is the `pull` command's hot path.
"""

from __future__ import annotations

import io
import json
import os
import socket

from .request import PullRequest

PROTOCOL = 1
CONTROL_ENV = "CVMFS_SNAPSHOTTER_CONTROL"
# Next to the default snapshots socket (config.DEFAULT_ADDRESS + ".ctl"; a test checks they agree).
DEFAULT_CONTROL = "/run/containerd-cvmfs-grpc/containerd-cvmfs-grpc.sock.ctl"
# The snapshotter's config file (config.DEFAULT_CONFIG; a test checks they agree): its
# `control-address`, else its `address` + ".ctl", names the socket.
DEFAULT_CONFIG = "/etc/containerd-cvmfs-grpc/config.toml"
CONFIG_LIMIT = 1 << 20
HEARTBEAT = 5.0  # seconds between the daemon's "alive" lines while a step runs
IDLE_TIMEOUT = 60.0  # the client gives up when the daemon says nothing for this long
# Connecting, sending the request and the daemon's first answer: a daemon that cannot take
# the pull by then (hung, out of threads) is passed by, and the pull runs in-process.
ANSWER_TIMEOUT = 10.0


class DaemonUnavailable(Exception):
    """No daemon pull: nobody listens, or the daemon refused; the reason says which."""


class ControlConfigError(ValueError):
    """The snapshotter's config file, given with --config, cannot say where its socket is."""


def find_control(socket_arg: str | None, config_arg: str | None, env) -> tuple[str | None, str]:
    """(the control socket's path or None for "turned off", where that came from): --control-socket,
    else --config's file, else $CVMFS_SNAPSHOTTER_CONTROL, else the default config file (if
    there is one), else the default path."""
    if socket_arg:
        return socket_arg, "--control-socket"
    if config_arg:
        return _from_config(config_arg, explicit=True)
    if env.get(CONTROL_ENV):
        return env[CONTROL_ENV], f"${CONTROL_ENV}"
    if os.path.lexists(DEFAULT_CONFIG):
        return _from_config(DEFAULT_CONFIG, explicit=False)
    return DEFAULT_CONTROL, "the default"


def _from_config(path: str, explicit: bool) -> tuple[str | None, str]:
    """The serving daemon's rules (config.serve_config): `control-address` ("" for none), else
    `address` + ".ctl", else the default socket. A file that cannot be read is an error when
    given, else passed over (the default path, saying why)."""
    import tomllib

    from cvmfs_common.fsutil.bounded import read_regular

    try:
        data = tomllib.loads(read_regular(path, CONFIG_LIMIT, follow_symlinks=True).decode())
        for key in ("control-address", "address"):
            if key in data and not isinstance(data[key], str):
                raise ValueError(f"{key} must be a string")
    except (OSError, ValueError, RecursionError) as e:  # read_regular's message names the file
        why = str(e) if str(e).startswith(path) else f"{path}: {e}"
        if explicit:
            raise ControlConfigError(why) from None
        return DEFAULT_CONTROL, f"the default; the config file {why}"
    if "control-address" in data:
        return data["control-address"] or None, f"control-address in {path}"
    if "address" in data:
        return f"{data['address']}.ctl", f"address in {path} + .ctl"
    return DEFAULT_CONTROL, f"the default; {path} sets no address"


def encode(message: dict) -> bytes:
    return json.dumps(message, separators=(",", ":")).encode() + b"\n"


def pull_via_daemon(path: str, req: PullRequest, out: io.TextIOBase, idle_timeout: float = IDLE_TIMEOUT,
                    answer_timeout: float = ANSWER_TIMEOUT, first_line: str | None = None) -> int:
    """Have the daemon on `path` pull; its progress goes to `out` (after `first_line`, once the
    daemon took the pull), errors as the in-process pull prints them. The exit code, or
    DaemonUnavailable before the pull started."""
    sock = socket.socket(socket.AF_UNIX, socket.SOCK_STREAM)
    try:
        sock.settimeout(answer_timeout)
        try:
            sock.connect(path)
        except TimeoutError:  # a full backlog
            raise DaemonUnavailable(f"{path}: no answer within {answer_timeout:.0f}s") from None
        except OSError as e:  # no socket, nobody listening, not ours to use
            raise DaemonUnavailable(f"{path}: {e.strerror or e}") from None
        try:
            sock.sendall(encode({"v": PROTOCOL, "pull": req.to_wire()}))
        except TimeoutError:  # a daemon that reads nothing
            raise DaemonUnavailable(f"{path}: no answer within {answer_timeout:.0f}s") from None
        except OSError as e:  # closed on us: a busy daemon refuses before the request is read
            raise DaemonUnavailable(f"{path}: {_refusal(sock) or e.strerror or e}") from None
        lines = sock.makefile("rb")
        first = True
        while True:
            try:
                line = lines.readline()
            except TimeoutError:
                if first:
                    raise DaemonUnavailable(f"{path}: no answer within {answer_timeout:.0f}s") from None
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
                if not isinstance(msg, dict) or "refused" in msg:
                    raise DaemonUnavailable(f"{path}: {msg.get('refused') if isinstance(msg, dict) else msg!r}")
                first = False  # {"accepted": true}: from now on the pull is the daemon's
                sock.settimeout(idle_timeout)
                if first_line:
                    print(first_line, file=out, flush=True)
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


def _refusal(sock: socket.socket) -> str | None:
    """The reason in a refusal the daemon sent before it closed, if there is one."""
    try:
        sock.settimeout(1.0)
        msg = json.loads(sock.makefile("rb").readline(4096))
        return str(msg["refused"])
    except (OSError, ValueError, TypeError, KeyError):
        return None


def _fail(message: str, out: io.TextIOBase) -> int:
    print(f"cvmfs-snapshotter pull: {message}", file=out, flush=True)
    return 1

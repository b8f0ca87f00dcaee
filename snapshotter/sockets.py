"""Unix socket paths the daemon listens on (the gRPC socket, the pull control socket): claim a
path without stealing it from a live process."""

from __future__ import annotations

import os
import socket
import stat
from pathlib import Path


class SocketInUse(RuntimeError):
    pass


def prepare_socket_path(path: Path) -> None:
    """Create parent dirs and replace a stale socket; refuse to steal a live one."""
    path.parent.mkdir(parents=True, exist_ok=True)
    try:
        st = os.lstat(path)
    except FileNotFoundError:
        return
    if not stat.S_ISSOCK(st.st_mode):
        raise SocketInUse(f"{path} exists and is not a socket; refusing to replace it")
    probe = socket.socket(socket.AF_UNIX, socket.SOCK_STREAM)
    try:
        probe.settimeout(1.0)
        probe.connect(str(path))
    except OSError:
        os.unlink(path)  # nobody listens: a crashed predecessor's socket
        return
    finally:
        probe.close()
    raise SocketInUse(f"another process is serving on {path}")

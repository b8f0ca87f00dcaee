"""Worker-node CernVM-FS clients inside the stratum 0's container.

The release manager's own mount (/var/spool/cvmfs/REPO/rdonly, CVMFS_SERVER_CACHE_MODE) shows
variant symlinks raw; a worker node's client expands them. `WorkerClient` mounts the repository
with `cvmfs2` as a node does (the release manager's client.conf less the server-cache settings,
a cache of its own under /w), optionally with tests/cvmfs/archshim.c preloaded to be an arm64
node or a client older than 2.11 (no CVMFS_ARCH). The shim is compiled on the host (gcc; the
container has none) for the container's glibc (both Debian 12)."""
from __future__ import annotations

import shutil
import subprocess
from pathlib import Path

import pytest

from .stratum0 import Stratum0

SHIM_SOURCE = Path(__file__).with_name("archshim.c")
SHIM_INSIDE = "/w/archshim.so"
# client.conf settings that belong to the release manager's mount, not a node's
_SERVER_ONLY = ("CVMFS_SERVER_CACHE_MODE", "CVMFS_CACHE_BASE", "CVMFS_RELOAD_SOCKETS", "CVMFS_TALK_SOCKET",
                "CVMFS_MOUNT_DIR")


def build_shim(s0: Stratum0) -> str:
    """The shim inside the container (built once per container); skips without a compiler."""
    if not (s0.host_w / "archshim.so").exists():
        cc = shutil.which("gcc") or shutil.which("cc")
        if cc is None:
            pytest.skip("no C compiler on the host to build tests/cvmfs/archshim.c "
                        "(an arm64 node's / a pre-2.11 client's view)")
        subprocess.run([cc, "-shared", "-fPIC", "-O2", "-o", str(s0.host_w / "archshim.so"), str(SHIM_SOURCE),
                        "-ldl"], check=True, capture_output=True)
    return SHIM_INSIDE


class WorkerClient:
    """`cvmfs2` mounting REPO at /w/wn-NAME/mnt; `env` goes to the client process."""

    def __init__(self, s0: Stratum0, repo: str, name: str, env: dict[str, str] | None = None) -> None:
        self.s0, self.repo, self.name, self.env = s0, repo, name, dict(env or {})
        self.dir = f"/w/wn-{name}"

    @property
    def mnt(self) -> str:
        return f"{self.dir}/mnt"

    def mount(self) -> "WorkerClient":
        drop = "|".join(_SERVER_ONLY)
        env = " ".join(f"{k}={v}" for k, v in self.env.items())
        self.s0.sh(f"mkdir -p {self.dir}/cache {self.mnt}\n"
                   f"grep -Ev '^({drop})=' /etc/cvmfs/repositories.d/{self.repo}/client.conf >{self.dir}/client.conf\n"
                   f"printf 'CVMFS_CACHE_BASE={self.dir}/cache\\nCVMFS_RELOAD_SOCKETS={self.dir}/cache\\n"
                   f"CVMFS_TALK_SOCKET={self.dir}/cvmfs_io\\nCVMFS_SHARED_CACHE=no\\nCVMFS_USER=root\\n' "
                   f">>{self.dir}/client.conf\n"
                   f"env {env} cvmfs2 -o config={self.dir}/client.conf,allow_other,fsname=cvmfs2 {self.repo} "
                   f"{self.mnt} >{self.dir}/mount.log 2>&1 || {{ cat {self.dir}/mount.log; exit 1; }}")
        return self

    def sh(self, script: str, **kw):
        return self.s0.sh(script, **kw)

    def readlink(self, rel: str) -> str:
        return self.sh(f"readlink '{self.mnt}/{rel}'").stdout.rstrip("\n")

    def read(self, rel: str) -> str:
        return self.sh(f"cat '{self.mnt}/{rel}'").stdout

    def umount(self) -> None:
        self.s0.sh(f"umount {self.mnt} 2>/dev/null || umount -l {self.mnt}", check=False)

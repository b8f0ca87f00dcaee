"""containerd 1.6 + cvmfs-snapshotter (and podman) INSIDE the stratum 0's container, reading the
repository through the client mount /var/spool/cvmfs/REPO/rdonly, as on a worker node.

The configuration is tests.fixtures.containerd's, with paths under /w (the host's file system:
overlay upper dirs cannot live on the container's overlay root)."""
from __future__ import annotations

import shlex
import uuid

from tests.fixtures.containerd import Containerd, CriOptions
from tests.fixtures.polling import wait_until

from .stratum0 import Stratum0


class InnerRuntime:
    def __init__(self, s0: Stratum0, name: str, repositories: list[str], stat_timeout: float = 5.0,
                 cri: CriOptions | None = None) -> None:
        self.s0 = s0
        self.dir = f"/w/{name}"
        self.host_dir = s0.host_w / name
        self.repositories = repositories
        self.stat_timeout = stat_timeout
        self.cri = cri

    @property
    def address(self) -> str:
        return f"{self.dir}/cd/containerd.sock"

    @property
    def sn_address(self) -> str:
        return f"{self.dir}/sn.sock"

    def start(self) -> "InnerRuntime":
        self.host_dir.mkdir(parents=True, exist_ok=True)
        cfg = Containerd(self.host_dir / "cd", self.sn_address, cri=self.cri).config_text()
        (self.host_dir / "cd" / "config.toml").write_text(cfg.replace(str(self.host_dir), self.dir))
        self.start_snapshotter()
        self.s0.sh(f"cd /; containerd --config {self.dir}/cd/config.toml >>{self.dir}/containerd.log 2>&1 &\n"
                   f"echo $! >{self.dir}/containerd.pid")
        wait_until(lambda: self.ctr("version", check=False).returncode == 0, 60, "containerd did not start",
                   interval=0.3, detail=lambda: self.log("containerd")[-3000:])
        return self

    def start_snapshotter(self) -> None:
        repos = " ".join(f"--repository {shlex.quote(r)}" for r in self.repositories)
        self.s0.sh(f"cd /; cvmfs-snapshotter --root {self.dir}/sn --address {self.sn_address} {repos} "
                   f"--stat-timeout {self.stat_timeout} >>{self.dir}/sn.log 2>&1 &\n"
                   f"echo $! >{self.dir}/sn.pid")
        wait_until(lambda: (self.host_dir / "sn.sock").exists(), 60, "cvmfs-snapshotter did not start",
                   interval=0.3, detail=lambda: self.log()[-3000:])

    def log(self, what: str = "cvmfs-snapshotter") -> str:
        name = "sn.log" if what == "cvmfs-snapshotter" else "containerd.log"
        try:
            return (self.host_dir / name).read_text(errors="replace")
        except FileNotFoundError:
            return ""

    def ctr(self, *args: str, check: bool = True, timeout: float = 300):
        return self.s0.c.exec(shlex.join(["ctr", "--address", self.address, *args]), check=check, timeout=timeout)

    def pull(self, ref: str, timeout: float = 300, daemon: bool = False):
        """In-process by default (the snapshotter's control socket is not at the default
        address); `daemon`: through that socket, as a node's `pull` runs."""
        via = ["--daemon", "--control-socket", f"{self.sn_address}.ctl"] if daemon else []
        return self.s0.c.exec(shlex.join(["cvmfs-snapshotter", "pull", "--containerd-address", self.address,
                                          "--plain-http", *via, ref]), timeout=timeout)

    def run(self, ref: str, *cmd: str, check: bool = True, timeout: float = 300):
        cid = f"t-{uuid.uuid4().hex[:12]}"
        return self.ctr("run", "--rm", "--snapshotter", "cvmfs-snapshotter", ref, cid, *cmd,
                        check=check, timeout=timeout)

    def stop(self) -> None:
        # Only the processes this runtime started (their pid files), tasks first.
        self.s0.sh(f"for t in $(ctr --address {self.address} tasks ls -q 2>/dev/null); do "
                   f"ctr --address {self.address} tasks kill -s SIGKILL $t; done; "
                   f"for p in containerd sn; do [ -f {self.dir}/$p.pid ] && kill $(cat {self.dir}/$p.pid) "
                   f"2>/dev/null; done; sleep 1; true", check=False)

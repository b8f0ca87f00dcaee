"""A real CernVM-FS 2.12 stratum 0 (release manager + client) in a Debian 12 container.

`find_distribution()` looks for CernVM-FS in this order and says why it gave up:
  1. `$CVMFS_TEST_SHARED_DIR/cvmfs`, then `<project>/../shared/cvmfs` (CI clones the project
     beside `shared/`): either the upstream build `cvmfs-2.12.0-debian12-amd64.tar.xz` with its
     `install.sh`, or CERN's packages `cvmfs_*.deb` + `cvmfs-server_*.deb` (+ `cvmfs-config-*`)
     for Debian 12 downloaded from CERN's CernVM-FS package repository;
  2. a `cvmfs_server` installed on the host is NOT used: the tier creates and destroys
     repositories (`mkfs`, overlay unions under /cvmfs, apache), which must not happen on a
     site's release manager; it is only named in the skip reason.
The distribution is copied into the cached bookworm root fs (its content stamp is part of the
cache key) and installed there; `Stratum0` then runs `cvmfs_config setup`, starts apache in an
exec of its own (an apache started in the same exec as `mkfs` fails mkfs's reload), and
`cvmfs_server mkfs -o root REPO` with the server.conf docs/cvmfs-backend.md recommends.

Inside the container the union /cvmfs/REPO, the client mount /var/spool/cvmfs/REPO/rdonly and
the storage /srv/cvmfs/REPO live on /w (the host's file system, bind-mounted over
/var/spool/cvmfs and /srv/cvmfs): overlayfs cannot take an upper dir on the container's own
overlay root.
"""
from __future__ import annotations

import os
import shlex
import shutil
import subprocess
from dataclasses import dataclass
from pathlib import Path

from tests.fixtures._proc import free_port
from tests.fixtures.rootfs import BASE_PACKAGES, PODMAN, PROJECT, RootfsContainer, RootfsSpec

TARBALL = "cvmfs-2.12.0-debian12-amd64.tar.xz"
DIST_IN_ROOTFS = "/opt/cvmfs-dist"

# What install.sh installs, plus the readers the tests use (getfacl, getcap, umoci for the
# reference trees) and the runtimes: Debian 12's containerd 1.6 / podman 4.3.
SERVER_PACKAGES = ("apache2", "attr", "acl", "psmisc", "lsof", "rsync", "fuse3", "libfuse3-3", "libfuse2",
                   "libssl3", "libuuid1", "libcap2", "libcap2-bin", "curl", "gawk", "sqlite3", "sudo",
                   "file", "xz-utils")
RUNTIME_PACKAGES = ("containerd", "runc", "podman", "fuse-overlayfs", "umoci", "skopeo", "crun")


class DistributionMissing(Exception):
    """No CernVM-FS to install; the message is the skip reason."""


@dataclass(frozen=True)
class Distribution:
    path: Path          # the directory copied into the root fs
    kind: str           # "tarball" | "debs"


def _candidates() -> list[Path]:
    found = []
    env = os.environ.get("CVMFS_TEST_SHARED_DIR")
    if env:
        found.append(Path(env) / "cvmfs")
    found.append(PROJECT.parent / "shared" / "cvmfs")
    return found


def find_distribution() -> Distribution:
    looked = []
    for d in _candidates():
        if (d / TARBALL).is_file() and (d / "install.sh").is_file():
            return Distribution(d, "tarball")
        if list(d.glob("cvmfs-server_*.deb")) and list(d.glob("cvmfs_*.deb")):
            return Distribution(d, "debs")
        looked.append(str(d))
    reason = (f"no CernVM-FS distribution ({TARBALL} + install.sh, or CERN's cvmfs_*.deb + "
              f"cvmfs-server_*.deb) in: {', '.join(looked)}; set CVMFS_TEST_SHARED_DIR")
    if shutil.which("cvmfs_server"):
        reason += (" (the host's cvmfs_server is not used: the tier makes and removes repositories, "
                   "which must not happen on a real release manager)")
    raise DistributionMissing(reason)


def bookworm_spec(dist: Distribution) -> RootfsSpec:
    if dist.kind == "tarball":
        install = f"bash {DIST_IN_ROOTFS}/install.sh /"
    else:
        # cvmfs-config-* is optional (the tier's repositories bring their own keys)
        install = (f"apt-get install -y -qq --no-install-recommends $(ls {DIST_IN_ROOTFS}/cvmfs-config*.deb "
                   f"2>/dev/null) {DIST_IN_ROOTFS}/cvmfs_*.deb {DIST_IN_ROOTFS}/cvmfs-server_*.deb")
    return RootfsSpec(
        "bookworm", BASE_PACKAGES + SERVER_PACKAGES + RUNTIME_PACKAGES,
        setup=(install, "cvmfs_server --help >/dev/null 2>&1 || command -v cvmfs_server",
               # apache as the stratum 0's web server; the tests start it themselves
               "a2enmod headers expires proxy proxy_http >/dev/null 2>&1 || true"),
        copy_in=((str(dist.path), DIST_IN_ROOTFS),))


# server.conf additions as docs/cvmfs-backend.md recommends (plus xattrs, which it names).
SERVER_CONF = {
    "CVMFS_IGNORE_XDIR_HARDLINKS": "true",
    "CVMFS_AUTOCATALOGS": "true",
    "CVMFS_AUTO_TAG": "false",
    "CVMFS_GARBAGE_COLLECTION": "true",
    "CVMFS_FILE_MBYTE_LIMIT": "8192",
    "CVMFS_FORCE_REMOUNT_WARNING": "false",
    "CVMFS_INCLUDE_XATTRS": "true",
}


class Stratum0:
    """The running stratum 0: `sh()` runs a shell script inside, `mkfs()` makes a repository."""

    def __init__(self, container: RootfsContainer) -> None:
        self.c = container
        self.repos: list[str] = []
        self.port = free_port()

    @property
    def host_w(self) -> Path:
        return self.c.host_w

    def sh(self, script: str, *, check: bool = True, timeout: float = 600, env: dict[str, str] | None = None,
           detach: bool = False):
        return self.c.exec("set -e\n" + script, check=check, timeout=timeout, env=env, detach=detach)

    def host_view(self, inside: str) -> Path:
        """`inside` (a path in the container, its mounts included) as the host sees it."""
        pid = subprocess.run([*PODMAN, "inspect", "-f", "{{.State.Pid}}", self.c.name], check=True,
                             capture_output=True, text=True).stdout.strip()
        return Path(f"/proc/{pid}/root") / inside.lstrip("/")

    def boot(self) -> "Stratum0":
        # /w is the host's file system: the unions' scratch dirs and the storage live there.
        self.sh("for d in spool srv; do mkdir -p /w/cvmfs-$d; done\n"
                "mkdir -p /var/spool/cvmfs /srv/cvmfs\n"
                "mount --bind /w/cvmfs-spool /var/spool/cvmfs\n"
                "mount --bind /w/cvmfs-srv /srv/cvmfs\n"
                "cvmfs_config setup >/w/cvmfs-setup.log 2>&1 || { cat /w/cvmfs-setup.log; exit 1; }")
        # Host network: apache on a free loopback port of its own, not :80, so that two tiers
        # (or a web server of the machine's) never meet; mkfs -w gives clients that URL.
        self.sh(f"echo 'Listen 127.0.0.1:{self.port}' >/etc/apache2/ports.conf\n"
                "a2dissite 000-default >/dev/null")
        self.start_apache()
        return self

    def url(self, repo: str) -> str:
        return f"http://127.0.0.1:{self.port}/cvmfs/{repo}"

    def start_apache(self) -> None:
        # An exec of its own: apache started in the same exec as mkfs fails mkfs's reload.
        self.sh(f"service apache2 start >/dev/null\n"
                f"for i in $(seq 50); do curl -s -o /dev/null http://127.0.0.1:{self.port}/ && exit 0; sleep 0.2; done\n"
                "exit 1")

    def mkfs(self, repo: str, conf: dict[str, str] | None = None) -> "Repository":
        self.sh(f"cvmfs_server mkfs -o root -w {self.url(repo)} {repo} >/w/mkfs-{repo}.log 2>&1 || "
                f"{{ tail -40 /w/mkfs-{repo}.log; exit 1; }}", timeout=300)
        lines = "".join(f"{k}={v}\n" for k, v in (conf if conf is not None else SERVER_CONF).items())
        self.sh(f"cat >> /etc/cvmfs/repositories.d/{repo}/server.conf <<'EOF'\n{lines}EOF")
        self.repos.append(repo)
        return Repository(self, repo)


@dataclass
class Repository:
    s0: Stratum0
    name: str

    @property
    def root(self) -> str:
        return f"/cvmfs/{self.name}"

    @property
    def client(self) -> str:
        """The FUSE client mount: what a worker node's /cvmfs/NAME is."""
        return f"/var/spool/cvmfs/{self.name}/rdonly"

    def server(self, *args: str, check: bool = True, timeout: float = 600):
        return self.s0.sh("cvmfs_server " + shlex.join(args) + " 2>&1", check=check, timeout=timeout)

    def revision(self) -> int:
        """The published revision (the manifest's S field)."""
        out = self.s0.sh(f"grep -a '^S' /srv/cvmfs/{self.name}/.cvmfspublished | head -1").stdout
        return int(out.strip()[1:])

    def in_transaction(self) -> bool:
        return "in transaction" in self.server("list").stdout.split(self.name, 1)[1].splitlines()[0]

    def check(self) -> str:
        """`cvmfs_server check`: raises when it finds a problem."""
        return self.server("check", self.name, timeout=900).stdout

    def objects(self) -> int:
        return int(self.s0.sh(f"find /srv/cvmfs/{self.name}/data -type f | wc -l").stdout)

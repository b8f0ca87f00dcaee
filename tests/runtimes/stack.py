"""containerd + cvmfs-snapshotter (+ dockerd) inside a newer Debian's root fs, configured with
exactly the files docs/snapshotter.md shows (docs/containerd/).

Everything runs at its production path: the config in /etc/containerd/config.toml, the
snapshotter with its defaults (socket in /run/containerd-cvmfs-grpc, root in
/var/lib/containerd-cvmfs-grpc), containerd on /run/containerd/containerd.sock. The state dirs
are bind mounts of dirs under /w (the host's file system): overlayfs cannot be an upper dir
on the container's own overlay root."""
from __future__ import annotations

import json
import os
import shlex
import subprocess
import uuid
from dataclasses import dataclass
from pathlib import Path

from cvmfs_common.repo.paths import RepositoryLayout
from tests.fixtures.rootfs import SID, TRIXIE, RootfsContainer, RootfsSpec
from tests.fixtures.tree import LISTING_COMMAND, RUNTIME_MOUNTS, compare_trees, parse_listing

DOCS = Path(__file__).resolve().parents[2] / "docs"
CONFIG_V2 = DOCS / "containerd" / "config-v2.toml"
CONFIG_V3 = DOCS / "containerd" / "config-v3.toml"
# The least a site writes: the proxy plugin (+ containerd 2's unpack_config), no label settings.
CONFIG_V2_MINIMAL = DOCS / "containerd" / "config-v2-minimal.toml"
CONFIG_V3_MINIMAL = DOCS / "containerd" / "config-v3-minimal.toml"
# containerd 2.3 (LTS) is not in Debian: its release binaries, unpacked in front of the root fs' own.
CONTAINERD23_TARBALL = "containerd-2.3.4-linux-amd64.tar.xz"
DIST_IN_CONTAINER = "/opt/containerd-dist"
HOSTS_TOML = DOCS / "containerd" / "hosts.toml"
DAEMON_JSON = DOCS / "containerd" / "daemon.json"
# The placeholders the documented hosts.toml uses for a registry and its mirror.
HOSTS_SERVER = "https://registry.example.org:5000"
HOSTS_MIRROR = "http://mirror.example.org:5000"

SNAPSHOTTER = "cvmfs-snapshotter"
SN_SOCKET = "/run/containerd-cvmfs-grpc/containerd-cvmfs-grpc.sock"
CD_SOCKET = "/run/containerd/containerd.sock"
# Test-only settings, appended to the documented config (they add no table it has).
CONFIG_TEST_TAIL = """
[debug]
  level = "debug"
"""
# What `docker run` adds to every container's root.
DOCKER_RUNTIME_FILES = frozenset({"/.dockerenv", "/etc/hostname", "/etc/hosts", "/etc/mtab", "/etc/resolv.conf"})
STATE_DIRS = {"/var/lib/containerd": "containerd", "/var/lib/containerd-cvmfs-grpc": "sn-root",
              "/var/lib/docker": "docker"}


@dataclass(frozen=True)
class Runtime:
    """One release of the matrix: its root fs and the versions it must have."""
    release: str            # trixie | sid
    spec: RootfsSpec
    containerd: str         # "1.7" | "2.1"
    podman: str             # "5.4" | "5.8"
    config: Path            # the documented containerd config for it
    minimal: Path = CONFIG_V3_MINIMAL   # the least config for it
    tarball: str = ""       # containerd binaries put in front of Debian's (shared_containerd_dir())

    @property
    def major(self) -> int:
        return int(self.containerd.split(".")[0])

    @property
    def id(self) -> str:
        return f"{self.release}-containerd{self.containerd}"

    @property
    def podman_id(self) -> str:
        return f"{self.release}-podman{self.podman}"


TRIXIE_RT = Runtime("trixie", TRIXIE, "1.7", "5.4", CONFIG_V2, CONFIG_V2_MINIMAL)
SID_RT = Runtime("sid", SID, "2.1", "5.8", CONFIG_V3)
SID23_RT = Runtime("sid", SID, "2.3", "5.8", CONFIG_V3, tarball=CONTAINERD23_TARBALL)
RUNTIMES = (SID_RT, SID23_RT, TRIXIE_RT)
# One per root fs: what does not depend on the containerd in front (podman).
ROOTFS_RUNTIMES = tuple(r for r in RUNTIMES if not r.tarball)


def shared_containerd_dir() -> Path | None:
    """`../shared/containerd` next to the checkout (or next to the main checkout of a git
    worktree), or $CVMFS_TEST_CONTAINERD_DIST; None when absent."""
    if os.environ.get("CVMFS_TEST_CONTAINERD_DIST"):
        return Path(os.environ["CVMFS_TEST_CONTAINERD_DIST"])
    roots = [DOCS.parent]
    r = subprocess.run(["git", "-C", str(DOCS.parent), "rev-parse", "--path-format=absolute", "--git-common-dir"],
                       capture_output=True, text=True)
    if r.returncode == 0 and r.stdout.strip():
        roots.append(Path(r.stdout.strip()).parent)
    for root in roots:
        d = root.parent / "shared" / "containerd"
        if d.is_dir():
            return d
    return None


def hosts_toml(registry_url: str) -> str:
    """The documented hosts.toml for a plain-http loopback registry (its own mirror)."""
    text = HOSTS_TOML.read_text()
    assert HOSTS_SERVER in text and HOSTS_MIRROR in text, "docs/containerd/hosts.toml changed"
    return text.replace(HOSTS_SERVER, registry_url).replace(HOSTS_MIRROR, registry_url)


class Stack:
    """The snapshotter and containerd (and dockerd on demand) inside `c`."""

    def __init__(self, c: RootfsContainer, runtime: Runtime, repositories: list[str] = ("/w/repo",),
                 registries: list[str] = (), config: Path | None = None, capabilities: list[str] | None = None,
                 sandbox_image: str | None = None, snapshotter_args: str = "") -> None:
        self.c = c
        self.rt = runtime
        self.config = config or runtime.config
        self.repositories = list(repositories)
        self.registries = list(registries)   # "http://127.0.0.1:PORT": hosts.toml for each
        self.capabilities = capabilities     # the proxy plugin's `capabilities` (docs/kubernetes.md)
        self.sandbox_image = sandbox_image   # CRI's pinned sandbox (pause) image
        self.snapshotter_args = snapshotter_args

    # -- lifecycle -------------------------------------------------------------------
    def start(self) -> "Stack":
        if self.rt.tarball:
            # (no xz in a minbase root fs: Python's tarfile reads it)
            self.c.exec("python3 -c 'import sys, tarfile; tarfile.open(sys.argv[1]).extractall(sys.argv[2], "
                        f"filter=\"fully_trusted\")' {DIST_IN_CONTAINER}/{self.rt.tarball} /usr/local/bin")
        self.check_versions()
        binds = " && ".join(f"mkdir -p /w/{d} {p} && mount --bind /w/{d} {p}" for p, d in STATE_DIRS.items())
        self.c.exec(binds)
        self.write_file("/etc/containerd/config.toml", self.containerd_config())
        for url in self.registries:
            host = url.split("://", 1)[1]
            self.write_file(f"/etc/containerd/certs.d/{host}/hosts.toml", hosts_toml(url))
        self.start_snapshotter()
        self.start_containerd()
        self.wait_snapshotter_ready()
        return self

    def start_containerd(self) -> None:
        self.c.exec("echo $$ > /w/cd.pid; exec containerd --config /etc/containerd/config.toml "
                    ">> /w/containerd.log 2>&1", detach=True)
        self.wait("ctr version >/dev/null 2>&1", "containerd answering")

    def restart_containerd(self) -> None:
        """Stop containerd, write its config again (after a change of this Stack's settings),
        start it; running containers go on (their shims outlive containerd)."""
        self.c.exec("kill $(cat /w/cd.pid); "
                    "for i in $(seq 200); do kill -0 $(cat /w/cd.pid) 2>/dev/null || exit 0; sleep 0.1; done; exit 1")
        self.write_file("/etc/containerd/config.toml", self.containerd_config())
        self.start_containerd()
        self.wait_snapshotter_ready()

    def containerd_config(self) -> str:
        text = self.config.read_text()
        if self.capabilities is not None:
            header = f"[proxy_plugins.{SNAPSHOTTER}]\n"
            assert header in text, "the documented config no longer declares the proxy plugin"
            caps = json.dumps(self.capabilities)
            text = text.replace(header, f"{header}  capabilities = {caps}\n", 1)
        tail = CONFIG_TEST_TAIL
        if self.sandbox_image is not None:
            # Pods: the pause image from the loopback registry. This machine grants no
            # CAP_SYS_RESOURCE, so the pause container's oom_score_adj (-998) cannot be
            # lowered below containerd's own: CRI's option for such hosts clamps it.
            tail += (f'\n[plugins."io.containerd.cri.v1.images".pinned_images]\n'
                     f'  sandbox = "{self.sandbox_image}"\n'
                     '\n[plugins."io.containerd.cri.v1.runtime"]\n'
                     '  restrict_oom_score_adj = true\n')
        return text + tail

    def check_versions(self) -> None:
        for binary in ("containerd", "ctr"):
            out = self.c.exec(f"{binary} --version").stdout
            assert f" {self.rt.containerd}." in out or f" v{self.rt.containerd}." in out, out

    def write_file(self, path: str, text: str) -> None:
        self.c.exec(f"mkdir -p {shlex.quote(str(Path(path).parent))} && cat > {shlex.quote(path)} <<'__EOF__'\n"
                    f"{text}\n__EOF__")

    def start_snapshotter(self) -> None:
        repos = " ".join(f"--repository {shlex.quote(r)}" for r in self.repositories)
        self.c.exec(f"echo $$ > /w/sn.pid; exec cvmfs-snapshotter serve {repos} --log-level debug "
                    f"{self.snapshotter_args} "
                    f">> /w/snapshotter.log 2>&1", detach=True)
        self.wait(f"test -S {SN_SOCKET}", "snapshotter socket")

    def stop_snapshotter(self, signal: str = "TERM") -> None:
        self.c.exec(f"kill -{signal} $(cat /w/sn.pid); "
                    "for i in $(seq 200); do kill -0 $(cat /w/sn.pid) 2>/dev/null || exit 0; sleep 0.1; done; "
                    "exit 1")

    def restart_snapshotter(self, signal: str = "TERM") -> None:
        self.stop_snapshotter(signal)
        self.start_snapshotter()
        self.wait_snapshotter_ready()

    def wait_snapshotter_ready(self) -> None:
        # containerd re-dials a restarted proxy plugin with a back-off.
        self.wait(f"ctr snapshots --snapshotter {SNAPSHOTTER} ls >/dev/null 2>&1", "containerd → snapshotter")

    def wait(self, check: str, what: str, seconds: int = 60) -> None:
        r = self.c.exec(f"for i in $(seq {seconds * 5}); do {check} && exit 0; sleep 0.2; done; exit 1", check=False,
                        timeout=seconds + 30)
        if r.returncode:
            raise AssertionError(f"timed out waiting for {what}\n{self.logs()}")

    def logs(self, limit: int = 6000) -> str:
        out = []
        for name in ("snapshotter.log", "containerd.log", "dockerd.log"):
            p = self.c.host_w / name
            if p.exists():
                out.append(f"--- {name} (tail)\n" + p.read_text(errors="replace")[-limit:])
        return "\n".join(out)

    # -- clients -----------------------------------------------------------------------
    def sh(self, script: str, **kw):
        return self.c.exec(script, **kw)

    def ctr(self, args: str, namespace: str = "default", **kw):
        return self.c.exec(f"ctr -n {namespace} {args}", **kw)

    def our_pull(self, ref: str, args: str = "--hosts-dir /etc/containerd/certs.d", **kw):
        """Our pull, with the registry settings containerd uses (the documented hosts.toml)."""
        return self.c.exec(f"cvmfs-snapshotter pull {args} {shlex.quote(ref)}", **kw)

    def cri_pull(self, ref: str) -> str:
        script = ("import grpc\n"
                  "from cvmfs_api.cri.runtime.v1 import api_pb2, api_pb2_grpc\n"
                  f"ch = grpc.insecure_channel('unix:{CD_SOCKET}')\n"
                  "stub = api_pb2_grpc.ImageServiceStub(ch)\n"
                  f"r = stub.PullImage(api_pb2.PullImageRequest(image=api_pb2.ImageSpec(image={ref!r})), timeout=300)\n"
                  "print(r.image_ref)\n")
        return self.c.exec(f"/opt/venv/bin/python - <<'__EOF__'\n{script}__EOF__").stdout.strip()

    def docker_listing(self, ref: str) -> str:
        return self.sh(f"docker run --rm --network none {shlex.quote(ref)} " + shlex.join(LISTING_COMMAND)).stdout

    def listing(self, ref: str, namespace: str = "default") -> str:
        cid = f"t-{uuid.uuid4().hex[:10]}"
        return self.ctr(f"run --rm --snapshotter {SNAPSHOTTER} {shlex.quote(ref)} {cid} "
                        + shlex.join(LISTING_COMMAND), namespace=namespace).stdout

    def assert_tree(self, image, namespace: str = "default", listing: str | None = None,
                    runtime_files: frozenset[str] = frozenset()) -> None:
        """The container shows the image's exact tree (plus `runtime_files` the runtime adds)."""
        out = listing if listing is not None else self.listing(image.ref, namespace)
        problems = compare_trees(image.tree, parse_listing(out), ignore=RUNTIME_MOUNTS | runtime_files)
        assert not problems, "\n".join(problems)

    def snapshots(self, namespace: str = "default") -> list[list[str]]:
        out = self.ctr(f"snapshots --snapshotter {SNAPSHOTTER} ls", namespace=namespace).stdout
        return [line.split() for line in out.splitlines()[1:] if line.strip()]

    def served_from_repository(self) -> int:
        return (self.c.host_w / "snapshotter.log").read_text(errors="replace").count("served from")

    # -- docker --------------------------------------------------------------------------
    def start_dockerd(self) -> None:
        conf = json.loads(DAEMON_JSON.read_text())
        # No iptables or bridge in a test container: host network only.
        conf.update({"iptables": False, "ip6tables": False, "bridge": "none"})
        self.write_file("/etc/docker/daemon.json", json.dumps(conf, indent=2))
        self.c.exec(f"dockerd --containerd {CD_SOCKET} >> /w/dockerd.log 2>&1", detach=True)
        self.wait("docker info >/dev/null 2>&1", "dockerd")


def repo_in(stack_or_container) -> RepositoryLayout:
    """The repository at /w/repo inside the container, written from the host."""
    c = getattr(stack_or_container, "c", stack_or_container)
    root = c.host_w / "repo"
    root.mkdir(parents=True, exist_ok=True)
    return RepositoryLayout(root)

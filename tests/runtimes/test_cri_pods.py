"""Kubernetes 1.36 features through CRI, the way a kubelet asks (no kubelet): user-namespaced
pods (`hostUsers: false`) and image volumes, on containerd 2.1 (sid) and 2.3 (the LTS
binaries of ../shared/containerd in front of sid's), with runc, our snapshotter serving
the images from a local repository (/w/repo). Proof of "no download": the registry's
access log, with the published layers' blobs deleted from the registry.

The pause image is pushed to the loopback registry and named in containerd's config
(`pinned_images.sandbox`); pods use the host network."""
from __future__ import annotations

import os
import shlex
from pathlib import Path

import pytest

from cvmfs_api.cri.runtime.v1 import api_pb2 as cri
from tests.e2e.repo_writer import publish_layers
from tests.fixtures.images import Pusher, busybox_entries, host_arch
from tests.fixtures.layers import Layer
from tests.fixtures.oci_layout import ImageConfig, OciLayout, Platform
from tests.fixtures.tree import LISTING_SCRIPT, RUNTIME_MOUNTS, compare_trees, parse_listing

from .conftest import repo_in
from .cri import Cri, UserNs, install_noop_cni
from .stack import SID23_RT, SID_RT, Runtime, Stack

pytestmark = [pytest.mark.e2e, pytest.mark.runtimes]

# (stack_factory skips 2.3 with the reason when ../shared/containerd is absent)
CONTAINERDS = pytest.mark.parametrize("rt", [SID_RT, SID23_RT], ids=lambda r: r.id)
PAUSE = "test/pause"
# What a CRI container shows beyond the image (the runtime's files and mounts).
CRI_FILES = RUNTIME_MOUNTS | {"/etc/hostname", "/etc/hosts", "/etc/resolv.conf", "/dev/termination-log"}


def push_pause(reg, work: Path) -> str:
    """A pause image: busybox waiting for its end (SIGTERM ends it at once)."""
    layout = OciLayout(work / "pause-layout")
    cfg = ImageConfig(entrypoint=["/bin/sh", "-c", "trap 'exit 0' TERM INT; while :; do sleep 1; done"],
                      cmd=[], platform=Platform("linux", host_arch()))
    layout.tag("pause", layout.add_image([Layer.from_entries(busybox_entries())], cfg))
    Pusher(reg.host).copy(work / "pause-layout", "pause", PAUSE, "v1", fmt="oci")
    return f"{reg.host}/{PAUSE}:v1"


def cri_stack(stack_factory, rt: Runtime, reg, img, *, capabilities, work: Path, publish: bool = True,
              snapshotter_args: str = "") -> Stack:
    pause = push_pause(reg, work)

    def before(c) -> None:
        install_noop_cni(c)
        if publish:
            publish_layers(reg.host, img, repo_in(c), range(len(img.layers)))

    stack = stack_factory(rt, registries=[reg.url], before_start=before, capabilities=capabilities,
                          sandbox_image=pause, snapshotter_args=snapshotter_args)
    if publish:
        for digest in img.layers:
            reg.delete_blob_files(digest)  # a download attempt would now fail
    reg.clear_log()
    return stack


def layer_gets(reg, img) -> int:
    return sum(reg.blob_get_count(d) for d in img.layers)


def listing(prefix: str = "") -> str:
    """The tree listing (tree.py) of `prefix` (a mount point) or of /."""
    return LISTING_SCRIPT.replace("find / ", f"find {prefix or '/'} ")


def strip_prefix(out: str, prefix: str) -> str:
    lines = []
    for line in out.splitlines():
        parts = line.split("|", 7)
        if len(parts) == 8 and (parts[6] == prefix or parts[6].startswith(prefix + "/")):
            parts[6] = parts[6][len(prefix):] or "/"
            lines.append("|".join(parts))
    return "\n".join(lines)


def upper_dirs(stack: Stack) -> dict[str, Path]:
    """Active snapshots' upper dirs on the host, by snapshot key (k8s.io namespace)."""
    rows = stack.ctr("snapshots --snapshotter cvmfs-snapshotter ls", namespace="k8s.io").stdout.splitlines()[1:]
    keys = [r.split()[0] for r in rows if r.split() and r.split()[-1] == "Active"]
    out = {}
    for key in keys:
        mounts = stack.ctr(f"snapshots --snapshotter cvmfs-snapshotter mounts /x {shlex.quote(key)}",
                           namespace="k8s.io").stdout
        for opt in mounts.replace(",", " ").split():
            if opt.startswith("upperdir="):
                out[key] = stack.c.host_w / "sn-root" / Path(opt.split("=", 1)[1]).relative_to(
                    "/var/lib/containerd-cvmfs-grpc")
    return out


def tree_on_host(top: Path) -> dict[str, tuple[int, int]]:
    out = {}
    for dirpath, dirs, files in os.walk(top):
        for name in dirs + files:
            p = Path(dirpath, name)
            st = p.lstat()
            out["/" + str(p.relative_to(top))] = (st.st_uid, st.st_gid)
    return out


WRITES = "echo hi > /written.txt && echo more > /opt/app/by-container.txt && "


@CONTAINERDS
def test_user_namespaced_pod_runs_from_the_repository(rt, own_registry, stack_factory, tmp_path):
    reg, images = own_registry
    img = images.multilayer
    stack = cri_stack(stack_factory, rt, reg, img, capabilities=["remap-ids"], work=tmp_path)
    api = Cri(stack)
    try:
        assert api.pull(img.ref).startswith("sha256:")
        assert layer_gets(reg, img) == 0
        userns = UserNs()
        pod = api.run_pod("userns", userns)
        st, out = api.run(pod, "lister", img.ref, ["/bin/sh", "-c", WRITES + listing() + "; id"])
        assert st.exit_code == 0, out
        # Inside: the image's owners (0, 1000) and modes, the tree exact.
        problems = compare_trees(img.tree, parse_listing(out),
                                 ignore=CRI_FILES | {"/written.txt", "/opt/app/by-container.txt"})
        assert not problems, "\n".join(problems) + "\n" + stack.logs()
        assert "uid=0(root) gid=0(root)" in out
        # Outside: only what the container wrote is in its upper dir, with the mapped ids.
        uppers = upper_dirs(stack)
        (upper,) = [u for u in uppers.values() if (u / "written.txt").exists()]
        runtime_mountpoints = {p: (userns.uid, userns.gid) for p in
                               ("/etc", "/etc/hostname", "/etc/hosts", "/etc/resolv.conf")}
        assert tree_on_host(upper) == {
            **runtime_mountpoints,                                  # runc's bind mount targets
            "/written.txt": (userns.uid, userns.gid),
            "/opt": (userns.uid, userns.gid),                       # copied up: 0:0 in the image
            "/opt/app": (userns.uid + 1000, userns.gid + 1000),     # 1000:1000 in the image
            "/opt/app/by-container.txt": (userns.uid, userns.gid),
        }
        assert (upper.stat().st_uid, upper.stat().st_gid) == (userns.uid, userns.gid)
        # The repository's files kept their owners.
        app = repo_in(stack).layerfs(img.layers[0]) / "opt/app"
        assert (app.stat().st_uid, app.stat().st_gid) == (1000, 1000)
        assert layer_gets(reg, img) == 0
        assert "slow_chown" not in stack.logs() and "-remap" not in stack.logs()
        api.remove_pod(pod)
        # containerd's garbage collector removes the snapshots a little later.
        stack.wait(f"test -z \"$(ls /var/lib/containerd-cvmfs-grpc/idmap)\"", "the pod's idmapped lowers to go")
        assert "/var/lib/containerd-cvmfs-grpc/idmap/" not in stack.sh("cat /proc/self/mountinfo").stdout
    finally:
        api.close()

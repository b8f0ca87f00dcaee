"""Kubernetes 1.36 features through CRI, the way a kubelet asks (no kubelet): user-namespaced
pods (`hostUsers: false`) and image volumes, on containerd 2.1 (sid) and 2.3 (the LTS
binaries of ../shared/containerd in front of sid's), with runc, our snapshotter serving
the images from a local repository (/w/repo). Proof of "no download": the registry's
access log, with the published layers' blobs deleted from the registry.

The pause image is pushed to the loopback registry and named in containerd's config
(`pinned_images.sandbox`); pods get a network namespace from a no-op CNI plugin (cri.py)."""
from __future__ import annotations

import os
import shlex
import time
from pathlib import Path

import grpc
import pytest

from cvmfs_api.cri.runtime.v1 import api_pb2 as cri
from tests.e2e.repo_writer import publish_layers
from tests.fixtures.images import Pusher, busybox_entries, host_arch
from tests.fixtures.layers import Entry, Layer
from tests.fixtures.oci_layout import ImageConfig, OciLayout, Platform
from tests.fixtures.tree import LISTING_SCRIPT, RUNTIME_MOUNTS, compare_trees, parse_listing

from .cri import Cri, UserNs, install_noop_cni
from .stack import SID23_RT, SID_RT, Runtime, Stack, repo_in

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
        stack.wait("test -z \"$(ls /var/lib/containerd-cvmfs-grpc/idmap)\"", "the pod's idmapped lowers to go")
        assert "/var/lib/containerd-cvmfs-grpc/idmap/" not in stack.sh("cat /proc/self/mountinfo").stdout
    finally:
        api.close()


def push_big_image(reg, work: Path, files: int = 2000, size: int = 40_000):
    """busybox and a layer of `files` incompressible files (~80 MB: a Debian image's size)."""
    data = [Entry.dir("/data")] + [Entry.dir(f"/data/{d:02d}") for d in range(files // 100)]
    data += [Entry.file(f"/data/{i // 100:02d}/f{i}", os.urandom(size), 0o644, i % 3 * 1000, i % 3 * 1000)
             for i in range(files)]
    layers = [Layer.from_entries(busybox_entries()), Layer.from_entries(data)]
    layout = OciLayout(work / "big-layout")
    layout.tag("big", layout.add_image(layers, ImageConfig(platform=Platform("linux", host_arch()))))
    pusher = Pusher(reg.host)
    pusher.copy(work / "big-layout", "big", "test/big", "v1", fmt="oci")
    return pusher.describe("test/big", "v1", layer_tars=[layer.tar for layer in layers])


def start_cost(api: Cri, stack: Stack, img, userns: UserNs, name: str) -> tuple[int, float]:
    """(bytes written under the snapshotter's snapshots/, seconds) of one user-namespaced
    container's CreateContainer + StartContainer in a pod of its own; its tree checked."""
    pod = api.run_pod(name, userns)
    du = "du -sB1 /var/lib/containerd-cvmfs-grpc/snapshots | cut -f1"
    before = int(stack.sh(du).stdout)
    t0 = time.monotonic()
    cid = api.create(pod, "lister", img.ref, ["/bin/sh", "-c", listing()])
    api.start(cid)
    seconds = time.monotonic() - t0
    written = int(stack.sh(du).stdout) - before
    st = api.wait_exit(cid)
    out = api.output(pod, "lister")
    assert st.exit_code == 0, out[-3000:]
    problems = compare_trees(img.tree, parse_listing(out), ignore=CRI_FILES)
    assert not problems, "\n".join(problems[:20])
    return written, seconds


@CONTAINERDS
@pytest.mark.timeout(1800)
def test_userns_start_cost_against_containerds_chown(rt, registry_factory, stack_factory, tmp_path):
    """Bytes written and time per user-namespaced container start of an ~80 MB image served
    from the repository: idmapped lowers (remap-ids) vs containerd's chown of the root fs
    (no capability declared), plain and with overlay-metacopy. Times are printed, not asserted."""
    reg = registry_factory()
    img = push_big_image(reg, tmp_path)
    stack = cri_stack(stack_factory, rt, reg, img, capabilities=["remap-ids"], work=tmp_path)
    api = Cri(stack)
    try:
        api.pull(img.ref)
        rows = {"remap-ids: idmapped lowers": start_cost(api, stack, img, UserNs(100000, 100000), "ours")}
        stack.capabilities = []
        stack.restart_containerd()
        api.close()
        api = Cri(stack)
        rows["no capability: containerd's chown"] = start_cost(api, stack, img, UserNs(200000, 200000), "chown")
        stack.snapshotter_args = "--overlay-metacopy"
        stack.restart_snapshotter()
        stack.restart_containerd()  # a fresh connection to the restarted snapshotter
        api.close()
        api = Cri(stack)
        rows["no capability, overlay-metacopy"] = start_cost(api, stack, img, UserNs(300000, 300000), "metacopy")
        assert layer_gets(reg, img) == 0
    finally:
        api.close()
    print(f"\ncontainerd {rt.containerd}, ~80 MB image ({len(img.tree.entries)} paths): "
          "user-namespaced container start (CreateContainer + StartContainer)")
    for label, (written, seconds) in rows.items():
        print(f"  {label:36s} {written / 1e6:9.2f} MB written {seconds:7.2f} s")
    chown = rows["no capability: containerd's chown"][0]
    assert chown > 80e6  # the chown copied the image up
    assert rows["remap-ids: idmapped lowers"][0] < chown / 100
    assert rows["no capability, overlay-metacopy"][0] < chown / 5  # one xattr block per file


@CONTAINERDS
def test_image_volumes_from_the_repository_and_from_the_registry(rt, own_registry, stack_factory, tmp_path):
    """Kubernetes image volumes: the kubelet pulls the volume's image (PullImage), then CRI
    unpacks it through the runtime snapshotter and mounts it read-only into the container.
    One the repository holds costs no blob GET; one it lacks is pulled as usual."""
    reg, images = own_registry
    img, other = images.multilayer, images.tagged["2.0"]   # `other` is not in the repository
    stack = cri_stack(stack_factory, rt, reg, img, capabilities=None, work=tmp_path)
    api = Cri(stack)
    try:
        assert api.pull(img.ref).startswith("sha256:")
        assert api.pull(other.ref).startswith("sha256:")
        assert layer_gets(reg, img) == 0
        assert layer_gets(reg, other) == len(other.layers)
        pod = api.run_pod("volumes")
        mounts = [cri.Mount(container_path="/vol", image=cri.ImageSpec(image=img.ref), readonly=True),
                  cri.Mount(container_path="/other", image=cri.ImageSpec(image=other.ref), readonly=True)]
        script = f"{listing('/vol')}; echo ===; {listing('/other')}"
        st, out = api.run(pod, "reader", img.ref, ["/bin/sh", "-c", script], mounts=mounts)
        assert st.exit_code == 0, out[-3000:]
        vol, _, oth = out.partition("===")
        for image, text, prefix in ((img, vol, "/vol"), (other, oth, "/other")):
            problems = compare_trees(image.tree, parse_listing(strip_prefix(text, prefix)), ignore=frozenset())
            assert not problems, f"{prefix}:\n" + "\n".join(problems) + "\n" + stack.logs()
        assert layer_gets(reg, img) == 0
        assert layer_gets(reg, other) == len(other.layers)  # no second download for the volume
        api.remove_pod(pod)
    finally:
        api.close()


@CONTAINERDS
def test_image_volume_whose_snapshots_are_gone(rt, own_registry, stack_factory, tmp_path):
    """The volume's image is known to containerd but no longer unpacked in the snapshotter
    (its snapshots removed). CRI then unpacks it with containerd's client Unpack
    (pkg/rootfs ApplyLayerWithOpts): Prepare "extract-<n> <chainID>" with no label at all,
    and another key after ALREADY_EXISTS, so no snapshotter can serve it from elsewhere; it
    reads the blobs from the content store, which a pull served from the repository never
    filled. The mount fails with containerd's "not found"; a PullImage (the kubelet's, e.g.
    imagePullPolicy: Always) unpacks it again from the repository, and then it mounts."""
    reg, images = own_registry
    img = images.multilayer
    stack = cri_stack(stack_factory, rt, reg, img, capabilities=None, work=tmp_path)
    api = Cri(stack)
    try:
        api.pull(img.ref)
        sn = "ctr -n k8s.io snapshots --snapshotter cvmfs-snapshotter"
        stack.wait(f"for k in $({sn} ls | tail -n +2 | cut -d' ' -f1); do {sn} rm $k 2>/dev/null; done; "
                   f"test -z \"$({sn} ls | tail -n +2)\"", "the image's snapshots to go")
        pod = api.run_pod("volume")
        mounts = [cri.Mount(container_path="/vol", image=cri.ImageSpec(image=img.ref), readonly=True)]
        # The container's own image is another: its root fs must not unpack the volume's layers.
        pause = f"{reg.host}/{PAUSE}:v1"
        with pytest.raises(grpc.RpcError) as e:
            api.create(pod, "first", pause, ["/bin/true"], mounts=mounts)
        assert "failed to unpack image volume" in e.value.details() and "not found" in e.value.details(), e.value
        api.pull(img.ref)
        st, out = api.run(pod, "reader", pause, ["/bin/sh", "-c", listing("/vol")], mounts=mounts)
        assert st.exit_code == 0, out[-3000:]
        problems = compare_trees(img.tree, parse_listing(strip_prefix(out, "/vol")), ignore=frozenset())
        assert not problems, "\n".join(problems)
        assert layer_gets(reg, img) == 0
    finally:
        api.close()


@CONTAINERDS
@pytest.mark.timeout(1200)
def test_userns_on_a_fuse_repository(rt, registry_factory, stack_factory, tmp_path):
    """A repository on a FUSE mount that does not allow idmapping (as a CernVM-FS client's):
    with remap-ids declared the Prepare fails fast naming the capabilities to declare instead;
    with only-remap-ids containerd refuses user-namespaced pods; with no capability and
    overlay-metacopy, containerd's chown copies metadata only and the pod runs.
    fuse-overlayfs over the repository stands in for the CernVM-FS client."""
    reg = registry_factory()
    img = push_big_image(reg, tmp_path, files=300, size=20_000)   # no whiteouts: fuse-overlayfs keeps it exact
    pause = push_pause(reg, tmp_path)

    def before(c) -> None:
        install_noop_cni(c)
        publish_layers(reg.host, img, repo_in(c), range(len(img.layers)))
        c.exec("mkdir -p /w/fuse-repo && fuse-overlayfs -o lowerdir=/w/repo /w/fuse-repo && "
               "grep -q ' /w/fuse-repo fuse' /proc/self/mounts")

    stack = stack_factory(rt, registries=[reg.url], before_start=before, repositories=["/w/fuse-repo"],
                          capabilities=["remap-ids"], sandbox_image=pause)
    for digest in img.layers:
        reg.delete_blob_files(digest)
    reg.clear_log()
    api = Cri(stack)
    try:
        api.pull(img.ref)
        assert stack.served_from_repository() == len(img.layers)
        with pytest.raises(grpc.RpcError) as e:   # the pause image shares its busybox layer
            api.run_pod("fuse", UserNs())
        assert "cannot be idmapped" in e.value.details() and "only-remap-ids" in e.value.details(), e.value
        stack.capabilities = ["only-remap-ids"]
        stack.restart_containerd()
        api.close()
        api = Cri(stack)
        with pytest.raises(grpc.RpcError) as e:
            api.run_pod("refused", UserNs(300000, 300000))
        assert "slow_chown" in e.value.details(), e.value
        stack.capabilities = []
        stack.snapshotter_args = "--overlay-metacopy"
        stack.restart_snapshotter()
        stack.restart_containerd()
        api.close()
        api = Cri(stack)
        written, seconds = start_cost(api, stack, img, UserNs(400000, 400000), "metacopy")
        print(f"\ncontainerd {rt.containerd}, FUSE repository, {len(img.tree.entries)} paths, 6 MB: "
              f"containerd's chown with overlay-metacopy wrote {written / 1e6:.2f} MB in {seconds:.2f} s")
        assert written < 6e6 / 2
        assert sum(reg.blob_get_count(d) for d in img.layers) == 0
    finally:
        api.close()


@CONTAINERDS
def test_image_volume_in_a_user_namespaced_pod(rt, own_registry, stack_factory, tmp_path):
    """As the kubelet asks for a pod with hostUsers: false: the image volume's Mount carries
    the pod's mappings. The volume shows the image's owners inside, no blob GET."""
    reg, images = own_registry
    img = images.multilayer
    stack = cri_stack(stack_factory, rt, reg, img, capabilities=["remap-ids"], work=tmp_path)
    api = Cri(stack)
    try:
        api.pull(img.ref)
        userns = UserNs()
        pod = api.run_pod("userns-volume", userns)
        ns = userns.pb()
        mounts = [cri.Mount(container_path="/vol", image=cri.ImageSpec(image=img.ref), readonly=True,
                            uidMappings=list(ns.uids), gidMappings=list(ns.gids))]
        st, out = api.run(pod, "reader", img.ref, ["/bin/sh", "-c", listing("/vol")], mounts=mounts)
        assert st.exit_code == 0, out[-3000:]
        problems = compare_trees(img.tree, parse_listing(strip_prefix(out, "/vol")), ignore=frozenset())
        assert not problems, "\n".join(problems) + "\n" + stack.logs()
        assert layer_gets(reg, img) == 0
    finally:
        api.close()

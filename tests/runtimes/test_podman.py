"""podman runs images straight from the repository's podmanStore (docs/podman.md), as root and
rootless (HPC users), on podman 5.8 (sid), 5.4 (trixie) and, rootless, Debian 12's 4.3 in a
bookworm root fs of its own. The repository is written on the host by the publisher into the
container's /w; its files belong to the host's root, unmapped in a rootless user namespace.

/dev/fuse on these machines is 0600: the rootless cases open it up inside their own
container only (a privileged container has its own /dev), never on the host."""
from __future__ import annotations

import re
import shlex
import subprocess
import sys
from pathlib import Path

import pytest

from tests.fixtures.rootfs import BOOKWORM_PODMAN, RootfsSpec
from tests.fixtures.tree import LISTING_COMMAND, RUNTIME_MOUNTS, compare_trees, parse_listing

from .stack import ROOTFS_RUNTIMES, SID_RT

pytestmark = [pytest.mark.e2e, pytest.mark.runtimes]

PUBLISHER = Path(sys.executable).with_name("cvmfs-publisher")
PODMAN = "podman --cgroup-manager cgroupfs --events-backend file"
RUN = "run --rm --pull never --network none --ulimit nofile=1024:1024 --ulimit nproc=1024:1024"
# What podman adds to every container's root.
PODMAN_FILES = frozenset({"/etc/hostname", "/etc/hosts", "/etc/resolv.conf", "/etc/mtab", "/run"})
# The documented rootless setting (docs/podman.md): fuse-overlayfs for the store's layers.
MOUNT_PROGRAM = '[storage.options.overlay]\nmount_program = "/usr/bin/fuse-overlayfs"\n'

ROOTLESS = [(rt.spec, rt.podman_id) for rt in ROOTFS_RUNTIMES] + [(BOOKWORM_PODMAN, "bookworm-podman4.3")]


def publish(reg_host: str, image, host_w: Path) -> Path:
    """The publisher (this venv's) writes the repository with its podmanStore into /w/repo."""
    root = host_w / "repo"
    res = subprocess.run([str(PUBLISHER), "convert-image", image.ref, "--repository-root", str(root),
                          "--state-db", str(host_w / "publisher.db")], capture_output=True, text=True, timeout=600)
    assert res.returncode == 0, res.stdout + res.stderr
    assert (root / "podmanStore" / "overlay-images" / "images.json").exists()
    return root


def storage_conf(graphroot: str, runroot: str, mount_program: bool) -> str:
    text = (f'[storage]\ndriver = "overlay"\ngraphroot = "{graphroot}"\nrunroot = "{runroot}"\n\n'
            '[storage.options]\nadditionalimagestores = ["/w/repo/podmanStore"]\n')
    return text + ("\n" + MOUNT_PROGRAM if mount_program else "")


def write(c, path: str, text: str) -> None:
    c.exec(f"mkdir -p {shlex.quote(str(Path(path).parent))} && cat > {shlex.quote(path)} <<'__EOF__'\n{text}__EOF__")


def assert_tree(image, listing: str) -> None:
    problems = compare_trees(image.tree, parse_listing(listing), ignore=RUNTIME_MOUNTS | PODMAN_FILES)
    assert not problems, "\n".join(problems)


@pytest.mark.parametrize("spec, podman_id", [(rt.spec, rt.podman_id) for rt in ROOTFS_RUNTIMES],
                         ids=[rt.podman_id for rt in ROOTFS_RUNTIMES])
def test_root_podman_runs_from_podman_store(spec: RootfsSpec, podman_id, registry, standard_images,
                                            rootfs_factory):
    img = standard_images.multilayer
    c = rootfs_factory(spec)
    version = podman_id.rsplit("podman", 1)[1]
    assert f"version {version}." in c.exec("podman --version").stdout
    publish(registry.host, img, c.host_w)
    write(c, "/etc/containers/storage.conf", storage_conf("/w/graph", "/run/containers/storage", False))
    listed = c.exec(f"{PODMAN} images --format '{{{{.Repository}}}}:{{{{.Tag}}}} {{{{.ReadOnly}}}}'").stdout
    assert f"{img.host}/{img.name}:{img.tag} true" in listed, listed
    out = c.exec(f"{PODMAN} {RUN} {img.ref} " + shlex.join(LISTING_COMMAND)).stdout
    assert_tree(img, out)
    # Nothing of the image was copied into podman's own storage.
    assert not list((c.host_w / "graph").glob("overlay/*/diff/bin/busybox"))


@pytest.mark.parametrize("spec, podman_id", ROOTLESS, ids=[i for _, i in ROOTLESS])
def test_rootless_podman_runs_from_podman_store(spec: RootfsSpec, podman_id, registry, standard_images,
                                                rootfs_factory):
    # A umoci-built image: whiteouts (1.1 deletes /etc/motd), no opaque dir, nothing private
    # to another owner (see the known limits below).
    rootless_case(rootfs_factory, spec, podman_id, registry, standard_images.tagged["2.0"])


@pytest.mark.xfail(strict=True, reason="known limits of rootless podman on a repository written by "
                   "--backend local (docs/podman.md): fuse-overlayfs run by a user cannot read the "
                   "trusted.overlay.opaque xattr of converted opaque dirs, and a 0750 dir owned by an "
                   "unmapped uid is unreadable in the user namespace")
@pytest.mark.parametrize("rt", [SID_RT], ids=lambda r: r.podman_id)
def test_rootless_podman_known_limits_on_a_local_repository(rt, registry, standard_images, rootfs_factory):
    rootless_case(rootfs_factory, rt.spec, rt.podman_id, registry, standard_images.multilayer)


def rootless_case(rootfs_factory, spec: RootfsSpec, podman_id: str, registry, img) -> None:
    c = rootfs_factory(spec)
    version = podman_id.rsplit("podman", 1)[1]
    assert f"version {version}." in c.exec("podman --version").stdout
    publish(registry.host, img, c.host_w)
    # A user with subordinate ids, /dev/fuse usable inside this container only.
    c.exec("useradd -m -u 1500 tester && grep -q '^tester:' /etc/subuid && chmod 0666 /dev/fuse && "
           "mkdir -p /w/rootless /run/user/1500 && chown tester: /w/rootless /run/user/1500 && chmod 700 /run/user/1500")
    env = {"HOME": "/home/tester", "XDG_RUNTIME_DIR": "/run/user/1500", "USER": "tester"}
    user_conf = "/home/tester/.config/containers/storage.conf"
    # Why docs/podman.md asks for mount_program: with kernel overlay the image lists but
    # cannot run (its files belong to a uid the user namespace does not map).
    write(c, user_conf, storage_conf("/w/rootless/graph-kernel", "/run/user/1500/containers-kernel", False))
    c.exec("chown -R tester: /home/tester")
    listed = c.exec(f"{PODMAN} images", user="tester", env=env).stdout
    assert f"{img.host}/{img.name}" in listed, listed
    kernel = c.exec(f"{PODMAN} {RUN} {img.ref} true", user="tester", env=env, check=False)
    assert kernel.returncode != 0 and "mtab" in kernel.stderr, kernel.stderr
    # The documented setting.
    write(c, user_conf, storage_conf("/w/rootless/graph", "/run/user/1500/containers", True))
    out = c.exec(f"{PODMAN} {RUN} {img.ref} " + shlex.join(LISTING_COMMAND), user="tester", env=env).stdout
    # As root inside the user namespace; the store's files belong to the host's root, which
    # is unmapped there: they show as the overflow id, the tree otherwise exact.
    assert_tree_rootless(img, out)


_DIFFERS = re.compile(r"^differs (\S+): want <(.*)>, got <(.*)>$")
_OWNER = re.compile(r" \d+:\d+")


def assert_tree_rootless(image, listing: str) -> None:
    """The exact tree, except that every owner shows as the overflow id (65534)."""
    observed = parse_listing(listing)
    problems = []
    for p in compare_trees(image.tree, observed, ignore=RUNTIME_MOUNTS | PODMAN_FILES):
        m = _DIFFERS.match(p)
        if m and _OWNER.sub("", m[2]) == _OWNER.sub("", m[3]) and " 65534:65534" in m[3]:
            continue
        problems.append(p)
    assert not problems, "\n".join(problems)
    assert "/bin/busybox" in observed.entries

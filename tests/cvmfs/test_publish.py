"""`convert --backend cvmfs` through a real CernVM-FS 2.12 stratum 0, read back through the
client mount /var/spool/cvmfs/REPO/rdonly (what a worker node's /cvmfs/REPO is).

One repository for the module: the standard images plus an image with file capabilities,
an ACL and cross-directory hard links are published once, each image in its own run (the
seconds per image are printed); the tests then read what a client sees."""
from __future__ import annotations

import json
import os
import shlex
import time
from dataclasses import dataclass, field
from pathlib import Path

import pytest

from cvmfs_common.oci.digest import chain_ids
from cvmfs_common.repo.paths import RepositoryLayout
from tests.fixtures.images import BuiltImage, StandardImages
from tests.fixtures.registry import Registry
from tests.fixtures.tree import LISTING_SCRIPT, RUNTIME_MOUNTS, compare_trees, parse_listing
from tests.publisher.clirun import write_wishlist
from tests.publisher.repotree import flat_tree_problems, observed_tree

from .images import GETFACL_USER, push_attrs_image
from .runtime import InnerRuntime
from .publishing import IGNORE, convert, split_hardlinks
from .stratum0 import Repository, Stratum0

pytestmark = pytest.mark.e2e

REPO = "unpacked.publish.test"


@dataclass
class Published:
    s0: Stratum0
    repo: Repository
    images: dict[str, BuiltImage]
    seconds: dict[str, float] = field(default_factory=dict)
    revisions: list[int] = field(default_factory=list)
    rerun_output: str = ""
    rerun_revision: int = 0

    def client(self, rel: str = "") -> Path:
        """A path of the client mount, read from the host through the container's mount ns."""
        return self.s0.host_view(f"{self.repo.client}/{rel}".rstrip("/"))

    @property
    def layout(self) -> RepositoryLayout:
        return RepositoryLayout(self.client())


@pytest.fixture(scope="module")
def published(stratum0: Stratum0, registry: Registry, standard_images: StandardImages) -> Published:
    repo = stratum0.mkfs(REPO)
    attrs = push_attrs_image(registry.host, stratum0.host_w / "attrs-image")
    images = {"multilayer": standard_images.multilayer, "multilayer_docker": standard_images.multilayer_docker,
              **{f"tagged:{t}": img for t, img in standard_images.tagged.items()}, "attrs": attrs}
    p = Published(stratum0, repo, images)
    p.revisions.append(repo.revision())
    refs: list[str] = []
    for key, img in images.items():
        refs.append(f"{img.host}/{img.name}:{img.tag}")
        write_wishlist(stratum0.host_w / "publish.yaml", refs, repo=REPO)
        t0 = time.monotonic()
        out = convert(stratum0, repo, "/w/publish.yaml").stdout
        p.seconds[key] = time.monotonic() - t0
        assert "1 new" in out, out
        p.revisions.append(repo.revision())
    print("publish seconds per image (cvmfs backend, real stratum 0):",
          ", ".join(f"{k} {v:.1f}" for k, v in p.seconds.items()))
    p.rerun_output = convert(stratum0, repo, "/w/publish.yaml").stdout
    p.rerun_revision = repo.revision()
    return p


def test_revisions_per_image_and_a_resync_publishes_none(published: Published) -> None:
    # Each run publishes one new image, whose new layers are small: one revision, podman
    # store entries included (test_batch.py: the two units of a round with big layers).
    revs = published.revisions
    assert [b - a for a, b in zip(revs, revs[1:])] == [1] * len(published.images), revs
    assert f"0 new, 0 updated, {len(published.images)} unchanged" in published.rerun_output, published.rerun_output
    assert published.rerun_revision == revs[-1]
    assert not published.repo.in_transaction()


def test_server_check_is_clean(published: Published) -> None:
    out = published.repo.check()
    assert "no problems found" in out.lower() or "error" not in out.lower(), out


@pytest.mark.parametrize("key", ["multilayer", "tagged:1.1", "tagged:2.0"])
def test_flat_and_chains_through_the_client_mount(published: Published, key: str) -> None:
    img = published.images[key]
    lay = published.layout
    flat = observed_tree(lay.flat_dir(img.config_digest))
    assert split_hardlinks(img, flat, flat_tree_problems(img.tree, flat, IGNORE)) == []
    for n, chain in enumerate(chain_ids(img.diff_ids)):
        tree = observed_tree(lay.chain_dir(chain))
        assert not [p for p in tree.entries if "/.wh." in p], chain
        if n == len(img.diff_ids) - 1:
            assert split_hardlinks(img, tree, compare_trees(img.tree, tree, ignore=IGNORE)) == []
    link = lay.link_path(img.host, img.name, img.tag)
    target = os.path.normpath(link.parent / os.readlink(link))
    assert target == str(lay.flat_dir(img.config_digest))


def test_catalogs_where_design_puts_them(published: Published) -> None:
    out = published.repo.server("list-catalogs", published.repo.name).stdout
    listed = {line.strip().lstrip("─├└│ ").strip() for line in out.splitlines()}
    catalogs = {p.split()[0] if p else p for p in listed}
    lay = published.layout
    client = published.client()
    want = {"/.layers", "/.chains", "/.diffids", "/.flat", "/podmanStore"}
    for img in published.images.values():
        for digest in img.layers:
            d = lay.layer_dir(digest)
            want |= {"/" + str(d.relative_to(client)), "/" + str(d.parent.relative_to(client))}
        for diff in img.diff_ids:
            want.add("/" + str(lay.diffid_link(diff).parent.relative_to(client)))
        for chain in chain_ids(img.diff_ids):
            d = lay.chain_dir(chain)
            want |= {"/" + str(d.relative_to(client)), "/" + str(d.parent.relative_to(client))}
        d = lay.flat_dir(img.config_digest)
        want |= {"/" + str(d.relative_to(client)), "/" + str(d.parent.relative_to(client))}
    missing = sorted(w for w in want if w not in catalogs)
    assert not missing, f"no nested catalog at {missing}\n{out}"


def test_capabilities_acls_and_hardlinks_survive_to_the_client(published: Published) -> None:
    img = published.images["attrs"]
    s0, lay = published.s0, published.layout
    flat_inside = f"{published.repo.client}/" + str(lay.flat_dir(img.config_digest).relative_to(published.client()))
    chain_inside = f"{published.repo.client}/" + str(
        lay.chain_dir(chain_ids(img.diff_ids)[-1]).relative_to(published.client()))
    for root in (flat_inside, chain_inside):
        caps = s0.sh(f"getcap {root}/caps/ping").stdout
        assert "cap_net_raw" in caps and "ep" in caps.split("cap_net_raw")[1][:4], (root, caps)
        acl = s0.sh(f"getfacl -n {root}/acl/file").stdout
        assert GETFACL_USER in acl, (root, acl)
    tree = observed_tree(lay.flat_dir(img.config_digest))
    assert split_hardlinks(img, tree, flat_tree_problems(img.tree, tree, IGNORE)) == []
    for p in ("/x/a/same-dir", "/x/b/other-dir"):
        assert (lay.flat_dir(img.config_digest) / p.lstrip("/")).read_bytes() == b"linked across directories\n"


@pytest.fixture(scope="module")
def runtime(published: Published):
    rt = InnerRuntime(published.s0, "rt-publish", [published.repo.client]).start()
    yield rt
    rt.stop()


@pytest.mark.parametrize("key", ["multilayer", "tagged:1.1"])
def test_ctr_run_through_the_snapshotter_on_the_client_mount(published: Published, runtime: InnerRuntime,
                                                            registry: Registry, key: str) -> None:
    img = published.images[key]
    registry.clear_log()
    res = runtime.pull(img.ref)
    assert f"{len(img.layers)} layers from the repository, 0 downloaded" in res.stderr, res.stderr
    assert registry.blob_get_count() == 1  # the config
    out = parse_listing(runtime.run(img.ref, "/bin/sh", "-c", LISTING_SCRIPT).stdout)
    assert split_hardlinks(img, out, compare_trees(img.tree, out, ignore=RUNTIME_MOUNTS | IGNORE)) == []
    assert registry.blob_get_count() == 1


def test_a_published_tag_pulls_through_the_daemon_with_one_head(published: Published, runtime: InnerRuntime,
                                                                registry: Registry) -> None:
    """The daemon's pull reads the tag's manifest and config from .metadata through the client
    mount: one HEAD at the registry, no manifest and no blob GET."""
    img = published.images["tagged:2.0"]
    registry.clear_log()
    res = runtime.pull(img.ref, daemon=True)
    assert "(manifest and config from the repository)" in res.stderr, res.stderr
    assert "layers from the repository, 0 downloaded" in res.stderr, res.stderr  # (1.1 shares its lower layers)
    assert registry.manifest_get_count() == 0 and registry.blob_get_count() == 0
    assert [e.method for e in registry.access_log()] == ["HEAD"]
    out = parse_listing(runtime.run(img.ref, "/bin/sh", "-c", LISTING_SCRIPT).stdout)
    assert split_hardlinks(img, out, compare_trees(img.tree, out, ignore=RUNTIME_MOUNTS | IGNORE)) == []


@pytest.mark.parametrize("overlay", ["fuse-overlayfs", "kernel"])
def test_podman_runs_from_the_published_podman_store(published: Published, registry: Registry,
                                                     overlay: str) -> None:
    """The layer dirs lost their `.wh.` files at publish; an image with deletions is one
    podman layer, its top chain (docs/podman.md), so both overlays show exactly its tree."""
    from publisher.write import podman_format as fmt
    from tests.publisher.podmanenv import containers_conf, storage_conf

    img = published.images["multilayer"]
    store = json.loads((published.client("podmanStore") / "overlay-images/images.json").read_text())
    [entry] = [i for i in store if i["id"] == img.config_digest[7:]]
    assert entry["layer"] == fmt.chain_layer_id(chain_ids(img.diff_ids)[-1])
    work = published.s0.host_w / f"podman-{overlay}"
    work.mkdir(exist_ok=True)
    inside = Path(f"/w/podman-{overlay}")
    fuse = overlay == "fuse-overlayfs"
    (work / "storage.conf").write_text(storage_conf(inside / "graph", inside / "run",
                                                    [Path(published.repo.client) / "podmanStore"],
                                                    mount_program="/usr/bin/fuse-overlayfs" if fuse else None))
    (work / "containers.conf").write_text(containers_conf(inside / "tmp"))
    env = {"CONTAINERS_STORAGE_CONF": f"{inside}/storage.conf", "CONTAINERS_CONF": f"{inside}/containers.conf"}
    registry.clear_log()
    published.s0.sh(f"mkdir -p {inside}/tmp")
    info = published.s0.c.exec("podman info --format '{{.Store.GraphDriverName}} {{.Store.GraphOptions}}'",
                               env=env).stdout
    assert ("fuse-overlayfs" in info) == fuse, info
    out = published.s0.c.exec(
        f"podman --cgroup-manager cgroupfs --events-backend file run --rm --network none --pull never "
        f"{img.host}/{img.name}:{img.tag} /bin/sh -c \"{LISTING_SCRIPT}\"", env=env).stdout
    problems = compare_trees(img.tree, parse_listing(out), ignore=RUNTIME_MOUNTS | IGNORE | {"/etc", "/run"})
    assert split_hardlinks(img, parse_listing(out), problems) == [], "\n".join(problems)
    assert registry.blob_get_count() == 0


def test_publish_drops_the_layers_whiteout_files(published: Published) -> None:
    """CernVM-FS takes every `.wh.` name in the scratch area for an aufs whiteout: the
    raw whiteouts the publisher writes into layer dirs (docs/DESIGN.md#whiteouts) never reach a client,
    while the chains hold the result (which is why the snapshotter and podman use the
    chains of such images). If this starts failing, CernVM-FS changed: update
    docs/cvmfs-backend.md."""
    ml = published.images["multilayer"]
    second = published.layout.layerfs(ml.layers[1])
    assert (second / "data").is_dir() and (second / "opaque/new1").is_file()
    assert not os.path.lexists(second / "data/.wh.delete-me.txt")
    assert not os.path.lexists(second / "opaque/.wh..wh..opq")
    top = published.layout.chain_dir(chain_ids(ml.diff_ids)[-1])
    assert not os.path.lexists(top / "data/delete-me.txt") and not os.path.lexists(top / "opaque/old1")


@pytest.mark.parametrize("annotations", [True, False], ids=["cri-labels", "least-config"])
def test_cri_pull_through_the_snapshotter_on_the_client_mount(published: Published, registry: Registry,
                                                              annotations: bool) -> None:
    """Kubernetes' path: CRI PullImage (containerd's unpacker) takes every layer from the
    client mount; the socket is on /w, so the CRI client runs on the host. With CRI's default
    (no layer labels: the least config) containerd 1.6 names each layer by chainID only, and
    the published chains serve (the layer dirs hold raw whiteouts here)."""
    from tests.e2e.pulls import cri_pull
    from tests.fixtures.containerd import CriOptions

    img = published.images["tagged:2.0"]
    rt = InnerRuntime(published.s0, f"rt-cri-{annotations}", [published.repo.client],
                      cri=CriOptions(plain_http_registries=[registry.host], snapshot_annotations=annotations)).start()
    try:
        registry.clear_log()
        assert cri_pull(rt.host_dir / "cd" / "containerd.sock", img.ref).startswith("sha256:")
        assert all(registry.blob_get_count(d) == 0 for d in img.layers), registry.access_log()
        assert rt.log().count("served from") == len(img.layers), rt.log()[-3000:]
        out = parse_listing(rt.ctr("-n", "k8s.io", "run", "--rm", "--snapshotter", "cvmfs-snapshotter", img.ref,
                                   "cri-t", "/bin/sh", "-c", LISTING_SCRIPT).stdout)
        assert split_hardlinks(img, out, compare_trees(img.tree, out, ignore=RUNTIME_MOUNTS | IGNORE)) == []
    finally:
        rt.stop()


def test_the_client_mount_cannot_be_idmapped(published: Published) -> None:
    """Why `remap-ids` is not for CernVM-FS clients (docs/kubernetes.md): the snapshotter's
    idmapped mount of a layer dir on the client mount is refused, a local dir's is not."""
    img = published.images["multilayer"]
    layerfs = f"{published.repo.client}/{published.layout.layerfs(img.layers[0]).relative_to(published.client())}"
    script = (
        "import sys\n"
        "from snapshotter.idmap import IdMap, IdmapUnsupported, detach, idmapped_bind, userns_fd\n"
        "ns = userns_fd(IdMap(((0, 100000, 65536),), ((0, 100000, 65536),)))\n"
        "for src in sys.argv[1:]:\n"
        "    try:\n"
        "        idmapped_bind(src, '/w/idmap-target', ns)\n"
        "        detach('/w/idmap-target')\n"
        "        print(src, 'mounted')\n"
        "    except IdmapUnsupported as e:\n"
        "        print(src, 'refused', e.errno)\n"
    )
    published.s0.sh("mkdir -p /w/idmap-target /w/local-dir")
    out = published.s0.sh(f"cd / && /opt/venv/bin/python -c {shlex.quote(script)} {shlex.quote(layerfs)} "
                          "/w/local-dir").stdout
    assert f"{layerfs} refused 22" in out, out
    assert "/w/local-dir mounted" in out, out

"""The repository as DUCC writes it in 2026, through a real CernVM-FS 2.12 (stratum 0 + clients).

Variant public links: a multi-platform tag's `<registry>/<repo>:<tag>` holds
`../../.multiarch/$(CVMFS_ARCH:-amd64)/<registry>/<repo>:<tag>` verbatim; worker-node clients
(tests/cvmfs/client.py) expand it -- CernVM-FS 2.12 sets CVMFS_ARCH from `uname -m` (x86_64 here,
aarch64 on an arm64 node, through the alias links), a client before 2.11 leaves it unset and
takes the default. Repairs: `check` finds a flat without `.singularity.d` and lost chains, the
next `convert` repairs them, downloading only a layer whose deletions CernVM-FS dropped."""
from __future__ import annotations

import os
from dataclasses import dataclass
from pathlib import Path

import pytest

from cvmfs_common.oci.digest import chain_ids
from cvmfs_common.repo.paths import RepositoryLayout
from tests.fixtures.images import StandardImages, host_arch
from tests.fixtures.registry import Registry
from tests.fixtures.tree import compare_trees
from tests.publisher.clirun import write_wishlist
from tests.publisher.repotree import flat_tree_problems, observed_tree

from .client import WorkerClient, build_shim
from .publishing import IGNORE, convert, split_hardlinks
from .stratum0 import Repository, Stratum0

pytestmark = pytest.mark.e2e

REPO = "unpacked.ducc.test"
DB = "/w/state/ducc.db"
OTHER = "arm64" if host_arch() != "arm64" else "amd64"
UNAME = {"amd64": "x86_64", "arm64": "aarch64"}


@dataclass
class Repo:
    s0: Stratum0
    repo: Repository
    images: StandardImages

    @property
    def layout(self) -> RepositoryLayout:
        """The release manager's client mount, from the host (raw links: no expansion there)."""
        return RepositoryLayout(self.s0.host_view(self.repo.client))

    def cli(self, *args: str, check: bool = True):
        return self.s0.c.exec("cd / && cvmfs-publisher " + " ".join(args) + f" --backend cvmfs --repository-root "
                              f"{self.repo.root} --state-db {DB} 2>&1", check=check, timeout=900)


@pytest.fixture(scope="module")
def ducc(stratum0: Stratum0, registry: Registry, standard_images: StandardImages) -> Repo:
    repo = stratum0.mkfs(REPO)
    imgs = standard_images
    refs = [imgs.multiarch.ref, imgs.multilayer.ref, imgs.tagged["2.0"].ref]
    write_wishlist(stratum0.host_w / "ducc.yaml", refs, platforms=[f"linux/{host_arch()}", f"linux/{OTHER}"],
                   repo=REPO)
    out = convert(stratum0, repo, "/w/ducc.yaml", db=DB).stdout
    assert "0 failed" in out, out
    return Repo(stratum0, repo, imgs)


def _public(img) -> str:
    return f"{img.host}/{img.name}:{img.tag}"


def test_the_public_link_is_duccs_variant_link_verbatim(ducc: Repo) -> None:
    """What DUCC's GetVariantSymlinkTarget writes, byte for byte (the release manager shows
    the raw target); the single-platform images keep plain links."""
    native = ducc.images.multiarch.images[f"linux/{host_arch()}"]
    link = ducc.layout.link_path(native.host, native.name, "v1")
    assert os.readlink(link) == f"../../.multiarch/$(CVMFS_ARCH:-{host_arch()})/{_public(native)}"
    ml = ducc.images.multilayer
    ml_link = ducc.layout.link_path(ml.host, ml.name, ml.tag)
    assert os.path.normpath(ml_link.parent / os.readlink(ml_link)) == str(ducc.layout.flat_dir(ml.config_digest))
    mdir = ducc.layout.multiarch_dir  # (the tier's CernVM-FS build is amd64)
    assert os.readlink(mdir / "x86_64") == "amd64" and os.readlink(mdir / "aarch64") == "arm64:v8"
    assert ducc.cli("check").returncode == 0


@pytest.mark.parametrize("node", ["2.12 (CVMFS_ARCH=uname -m)", "arm64 node", "client before 2.11"])
def test_a_worker_node_client_resolves_the_public_link_to_its_architecture(ducc: Repo, node: str) -> None:
    img = ducc.images.multiarch
    public = _public(img.images[f"linux/{host_arch()}"])
    env, arch, var = {}, host_arch(), UNAME[host_arch()]
    if node == "arm64 node":
        env = {"LD_PRELOAD": build_shim(ducc.s0), "ARCHSHIM_MACHINE": "aarch64"}
        arch, var = "arm64", "aarch64"
    elif node == "client before 2.11":
        env = {"LD_PRELOAD": build_shim(ducc.s0), "ARCHSHIM_NO_CVMFS_ARCH": "1"}
        var = host_arch()  # the default after :-
    client = WorkerClient(ducc.s0, REPO, node.split()[0].replace(".", ""), env).mount()
    try:
        assert client.readlink(public) == f"../../.multiarch/{var}/{public}"
        assert client.read(f"{public}/platform") == arch + "\n"
        if arch == host_arch():
            # the public path is a root fs a runtime can enter (apptainer: tests/apptainer)
            out = client.sh(f"chroot '{client.mnt}/{public}' /bin/sh -c 'cat /platform; test -d /.singularity.d'")
            assert out.stdout == arch + "\n"
    finally:
        client.umount()


def test_check_finds_lost_dotfiles_and_chains_and_convert_repairs_them(ducc: Repo, registry: Registry) -> None:
    """After a cleanup: a flat without .singularity.d, a lost bottom chain (its layer has no
    deletions: rebuilt from the layer dir) and a lost top chain whose layer has deletions
    (CernVM-FS dropped its .wh. files at publish: that one layer is fetched again, the rest
    comes from the repository)."""
    ml, tagged = ducc.images.multilayer, ducc.images.tagged["2.0"]
    lay = RepositoryLayout(Path(ducc.repo.root))
    flat = lay.flat_dir(ml.config_digest)
    top, bottom = lay.chain_dir(chain_ids(ml.diff_ids)[-1]), lay.chain_dir(chain_ids(tagged.diff_ids)[0])
    ducc.repo.server("transaction", REPO)
    ducc.s0.sh(f"rm -rf {flat}/.singularity.d {top} {bottom}")
    ducc.repo.server("publish", REPO)

    report = ducc.cli("check", check=False)
    assert report.returncode == 1, report.stdout
    for what in (f"{os.path.relpath(flat, lay.root)} has no .singularity.d", f"chain {chain_ids(ml.diff_ids)[-1]}",
                 f"chain {chain_ids(tagged.diff_ids)[0]}"):
        assert what in report.stdout, report.stdout

    registry.clear_log()
    out = convert(ducc.s0, ducc.repo, "/w/ducc.yaml", db=DB).stdout
    assert "0 failed" in out, out
    client = ducc.layout
    for img in (ml, tagged):  # (the rebuilt chains, and the flats, hold exactly the image)
        tree = observed_tree(client.chain_dir(chain_ids(img.diff_ids)[-1]))
        assert split_hardlinks(img, tree, compare_trees(img.tree, tree, ignore=IGNORE)) == []
        ftree = observed_tree(client.flat_dir(img.config_digest))
        assert split_hardlinks(img, ftree, flat_tree_problems(img.tree, ftree, IGNORE)) == []
    assert (client.flat_dir(ml.config_digest) / ".singularity.d/env/10-docker2singularity.sh").is_file()
    gets = [e.path.rsplit("/", 1)[-1] for e in registry.access_log() if e.method == "GET" and "/blobs/" in e.path]
    assert sorted(gets) == sorted([ml.config_digest, tagged.config_digest, ml.layers[-1]]), gets
    assert ducc.cli("check").returncode == 0




def test_snapshotter_on_a_ducc_repository_without_chains(stratum0: Stratum0, registry: Registry,
                                                        standard_images: StandardImages) -> None:
    """DUCC's way on a real CernVM-FS: each layer `cvmfs_server ingest`ed from its tar (which
    keeps the `.wh.` files), layers.json without `whiteouts`, no `.chains`. The snapshotter,
    reading the client mount, serves the layer without whiteouts and containerd pulls the two
    that delete something; the container's tree is the image's."""
    import gzip
    import urllib.request

    from cvmfs_common.repo.metadata import LayerMetadata

    from tests.fixtures.tree import LISTING_SCRIPT, RUNTIME_MOUNTS, parse_listing
    from .runtime import InnerRuntime

    img = standard_images.multilayer
    repo = stratum0.mkfs("unpacked.duccraw.test")
    lay = RepositoryLayout(Path(repo.root))
    for i, digest in enumerate(img.layers):
        with urllib.request.urlopen(f"http://{img.host}/v2/{img.name}/blobs/{digest}") as r:
            tar = gzip.decompress(r.read())
        (stratum0.host_w / f"ducc-{i}.tar").write_bytes(tar)
        meta = LayerMetadata(img.diff_ids[i][7:], digest, img.diff_ids[i], len(tar), None)  # DUCC: no whiteouts
        (stratum0.host_w / f"ducc-{i}.json").write_bytes(meta.to_bytes())
    repo.server("transaction", repo.name)
    stratum0.sh("\n".join(f"mkdir -p {lay.layers_json(d).parent} && cp /w/ducc-{i}.json {lay.layers_json(d)}"
                          for i, d in enumerate(img.layers)))
    repo.server("publish", repo.name)
    for i, digest in enumerate(img.layers):
        rel = os.path.relpath(lay.layerfs(digest), lay.root)
        # -k: the tar's owners (without it 2.12 gives every file the repository owner, as DUCC's
        # call -- no -k -- does on unpacked.cern.ch: a matter of its layer dirs, not of whiteouts)
        repo.server("ingest", "-k", "-t", f"/w/ducc-{i}.tar", "-b", rel, repo.name)
    client = RepositoryLayout(stratum0.host_view(repo.client))
    assert os.path.lexists(client.layerfs(img.layers[1]) / "data/.wh.delete-me.txt")  # ingest keeps them
    assert not os.path.lexists(client.chains_dir)

    rt = InnerRuntime(stratum0, "rt-ducc", [repo.client]).start()
    try:
        registry.clear_log()
        res = rt.pull(img.ref)
        assert "1 layers from the repository, 2 downloaded" in res.stderr, res.stderr
        assert registry.blob_get_count(img.layers[0]) == 0
        out = parse_listing(rt.run(img.ref, "/bin/sh", "-c", LISTING_SCRIPT).stdout)
        # (a hard link of the served layer is split by CernVM-FS, those of pulled layers are kept)
        problems = compare_trees(img.tree, out, ignore=RUNTIME_MOUNTS | IGNORE)
        assert [p for p in problems if not p.startswith("hardlinks broken")] == [], problems
        for group in img.tree.hardlinks:
            assert len({out.entries[p].size for p in group}) == 1, group
        assert not os.path.lexists(client.layerfs(img.layers[0]) / "data/.wh.delete-me.txt")
        scans = [line.split("DUCC layer ", 1)[1] for line in rt.log().splitlines() if "entries looked at" in line]
        assert len(scans) == len(img.layers), rt.log()[-3000:]
        print("DUCC layers on the client mount:", "; ".join(s[:110] for s in scans))
    finally:
        rt.stop()

"""`--backend cvmfs` against the strict `cvmfs_server` stand-in (standin/cvmfs_server).

The stand-in refuses nested transactions, publish/abort without a transaction, abort
without -f, publish/abort while a process works or holds files under the repository,
and a transaction after the repository was written outside one; abort restores the
repository as it was. Every call is logged: the tests assert the exact sequence.
"""
from __future__ import annotations

import json
import re
import os
import signal
import subprocess
import time
from dataclasses import dataclass
from pathlib import Path

import pytest

from cvmfs_common.oci.digest import chain_ids
from cvmfs_common.repo.paths import RepositoryLayout
from cvmfs_common.repo.metadata import read_layers_json
from cvmfs_common.fsutil.atomic import remove_tree
from publisher.backend.catalogs import CATALOG_MARKER
from tests.fixtures.images import BuiltImage, StandardImages, busybox_entries, host_arch
from tests.fixtures.layers import Entry, Layer
from tests.fixtures.tree import compare_trees

from tests.publisher.clirun import CliResult, popen_cli, push_image, run_cli
from tests.fixtures.marks import requires_root
from tests.publisher.cvmfs_standin import STANDIN_DIR, CvmfsStandin
from tests.publisher.inflight import wait_for_work
from tests.publisher.repotree import flat_minus_chain, observed_tree

REPO = "unpacked.example.org"
OTHER_ARCH = "arm64" if host_arch() != "arm64" else "amd64"
HOST = f"linux/{host_arch()}"
IGNORE = frozenset({"/" + CATALOG_MARKER})  # a chain/flat dir is a catalog root (docs/DESIGN.md#catalogs)


def wishlist(path: Path, inputs: list[str], platforms: list[str] | None = None) -> Path:
    lines = ["version: 1", "user: cvmfsunpacker", f"cvmfs_repo: '{REPO}'",
             "output_format: 'https://registry.example.org/unpacked/$(image)'", "input:"]
    lines += [f"  - '{i}'" for i in inputs]
    if platforms:
        lines.append("platforms: [" + ", ".join(platforms) + "]")
    path.write_text("\n".join(lines) + "\n")
    return path


def convert(repo: Path, db: Path, *wishlists: Path, one_unit_mb: float | None = None) -> CliResult:
    extra = ["--one-unit-mb", str(one_unit_mb)] if one_unit_mb is not None else []
    return run_cli("convert", *wishlists, "--backend", "cvmfs", "--repository-root", repo, "--state-db", db,
                   "--jobs", "3", *extra)


def txn(name: str = REPO) -> list[list[str]]:
    return [["transaction", name], ["publish", name]]


def round_txn(name: str = REPO) -> list[list[str]]:
    """A round's new images, however many: their layers, then everything else of all of
    them (chains, flat dirs, names, podman store entries); one unit for both when the
    layers they miss are small (--one-unit-mb, default 8 MB)."""
    return [*txn(name), *txn(name)]


TEMPLATE = re.compile(r"/(\.platforms/[^/]+/)?\.chains/[0-9a-f]{2}/[0-9a-f]{64}="
                      r"/(\.platforms/[^/]+/)?\.flat/[0-9a-f]{2}/[0-9a-f]{64}")


def shape(calls: list[list[str]]) -> list[list[str]]:
    """The calls with each template spec checked and dropped."""
    out = []
    for argv in calls:
        if argv[:2] == ["transaction", "-T"]:
            assert TEMPLATE.fullmatch(argv[2]), argv
            argv = argv[:2] + argv[3:]
        out.append(argv)
    return out


# ------------------------------------------------------------------ the stand-in itself

def test_standin_refuses_what_cvmfs_server_refuses(cvmfs_standin: CvmfsStandin, tmp_path: Path) -> None:
    s = cvmfs_standin
    repo = s.mkfs(REPO)
    assert s.run("publish", REPO).returncode == 1                      # no transaction
    assert s.run("abort", "-f", REPO).returncode == 1                  # no transaction
    assert s.run("transaction", REPO).returncode == 0
    assert "already in a transaction" in s.run("transaction", REPO).stderr
    assert s.run("abort", REPO).returncode == 1                        # would prompt
    (repo / "new").write_text("x")
    sleeper = subprocess.Popen(["sleep", "60"], cwd=repo)
    try:
        r = s.run("publish", REPO)
        assert r.returncode == 1 and "working directory" in r.stderr
    finally:
        sleeper.kill()
        sleeper.wait()
    with open(repo / "new") as held:
        r = s.run("abort", "-f", REPO)
        assert r.returncode == 1 and "open file" in r.stderr and held.fileno() >= 0
    assert s.run("abort", "-f", REPO).returncode == 0
    assert not (repo / "new").exists()                                  # abort discards
    (repo / "sneaky").write_text("written outside a transaction")
    r = s.run("transaction", REPO)
    assert r.returncode == 1 and "+sneaky" in r.stderr
    assert s.run("list").stdout.strip() == f"{REPO} (stratum0 / local)"


# ------------------------------------------------------------------ a converted repository

@dataclass
class Published:
    standin: CvmfsStandin
    repo: Path
    db: Path
    images: StandardImages
    first: CliResult
    first_calls: list[list[str]]
    platforms: CliResult
    platform_calls: list[list[str]]
    rerun: CliResult
    rerun_calls: list[list[str]]

    @property
    def layout(self) -> RepositoryLayout:
        return RepositoryLayout(self.repo)


@pytest.fixture(scope="module")
def published(standard_images: StandardImages, tmp_path_factory: pytest.TempPathFactory):
    base = tmp_path_factory.mktemp("cvmfs")
    with pytest.MonkeyPatch.context() as mp:
        s = CvmfsStandin(base / "cvmfs", base / "standin-state")
        s.root.mkdir()
        mp.setenv("CVMFS_STANDIN_ROOT", str(s.root))
        mp.setenv("CVMFS_STANDIN_STATE", str(s.state))
        mp.setenv("PATH", f"{STANDIN_DIR}{os.pathsep}{os.environ.get('PATH', '')}")
        mp.delenv("CVMFS_SERVER", raising=False)
        repo = s.mkfs(REPO)
        host = standard_images.multilayer.host
        two = wishlist(base / "two.yaml", [f"{host}/test/multilayer:v1", f"{host}/test/tagged:1.1"])
        multi = wishlist(base / "multi.yaml", [f"{host}/test/multiarch:v1"], platforms=[HOST, f"linux/{OTHER_ARCH}"])
        db = base / "state" / "state.db"
        first = convert(repo, db, two, one_unit_mb=0)  # two units, whatever their size
        first_calls = s.commands()
        s.clear_log()
        platforms = convert(repo, db, multi)
        platform_calls = s.commands()
        s.clear_log()
        rerun = convert(repo, db, two, multi)
        rerun_calls = s.commands()
        # Nothing was written after the last publish: the stand-in opens a transaction.
        assert s.run("transaction", REPO).returncode == 0
        assert s.run("abort", "-f", REPO).returncode == 0
        yield Published(s, repo, db, standard_images, first, first_calls, platforms, platform_calls,
                        rerun, rerun_calls)


@requires_root
def test_exact_transaction_sequence_for_two_images(published: Published) -> None:
    assert published.first.rc == 0, published.first.stdout
    assert "2 images: 2 new" in published.first.stdout
    assert shape(published.first_calls) == [["list"], *round_txn()]
    assert [c for c in published.standin.calls() if c["rc"] != 0] == []


@requires_root
def test_unchanged_rerun_opens_no_transaction(published: Published) -> None:
    assert published.rerun.rc == 0, published.rerun.stdout
    assert "0 new, 0 updated, 4 unchanged" in published.rerun.stdout
    assert published.rerun_calls == [["list"]]


@requires_root
def test_tmp_is_never_published(published: Published) -> None:
    assert not os.path.lexists(published.layout.tmp_dir)
    assert {p.name for p in published.repo.iterdir()} == {
        ".layers", ".chains", ".diffids", ".flat", ".metadata", ".multiarch", "podmanStore",
        published.images.multilayer.host}


@requires_root
def test_layers_keep_raw_whiteouts(published: Published) -> None:
    lay = published.layout
    ml = published.images.multilayer
    metas = [read_layers_json(lay.layers_json(d)) for d in ml.layers]
    assert [m.whiteouts for m in metas] == ["none", "raw", "raw"]
    second = lay.layerfs(ml.layers[1])
    assert (second / "data/.wh.delete-me.txt").is_file()
    assert (second / "opaque/.wh..wh..opq").is_file()
    with pytest.raises(OSError):
        os.getxattr(second / "opaque", "trusted.overlay.opaque", follow_symlinks=False)
    for path in (second / "data/.wh.delete-me.txt", second / "opaque/.wh..wh..opq"):
        assert os.lstat(path).st_size == 0
    # umoci's whiteout of /etc/motd in tagged 1.1
    t11 = published.images.tagged["1.1"]
    top = read_layers_json(lay.layers_json(t11.layers[-1]))
    assert top.whiteouts == "raw"
    assert (lay.layerfs(t11.layers[-1]) / "etc/.wh.motd").is_file()


@requires_root
@pytest.mark.parametrize("name", ["multilayer", "tagged/1.1"])
def test_chains_apply_the_deletions(published: Published, name: str) -> None:
    img = published.images.multilayer if name == "multilayer" else published.images.tagged["1.1"]
    lay = published.layout
    for chain in chain_ids(img.diff_ids):
        tree = observed_tree(lay.chain_dir(chain))
        assert not [p for p in tree.entries if "/.wh." in p or p.startswith("/.wh.")], chain
    top = lay.chain_dir(chain_ids(img.diff_ids)[-1])
    assert compare_trees(img.tree, observed_tree(top), ignore=IGNORE) == []
    if name == "multilayer":
        for gone in ("data/delete-me.txt", "data/subdir", "opaque/old1", "opaque/sub", "links/dangling"):
            assert not os.path.lexists(top / gone), gone
    else:
        assert not os.path.lexists(top / "etc/motd")


@requires_root
@pytest.mark.parametrize("name", ["multilayer", "tagged/1.1"])
def test_flat_is_a_directory_copy_of_the_chain(published: Published, name: str) -> None:
    img = published.images.multilayer if name == "multilayer" else published.images.tagged["1.1"]
    lay = published.layout
    flat = lay.flat_dir(img.config_digest)
    assert flat.is_dir() and not flat.is_symlink()
    top = lay.chain_dir(chain_ids(img.diff_ids)[-1])
    # The chain copied in the round's second unit (grafts on a real CernVM-FS: tests/cvmfs),
    # plus .singularity.d; no template transaction (one per revision would bound nothing).
    assert flat_minus_chain(flat, top, hard_links=False) == []
    assert not any(argv[:2] == ["transaction", "-T"] for argv in published.first_calls)
    assert (flat / ".singularity.d/env/10-docker2singularity.sh").is_file()
    assert not os.path.lexists(top / ".singularity.d")
    link = lay.link_path(img.host, img.name, img.tag)
    assert not os.path.isabs(os.readlink(link)) and os.path.realpath(link) == str(flat)


@requires_root
def test_catalog_markers(published: Published) -> None:
    lay = published.layout
    want = [lay.layers_dir, lay.chains_dir, lay.diffids_dir, lay.flat_root, lay.podman_store]
    images = [published.images.multilayer, published.images.tagged["1.1"],
              *published.images.multiarch.images.values()]
    for img in images:
        for d in img.layers:
            want += [lay.layer_dir(d).parent, lay.layer_dir(d)]
        for diff in img.diff_ids:
            want.append(lay.diffid_link(diff).parent)
        for c in chain_ids(img.diff_ids):
            want += [lay.chain_dir(c).parent, lay.chain_dir(c)]
        want += [lay.flat_dir(img.config_digest).parent, lay.flat_dir(img.config_digest)]
    want.append(lay.for_platform("linux", OTHER_ARCH).podman_store)
    missing = [str(d) for d in want if not (d / CATALOG_MARKER).is_file()]
    assert missing == []
    for d in want:
        st = os.lstat(d / CATALOG_MARKER)
        assert (st.st_size, st.st_mode & 0o777, st.st_nlink) == (0, 0o644, 1)
    # never inside a layer's root fs (layerfs is what overlay and podman mount)
    for img in images:
        for d in img.layers:
            assert not os.path.lexists(lay.layerfs(d) / CATALOG_MARKER)
    # and nowhere else at the top
    assert not (published.repo / CATALOG_MARKER).exists()
    assert not (lay.metadata_root / CATALOG_MARKER).exists()


@requires_root
def test_podman_store_never_references_a_raw_whiteout_layer_dir(published: Published) -> None:
    """A real CernVM-FS drops the layer dirs' `.wh.` files at publish (the stand-in keeps
    them): no podman layer may stack a raw-whiteout layer dir. An image with one is a
    single podman layer whose diff is its top chain (deletions applied)."""
    from publisher.write import podman_format as fmt
    from publisher.write.podman_store import PodmanStore

    lay = published.layout
    stores = [PodmanStore(lay), PodmanStore(lay.for_platform("linux", OTHER_ARCH))]
    raw_layers = 0
    for store in stores:
        assert store.layers() and store.check() == []
        for entry in store.layers():
            target = (store.layer_dir(entry["id"]) / "diff").resolve(strict=True)
            if target.parent.parent == lay.chains_dir.resolve():  # .chains/<xx>/<hex>
                assert entry["id"] == fmt.chain_layer_id("sha256:" + target.name) and "parent" not in entry
                continue
            assert target.name == "layerfs" and target.parent.parent.parent == lay.layers_dir.resolve(), target
            meta = read_layers_json(target.parent / ".metadata" / "layers.json")
            assert meta.whiteouts in ("none", "overlay"), (entry["id"], meta.whiteouts)
    ml = published.images.multilayer
    for d in ml.layers:
        raw_layers += read_layers_json(lay.layers_json(d)).whiteouts == "raw"
    assert raw_layers, "the multilayer image must carry raw whiteouts for this test to mean anything"
    top = fmt.chain_layer_id(chain_ids(ml.diff_ids)[-1])
    [entry] = [i for i in stores[0].images() if i["id"] == ml.config_digest[7:]]
    assert entry["layer"] == top
    assert (stores[0].layer_dir(top) / "diff").resolve() == lay.chain_dir(chain_ids(ml.diff_ids)[-1]).resolve()


@requires_root
def test_two_platform_index_converted_for_both(published: Published) -> None:
    assert published.platforms.rc == 0, published.platforms.stdout
    assert shape(published.platform_calls) == [["list"], *txn()]  # small new layers: one unit
    lay = published.layout
    native = published.images.multiarch.images[HOST]
    other = published.images.multiarch.images[f"linux/{OTHER_ARCH}"]
    # The public link is DUCC's variant link, verbatim (a CernVM-FS client expands it; the
    # stand-in's plain directory cannot: tests/cvmfs reads it through a real client).
    link = lay.link_path(native.host, native.name, "v1")
    assert os.readlink(link) == f"../../.multiarch/$(CVMFS_ARCH:-{host_arch()})/{native.host}/test/multiarch:v1"
    expanded = link.parent / os.readlink(link).replace("$(CVMFS_ARCH:-amd64)", "x86_64").replace(
        "$(CVMFS_ARCH:-arm64)", "aarch64")
    assert (expanded / "platform").read_text() == host_arch() + "\n"
    plat = lay.for_platform("linux", OTHER_ARCH)
    assert plat.image_root == published.repo / ".multiarch" / ("arm64:v8" if OTHER_ARCH == "arm64" else OTHER_ARCH)
    assert os.readlink(plat.link_path(other.host, other.name, "v1")).startswith("../../../../.flat/")
    assert (plat.link_path(other.host, other.name, "v1") / "platform").read_text() == OTHER_ARCH + "\n"
    assert lay.manifest_json(native.host, native.name, "v1").is_file()
    assert plat.manifest_json(other.host, other.name, "v1").is_file()
    assert lay.manifest_json(other.host, other.name, "v1").read_bytes() != \
        plat.manifest_json(other.host, other.name, "v1").read_bytes()
    for img in (native, other):
        assert lay.flat_dir(img.config_digest).is_dir() and not lay.flat_dir(img.config_digest).is_symlink()
    images = json.loads((plat.podman_store / "overlay-images/images.json").read_text())
    assert [i["id"] for i in images] == [other.config_digest[7:]]


@requires_root
def test_check_knows_the_variant_link(published: Published, tmp_path: Path) -> None:
    """`check --backend cvmfs` expects the variant link of a multi-platform tag; a plain link
    there (or the variant link checked as a local repository) is reported."""
    args = ["--repository-root", published.repo, "--state-db", published.db]
    assert run_cli("check", "--backend", "cvmfs", *args).rc == 0
    local = run_cli("check", *args)
    assert local.rc == 1 and "check with --backend cvmfs" in local.stdout, local.stdout


def test_public_link_follows_the_platforms_asked_for(cvmfs_standin: CvmfsStandin, standard_images, registry,
                                                     tmp_path: Path) -> None:
    """A multi-platform tag published for the default platform only has a plain link; once a
    wishlist also asks for another platform the next convert makes it the variant link, and
    back when that platform is dropped -- no layer GET either way."""
    s = cvmfs_standin
    repo = s.mkfs(REPO)
    img = standard_images.multiarch
    native = img.images[HOST]
    one = wishlist(tmp_path / "one.yaml", [img.ref], platforms=[HOST])
    two = wishlist(tmp_path / "two.yaml", [img.ref], platforms=[HOST, f"linux/{OTHER_ARCH}"])
    db = tmp_path / "state.db"
    link = RepositoryLayout(repo).link_path(native.host, native.name, "v1")
    variant = f"../../.multiarch/$(CVMFS_ARCH:-{host_arch()})/{native.host}/test/multiarch:v1"
    assert convert(repo, db, one).rc == 0
    assert os.readlink(link).startswith("../../.flat/")
    registry.clear_log()
    assert convert(repo, db, two).rc == 0
    assert os.readlink(link) == variant
    res = convert(repo, db, one)
    assert res.rc == 0 and "0 layers fetched" in res.stdout, res.stdout  # the same image: only the link
    assert os.readlink(link).startswith("../../.flat/")
    assert all(registry.blob_get_count(d) == 0 for d in native.layers)
    checked = run_cli("check", "--backend", "cvmfs", "--repository-root", repo, "--state-db", db)
    assert checked.rc == 0, checked.stdout


# ------------------------------------------------------------------ failures

def _hand_image(host: str, work: Path, name: str, marker: str) -> BuiltImage:
    base = Layer.from_entries(busybox_entries())
    top = Layer.from_entries([Entry.dir("/srv"), Entry.file(f"/srv/{marker}", f"{marker}\n")])
    return push_image(host, work, name, "v1", [base, top])


@requires_root
def test_failing_image_fails_alone_and_the_others_are_published(cvmfs_standin: CvmfsStandin, registry_factory,
                                                               tmp_path: Path) -> None:
    reg = registry_factory()
    good = _hand_image(reg.host, tmp_path / "good", "test/good", "good")
    bad = _hand_image(reg.host, tmp_path / "bad", "test/bad", "bad")
    reg.delete_blob_files(bad.layers[-1])  # its second layer cannot be downloaded
    repo = cvmfs_standin.mkfs(REPO)
    wl = wishlist(tmp_path / "wl.yaml", [bad.ref, good.ref])
    res = convert(repo, tmp_path / "state.db", wl)
    assert res.rc == 1, res.stdout
    assert f"FAILED {bad.ref}" in res.stdout
    # the bad image fails inside the round's (one) unit; its work dir goes with .tmp/
    assert shape(cvmfs_standin.commands()) == [["list"], *txn()]
    assert cvmfs_standin.refusals() == []
    lay = RepositoryLayout(repo)
    top = lay.chain_dir(chain_ids(good.diff_ids)[-1])
    assert compare_trees(good.tree, observed_tree(top), ignore=IGNORE) == []
    assert flat_minus_chain(lay.flat_dir(good.config_digest), top, hard_links=False) == []
    assert not os.path.lexists(lay.link_path(bad.host, bad.name, bad.tag))
    assert not os.path.lexists(lay.layer_dir(bad.layers[-1]))
    assert not os.path.lexists(lay.tmp_dir)
    assert not cvmfs_standin.in_transaction(REPO)


def test_wishlist_repository_must_match_the_root(cvmfs_standin: CvmfsStandin, tmp_path: Path) -> None:
    repo = cvmfs_standin.mkfs("other.example.org")
    wl = wishlist(tmp_path / "wl.yaml", ["127.0.0.1:1/test/x:v1"])
    res = convert(repo, tmp_path / "state.db", wl)
    assert res.rc == 2
    assert cvmfs_standin.commands() == []


def test_a_leftover_tmp_is_removed_in_a_transaction_of_its_own(cvmfs_standin: CvmfsStandin, registry,
                                                                 tmp_path: Path) -> None:
    repo = cvmfs_standin.mkfs(REPO)
    assert cvmfs_standin.run("transaction", REPO).returncode == 0
    (repo / ".tmp" / "layer-x").mkdir(parents=True)         # e.g. published by an older publisher
    assert cvmfs_standin.run("publish", REPO).returncode == 0
    cvmfs_standin.clear_log()
    wl = wishlist(tmp_path / "wl.yaml", [f"{registry.host}/test/does-not-exist:nope"])
    res = convert(repo, tmp_path / "state.db", wl)
    assert res.rc == 1  # the tag is missing: no image transaction at all
    assert cvmfs_standin.commands() == [["list"], *txn()]
    assert not os.path.lexists(repo / ".tmp")


# ------------------------------------------------------------------ kill -9

@requires_root
def test_kill_9_mid_transaction_then_rerun(cvmfs_standin: CvmfsStandin, big_image: BuiltImage,
                                           tmp_path: Path) -> None:
    repo = cvmfs_standin.mkfs(REPO)
    args = ("convert-image", big_image.ref, "--backend", "cvmfs", "--repository-root", repo,
            "--state-db", tmp_path / "state.db", "--jobs", "2", "--one-unit-mb", "0")
    proc = popen_cli(*args, log=tmp_path / "killed.log")
    try:
        wait_for_work(repo / ".tmp", "layer-")
        proc.send_signal(signal.SIGKILL)
        proc.wait(timeout=30)
    finally:
        if proc.poll() is None:
            proc.kill()
            proc.wait()
    assert proc.returncode == -signal.SIGKILL, (tmp_path / "killed.log").read_text()
    assert cvmfs_standin.commands() == [["list"], ["transaction", REPO]]
    assert cvmfs_standin.in_transaction(REPO)
    cvmfs_standin.clear_log()

    again = run_cli(*args)
    assert again.rc == 0, again.stdout
    assert shape(cvmfs_standin.commands()) == [["list"], ["abort", "-f", REPO], *round_txn()]
    assert cvmfs_standin.refusals() == []
    assert not cvmfs_standin.in_transaction(REPO)
    lay = RepositoryLayout(repo)
    assert not os.path.lexists(lay.tmp_dir)
    top = lay.chain_dir(chain_ids(big_image.diff_ids)[-1])
    assert compare_trees(big_image.tree, observed_tree(top), ignore=IGNORE) == []
    assert flat_minus_chain(lay.flat_dir(big_image.config_digest), top, hard_links=False) == []
    assert read_layers_json(lay.layers_json(big_image.layers[-1])).whiteouts == "raw"


def test_markers_are_files_of_their_own(tmp_path: Path) -> None:
    from publisher.backend.catalogs import ensure_markers

    a, b, link = tmp_path / "a", tmp_path / "b", tmp_path / "link"
    a.mkdir()
    b.mkdir()
    link.symlink_to("a")
    assert ensure_markers([a, link]) == [a / CATALOG_MARKER]
    os.link(a / CATALOG_MARKER, b / CATALOG_MARKER)  # what a hard-link chain copy gives
    assert ensure_markers([a, b]) == [a / CATALOG_MARKER]  # a gets its own; b's is then alone
    assert os.lstat(a / CATALOG_MARKER).st_nlink == os.lstat(b / CATALOG_MARKER).st_nlink == 1
    assert ensure_markers([a, b]) == []


def test_markers_never_go_through_a_symlink_planted_in_the_repository(tmp_path: Path) -> None:
    from publisher.backend.catalogs import ensure_markers

    root, outside = tmp_path / "repo", tmp_path / "outside"
    (outside / "ab" / "cd").mkdir(parents=True)
    (root / ".layers").mkdir(parents=True)
    (root / ".layers" / "ab").symlink_to(outside / "ab")  # planted: .layers/ab leads out
    (root / ".chains" / "ef").mkdir(parents=True)
    made = ensure_markers([root / ".layers" / "ab" / "cd", root / ".chains" / "ef"], root)
    assert made == [root / ".chains" / "ef" / CATALOG_MARKER]
    assert not (outside / "ab" / "cd" / CATALOG_MARKER).exists()


@requires_root
def test_older_flat_entries_are_upgraded_in_a_transaction(cvmfs_standin: CvmfsStandin, standard_images,
                                                          tmp_path: Path) -> None:
    """A repository an older version published (.flat symlinks, copies without
    .singularity.d, no .multiarch, no format version) is brought up to date by the next
    convert: the format upgrade in one transaction marks the tags, one more publishes them."""
    s = cvmfs_standin
    repo = s.mkfs(REPO)
    imgs = [standard_images.multilayer, standard_images.tagged["1.1"]]
    wl = wishlist(tmp_path / "wl.yaml", [i.ref for i in imgs])
    db = tmp_path / "state.db"
    assert convert(repo, db, wl).rc == 0
    lay = RepositoryLayout(repo)
    flats = [lay.flat_dir(i.config_digest) for i in imgs]
    tops = [lay.chain_dir(chain_ids(i.diff_ids)[-1]) for i in imgs]
    assert s.run("transaction", REPO).returncode == 0
    remove_tree(flats[0])
    os.symlink(os.path.relpath(tops[0], flats[0].parent), flats[0])
    remove_tree(flats[1] / ".singularity.d")
    remove_tree(repo / ".multiarch")
    (repo / ".metadata/.format").unlink()
    assert s.run("publish", REPO).returncode == 0
    s.clear_log()

    res = convert(repo, db, wl)
    assert res.rc == 0, res.stdout
    # the upgrade; then, their layers all there, one unit for both images (and their podman entries)
    assert s.commands() == [["list"], *txn(), *txn()]
    assert "2 updated" in res.stdout, res.stdout
    assert s.refusals() == []
    for flat, top in zip(flats, tops):
        assert flat.is_dir() and not flat.is_symlink() and flat_minus_chain(flat, top, hard_links=False) == []
        assert (flat / CATALOG_MARKER).is_file()
    assert (repo / ".multiarch").is_dir()
    assert not os.path.lexists(lay.tmp_dir)
    s.clear_log()
    again = convert(repo, db, wl)
    assert again.rc == 0 and s.commands() == [["list"]]  # now current: no transaction


@requires_root
def test_older_podman_entries_stacking_raw_layer_dirs_are_upgraded(cvmfs_standin: CvmfsStandin, standard_images,
                                                                   tmp_path: Path) -> None:
    """An older version stacked an image's raw-whiteout layer dirs in podmanStore (deleted
    files show on a real CernVM-FS): the next convert publishes that tag again, in chain form."""
    from publisher.write import podman_format as fmt
    from publisher.write.podman_store import PodmanStore

    from tests.publisher.testrepo import podman_image

    s = cvmfs_standin
    repo = s.mkfs(REPO)
    ml, plain = standard_images.multilayer, standard_images.tagged["1.1"]
    wl = wishlist(tmp_path / "wl.yaml", [ml.ref, plain.ref])
    db = tmp_path / "state.db"
    assert convert(repo, db, wl).rc == 0
    lay = RepositoryLayout(repo)
    store = PodmanStore(lay)
    chain_layer = fmt.chain_layer_id(chain_ids(ml.diff_ids)[-1])
    [entry] = [i for i in store.images() if i["id"] == ml.config_digest[7:]]
    assert entry["layer"] == chain_layer
    assert s.run("transaction", REPO).returncode == 0
    old = podman_image(lay, ml.host, ml.name, ml.manifest_digest, entry["names"], "raw")
    store.add_image(old)  # what the older version wrote: per layer
    remove_tree(lay.tmp_dir)  # the store's work dirs were there (the backend removes it before publish)
    assert s.run("publish", REPO).returncode == 0
    assert not (store.layer_dir(chain_layer)).exists()
    assert any("whiteouts raw" in p for p in store.check())
    checked = run_cli("check", "--repository-root", repo, "--state-db", db)
    problems = [l for l in checked.stdout.splitlines() if "PROBLEM" in l]
    assert checked.rc != 0 and any("whiteouts raw" in l for l in problems), checked.stdout
    assert any(f"has top layer {fmt.layer_ids(ml.diff_ids)[-1]}, not {chain_layer}" in l for l in problems)
    s.clear_log()

    res = convert(repo, db, wl)
    assert res.rc == 0, res.stdout
    assert s.commands() == [["list"], *txn()]  # only the image with raw layers; its layers are there
    [entry] = [i for i in store.images() if i["id"] == ml.config_digest[7:]]
    assert entry["layer"] == chain_layer and store.check() == []
    assert set(fmt.layer_ids(ml.diff_ids)).isdisjoint(l["id"] for l in store.layers())
    checked = run_cli("check", "--repository-root", repo, "--state-db", db)
    assert checked.rc == 0 and ": 0 problems" in checked.stdout, checked.stdout
    s.clear_log()
    assert convert(repo, db, wl).rc == 0 and s.commands() == [["list"]]  # now current: no transaction


def test_diffid_links_of_an_older_repository_in_one_transaction(cvmfs_standin: CvmfsStandin, standard_images,  # noqa: F811
                                                                tmp_path: Path) -> None:
    """Layer dirs published before the .diffids links existed gain them at the next convert
    (the format upgrade), in one transaction with their catalog markers, once."""
    from cvmfs_common.repo.lookup import find_layer_by_diff_id

    s = cvmfs_standin
    repo = s.mkfs(REPO)
    img = standard_images.multilayer
    wl = wishlist(tmp_path / "wl.yaml", [img.ref])
    db = tmp_path / "state.db"
    assert convert(repo, db, wl).rc == 0
    lay = RepositoryLayout(repo)
    assert s.run("transaction", REPO).returncode == 0
    remove_tree(lay.diffids_dir)
    (repo / ".metadata/.format").unlink()  # as an older version left it
    assert s.run("publish", REPO).returncode == 0
    s.clear_log()
    res = convert(repo, db, wl)
    assert res.rc == 0, res.stdout
    assert s.commands() == [["list"], *txn()]
    assert [find_layer_by_diff_id(lay, d).digest for d in img.diff_ids] == img.layers
    for d in [lay.diffids_dir, *(lay.diffid_link(diff).parent for diff in img.diff_ids)]:
        assert (d / CATALOG_MARKER).is_file(), d
    s.clear_log()
    assert convert(repo, db, wl).rc == 0 and s.commands() == [["list"]]


@pytest.fixture
def syncs(monkeypatch: pytest.MonkeyPatch) -> dict[str, int]:
    """How often each writer synced its file system (the real syncfs still runs)."""
    import publisher.unpack.ingest as ingest
    import publisher.unpack.writeback as writeback
    import publisher.write.chains as chains
    import publisher.write.flat as flat

    counts: dict[str, int] = {}
    for module, name in ((chains, "syncfs"), (flat, "syncfs"), (ingest, "syncfs"), (writeback, "syncfs_fd")):
        real, site = getattr(module, name), module.__name__.rsplit(".", 1)[1]
        counts[site] = 0

        def counted(*args, _real=real, _site=site):
            counts[_site] += 1
            return _real(*args)

        monkeypatch.setattr(module, name, counted)
    return counts


@requires_root
def test_no_syncfs_inside_a_transaction_the_local_backend_syncs(cvmfs_standin: CvmfsStandin, standard_images,
                                                                 tmp_path: Path, syncs: dict[str, int]) -> None:
    """A transaction is made durable by its publish (or aborted after a crash): its layer, chain
    and flat dirs are renamed into place unsynced. A plain directory has only the renames."""
    img = standard_images.multilayer
    wl = wishlist(tmp_path / "wl.yaml", [img.ref])
    res = convert(cvmfs_standin.mkfs(REPO), tmp_path / "state.db", wl, one_unit_mb=0)
    assert res.rc == 0 and "1 new" in res.stdout, res.stdout
    assert syncs == {"chains": 0, "flat": 0, "ingest": 0, "writeback": 0}

    local = tmp_path / "local"
    res = run_cli("convert", wl, "--backend", "local", "--repository-root", local, "--state-db",
                  tmp_path / "local.db", "--jobs", "3")
    assert res.rc == 0 and "1 new" in res.stdout, res.stdout
    assert syncs["chains"] == len(img.layers) and syncs["flat"] == 1 and syncs["ingest"] == len(img.layers), syncs


@requires_root
def test_a_new_tag_on_a_known_base_marks_only_the_dirs_it_made(cvmfs_standin: CvmfsStandin, standard_images,
                                                                 tmp_path: Path,
                                                                 monkeypatch: pytest.MonkeyPatch) -> None:
    """On CernVM-FS each open of a published nested-catalog dir loads that catalog: the known
    base's layer, chain and flat dirs have their markers and are not opened for them again."""
    import publisher.backend.cvmfs as cvmfs

    base, top = standard_images.tagged["1.0"], standard_images.tagged["1.1"]
    assert top.layers[:len(base.layers)] == base.layers  # 1.1 = 1.0 + one layer
    repo, db = cvmfs_standin.mkfs(REPO), tmp_path / "state.db"
    assert convert(repo, db, wishlist(tmp_path / "one.yaml", [base.ref])).rc == 0
    seen: list[Path] = []

    def spy(dirs, root=None):
        dirs = list(dirs)
        seen.extend(dirs)
        return cvmfs_ensure(dirs, root)

    cvmfs_ensure = cvmfs.ensure_markers
    monkeypatch.setattr(cvmfs, "ensure_markers", spy)
    res = convert(repo, db, wishlist(tmp_path / "two.yaml", [base.ref, top.ref]))
    assert res.rc == 0 and "1 new" in res.stdout, res.stdout

    lay = RepositoryLayout(repo)
    known = {lay.flat_dir(base.config_digest)}
    known |= {lay.layer_dir(d) for d in base.layers} | {lay.chain_dir(c) for c in chain_ids(base.diff_ids)}
    assert sorted(map(str, known & set(seen))) == []
    made = [lay.layer_dir(top.layers[-1]), lay.chain_dir(chain_ids(top.diff_ids)[-1]),
            lay.flat_dir(top.config_digest)]
    for d in made + [lay.diffid_link(top.diff_ids[-1]).parent]:
        assert d in seen and (d / CATALOG_MARKER).is_file(), d


@requires_root
def test_no_fsync_of_files_and_links_inside_a_transaction(cvmfs_standin: CvmfsStandin, standard_images,
                                                          tmp_path: Path, monkeypatch: pytest.MonkeyPatch) -> None:
    """origin.json, .metadata files and links are written unsynced inside a transaction (its
    publish makes them durable); the local backend fsyncs each file and its parent."""
    import sys

    import cvmfs_common.fsutil.beneath as beneath

    counts = {"beneath": 0}
    real = os.fsync

    def counted(fd: int) -> None:
        if sys._getframe(1).f_code.co_filename == beneath.__file__:
            counts["beneath"] += 1
        real(fd)

    monkeypatch.setattr(os, "fsync", counted)
    wl = wishlist(tmp_path / "wl.yaml", [standard_images.multilayer.ref])
    res = convert(cvmfs_standin.mkfs(REPO), tmp_path / "state.db", wl, one_unit_mb=0)
    assert res.rc == 0 and "1 new" in res.stdout, res.stdout
    assert counts == {"beneath": 0}

    res = run_cli("convert", wl, "--backend", "local", "--repository-root", tmp_path / "local", "--state-db",
                  tmp_path / "local.db")
    assert res.rc == 0 and "1 new" in res.stdout, res.stdout
    assert counts["beneath"] > 0


def _orphan(repo_name: str, seconds: float) -> subprocess.Popen:
    """A process that looks like a `cvmfs_server` call on the repository (argv[0] is the name)."""
    # (`; true`: bash would otherwise exec sleep in its place, and the name would be gone)
    return subprocess.Popen(["bash", "-c", f"exec -a cvmfs_server bash -c 'sleep {seconds}; true' publish {repo_name}"])


def test_start_waits_for_a_cvmfs_server_call_a_killed_run_left(cvmfs_standin: CvmfsStandin, tmp_path: Path) -> None:
    """A kill -9 during `cvmfs_server publish` (or a transaction half open) leaves that call
    running: the next run waits for it instead of racing it, and says so."""
    from publisher.backend.base import BackendError
    from publisher.backend.cvmfs import CvmfsBackend, server_processes

    repo = cvmfs_standin.mkfs("unpacked.example.org")
    backend = CvmfsBackend(repo, "unpacked.example.org")
    assert server_processes("unpacked.example.org") == []
    orphan = _orphan("unpacked.example.org", 1.5)
    try:
        deadline = time.monotonic() + 10
        while orphan.pid not in server_processes("unpacked.example.org"):
            assert time.monotonic() < deadline
            time.sleep(0.05)
        assert server_processes("other.example.org") == []
        # a name is matched whole: a call on /cvmfs/unpacked.example.org.old is another repository's
        other = _orphan("/cvmfs/unpacked.example.org.old/x", 5)
        try:
            while other.pid not in server_processes("unpacked.example.org.old"):
                assert time.monotonic() < deadline
                time.sleep(0.05)
            assert other.pid not in server_processes("unpacked.example.org")
        finally:
            other.kill()
            other.wait()
        with pytest.raises(BackendError, match="still running"):
            backend.wait_for_orphans(timeout=0.2, poll=0.05)
        t0 = time.monotonic()
        backend.start(RepositoryLayout(repo))  # waits for it
        assert orphan.poll() is not None and time.monotonic() - t0 > 0.5
    finally:
        orphan.kill()
        orphan.wait()


def test_a_call_outlives_its_killed_publisher(tmp_path: Path) -> None:
    """kill -9 of the publisher while `cvmfs_server` runs: the call goes on to its end. Its
    output goes to a file; through a pipe its next line after the kill would kill it with
    SIGPIPE halfway (a real publish then leaves the repository locked and read-only)."""
    done = tmp_path / "done"
    started = tmp_path / "started"
    server = tmp_path / "cvmfs_server"
    server.write_text(f"#!/bin/bash\ntouch {started}\nsleep 1\n"
                      f"for i in $(seq 2000); do echo \"line $i of a long publish\"; done\ntouch {done}\n")
    server.chmod(0o755)
    publisher = subprocess.Popen(
        ["python3", "-c", "import sys; from pathlib import Path; from publisher.backend.cvmfs import CvmfsBackend; "
         f"CvmfsBackend(Path('/'), 'unpacked.example.org', command={str(server)!r})._run('publish', 'x')"],
        cwd=Path(__file__).resolve().parents[3])
    deadline = time.monotonic() + 20
    while not started.exists():
        assert publisher.poll() is None and time.monotonic() < deadline
        time.sleep(0.02)
    publisher.kill()
    publisher.wait()
    while not done.exists():
        assert time.monotonic() < deadline, "the cvmfs_server call died with its publisher"
        time.sleep(0.05)


def test_start_removes_a_publishing_lock_no_cvmfs_server_holds(cvmfs_standin: CvmfsStandin, tmp_path: Path) -> None:
    """A publish whose process group was killed after it remounted the client leaves
    is_publishing.lock flocked by that client (it inherited the fd) for good: start removes
    the file (a lock nobody holds stays: cvmfs_server's own check removes it)."""
    from publisher.backend.cvmfs import PUBLISHING_LOCK, CvmfsBackend

    repo = cvmfs_standin.mkfs("unpacked.example.org")
    spool = tmp_path / "spool"
    spool.mkdir()
    lock = spool / PUBLISHING_LOCK
    lock.touch()
    backend = CvmfsBackend(repo, "unpacked.example.org", spool=spool)
    backend.start(RepositoryLayout(repo))
    assert lock.exists()
    holder = subprocess.Popen(["flock", str(lock), "sleep", "60"])  # as the client holds it
    try:
        deadline = time.monotonic() + 10
        while subprocess.run(["flock", "-n", str(lock), "true"]).returncode == 0:
            assert time.monotonic() < deadline
            time.sleep(0.05)
        backend.start(RepositoryLayout(repo))
        assert not lock.exists()
    finally:
        holder.kill()
        holder.wait()


def test_an_abort_refused_after_a_failed_publish_is_reported(tmp_path: Path) -> None:
    """A publish fails and the abort after it is refused too: the repository stays in the
    transaction, and the error says why (the abort's refusal is not swallowed)."""
    from publisher.backend.base import BackendError
    from publisher.backend.cvmfs import CvmfsBackend

    server = tmp_path / "cvmfs_server"
    server.write_text('#!/bin/sh\ncase "$1" in\ntransaction) exit 0 ;;\n'
                      'publish) echo "Another publish process is active for $2"; exit 1 ;;\n'
                      'abort) echo "Repository is currently publishing"; exit 1 ;;\nesac\nexit 2\n')
    server.chmod(0o755)
    backend = CvmfsBackend(tmp_path, "unpacked.example.org", command=str(server))
    with pytest.raises(BackendError, match="Another publish process") as raised:
        with backend.unit("one image"):
            pass
    assert any("currently publishing" in note for note in raised.value.__notes__)


def _dead_fuse_mount(path: Path) -> None:
    """A FUSE mount whose process is gone before it answered (as a cvmfs2 killed while it
    started leaves it): mounted on a /dev/fuse fd that is then closed."""
    import ctypes

    fd = os.open("/dev/fuse", os.O_RDWR)
    try:
        opts = f"fd={fd},rootmode=40000,user_id=0,group_id=0".encode()
        libc = ctypes.CDLL(None, use_errno=True)
        if libc.mount(b"dead", str(path).encode(), b"fuse", 1, opts) != 0:
            pytest.skip(f"cannot mount FUSE here: {os.strerror(ctypes.get_errno())}")
    finally:
        os.close(fd)


@pytest.mark.skipif(os.geteuid() != 0 or not Path("/dev/fuse").exists(), reason="needs root and /dev/fuse (a FUSE mount)")
def test_start_unmounts_a_client_mount_whose_process_died(cvmfs_standin: CvmfsStandin, tmp_path: Path) -> None:
    """SPOOL/rdonly a FUSE mount with no process (ENOTCONN): cvmfs_server's own repair fails
    on it; start has CernVM-FS's helper unmount it (lazily) and `cvmfs_server mount` mount it
    again, and leaves a live one alone."""
    from publisher.backend.cvmfs import CvmfsBackend

    repo = cvmfs_standin.mkfs("unpacked.example.org")
    rdonly = tmp_path / "spool" / "rdonly"
    rdonly.mkdir(parents=True)
    calls = tmp_path / "helper-calls"
    helper = tmp_path / "cvmfs_suid_helper"  # (run with an empty environment, as cvmfs_server does)
    helper.write_text(f'#!/bin/sh\necho "$@" >>{calls}\nexec /bin/umount -l {rdonly}\n')
    helper.chmod(0o755)
    backend = CvmfsBackend(repo, "unpacked.example.org", spool=rdonly.parent, suid_helper=str(helper))
    backend.start(RepositoryLayout(repo))
    assert not calls.exists()  # a plain directory: nothing to do
    _dead_fuse_mount(rdonly)
    try:
        with pytest.raises(OSError, match="not connected"):
            os.stat(rdonly)
        backend.start(RepositoryLayout(repo))
        assert calls.read_text() == "rdonly_lazy_umount unpacked.example.org\n"
        assert os.stat(rdonly) and not os.path.ismount(rdonly)
        # then cvmfs_server mounts the client and the union again
        assert ["mount", "unpacked.example.org"] in cvmfs_standin.commands()
    finally:
        subprocess.run(["umount", "-l", str(rdonly)], capture_output=True)

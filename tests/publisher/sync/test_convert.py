"""`cvmfs-publisher convert` against the real registry with the standard images."""
from __future__ import annotations

import json
import os
import shutil
import subprocess
from dataclasses import dataclass
from pathlib import Path

import pytest

from cvmfs_common.oci.digest import chain_ids, sha256_of
from cvmfs_common.repo.paths import RepositoryLayout
from cvmfs_common.repo.metadata import read_layers_json, read_origin_json
from publisher.core.state import State
from tests.publisher.treeview import diff_trees, tree_snapshot
from tests.fixtures.images import BuiltImage, StandardImages, host_arch
from tests.fixtures.layers import Entry, Layer
from tests.fixtures.tree import compare_trees

from tests.publisher.clirun import CliResult, push_image, run_cli, run_proc, write_wishlist
from tests.fixtures.marks import requires_root
from tests.publisher.layertar import dir_, reg, tar_bytes
from tests.publisher.repotree import flat_minus_chain, fs_state, observed_tree, overlay_mount

OTHER_ARCH = "arm64" if host_arch() != "arm64" else "amd64"
MISSING = "test/does-not-exist:nope"


@dataclass
class Published:
    root: Path
    state_db: Path
    wishlists: list[Path]
    images: StandardImages
    first: CliResult

    @property
    def layout(self) -> RepositoryLayout:
        return RepositoryLayout(self.root)

    def convert(self) -> CliResult:
        return run_cli("convert", *self.wishlists, "--repository-root", self.root, "--state-db", self.state_db,
                       "--jobs", "3")


def image_by_name(images: StandardImages, name: str) -> BuiltImage:
    if name.startswith("tagged/"):
        return images.tagged[name.split("/", 1)[1]]
    if name.startswith("multiarch/"):
        arch = host_arch() if name.endswith("native") else OTHER_ARCH
        return images.multiarch.images[f"linux/{arch}"]
    return getattr(images, name)


IMAGES = ["multilayer", "multilayer_docker", "tagged/1.0", "tagged/1.1", "tagged/2.0", "multiarch/native",
          "multiarch/other"]


@pytest.fixture(scope="module")
def published(standard_images: StandardImages, tmp_path_factory: pytest.TempPathFactory) -> Published:
    base = tmp_path_factory.mktemp("convert")
    host = standard_images.multilayer.host
    main = write_wishlist(base / "main.yaml", [
        f"{host}/test/multilayer:v1",
        f"http://{host}/test/multilayer-docker:v1",
        f"{host}/test/tagged:*",
        f"{host}/{MISSING}",
    ])
    multi = write_wishlist(base / "multi.yaml", [f"{host}/test/multiarch:v1", f"{host}/test/multilayer:v1"],
                           platforms=[f"linux/{host_arch()}", f"linux/{OTHER_ARCH}"])
    p = Published(base / "repo", base / "state" / "state.db", [main, multi], standard_images, CliResult(0, ""))
    p.first = p.convert()
    return p


def flat_of(p: Published, img: BuiltImage) -> Path:
    return p.layout.flat_dir(img.config_digest)


def chain_of(p: Published, img: BuiltImage) -> Path:
    return p.layout.chain_dir(chain_ids(img.diff_ids)[-1])


# ------------------------------------------------------------------------------ the run

@requires_root
def test_failing_image_does_not_stop_the_others(published: Published) -> None:
    assert published.first.rc == 1, published.first.stdout
    out = published.first.stdout
    # multilayer is single-platform: its OTHER_ARCH item is skipped, not failed
    assert "9 images: 7 new, 0 updated, 0 unchanged, 1 failed, 1 skipped" in out, out
    assert f"FAILED {published.images.multilayer.host}/{MISSING}" in out
    for name in IMAGES:
        assert flat_of(published, image_by_name(published.images, name)).is_dir(), name


# ------------------------------------------------------------------------------ trees

@requires_root
@pytest.mark.parametrize("name", IMAGES)
def test_flat_tree_is_the_image(published: Published, name: str) -> None:
    img = image_by_name(published.images, name)
    flat = flat_of(published, img)
    # the chain is exactly the image; the flat dir is a copy of it with .singularity.d
    assert compare_trees(img.tree, observed_tree(chain_of(published, img)), ignore=frozenset()) == []
    assert flat.is_dir() and not flat.is_symlink()
    assert flat_minus_chain(flat, chain_of(published, img)) == []
    assert (flat / ".singularity.d/env/10-docker2singularity.sh").is_file()
    assert not (chain_of(published, img) / ".singularity.d").exists()


@requires_root
@pytest.mark.parametrize("name", IMAGES)
def test_overlay_stack_of_layers_equals_flat(published: Published, name: str) -> None:
    img = image_by_name(published.images, name)
    lowers = [published.layout.layerfs(d) for d in reversed(img.layers)]
    flat = tree_snapshot(chain_of(published, img))
    with overlay_mount(lowers) as mnt:
        stacked = tree_snapshot(mnt)
    assert diff_trees(flat, stacked) == []


@requires_root
@pytest.mark.parametrize("name", ["multilayer", "tagged/1.0", "tagged/1.1", "tagged/2.0"])
def test_flat_tree_equals_umoci_unpack(published: Published, name: str, tmp_path: Path) -> None:
    img = image_by_name(published.images, name)
    layout_dir = published.images.layout
    tag = "multilayer"
    if name.startswith("tagged/"):
        layout_dir, tag = layout_dir.parent / "umoci-layout", img.tag
    bundle = tmp_path / "bundle"
    subprocess.run(["umoci", "unpack", "--image", f"{layout_dir}:{tag}", str(bundle)], check=True,
                   capture_output=True)
    theirs = tree_snapshot(bundle / "rootfs")
    ours = tree_snapshot(chain_of(published, img))
    # umoci gives the root and omitted parents its own times; everything else must agree.
    assert diff_trees(theirs, ours, ignore=("mtime_ns",)) == []


@requires_root
def test_hardlinks_whiteouts_and_odd_modes(published: Published) -> None:
    flat = flat_of(published, published.images.multilayer)
    assert os.stat(flat / "hl/base-file").st_ino == os.stat(flat / "hl/cross").st_ino
    assert os.stat(flat / "hl/original").st_ino == os.stat(flat / "hl/link1").st_ino
    for gone in ("data/delete-me.txt", "data/subdir", "opaque/old1", "opaque/sub", "links/dangling"):
        assert not os.path.lexists(flat / gone), gone
    assert (flat / "opaque/new1").read_text() == "new1\n"
    assert os.stat(flat / "usr/bin/suid-tool").st_mode & 0o7777 == 0o4755
    st = os.stat(flat / "opt/app")
    assert (st.st_mode & 0o7777, st.st_uid, st.st_gid) == (0o750, 1000, 1000)


# ------------------------------------------------------------------------------ metadata

@requires_root
def test_layer_metadata_records_whiteouts_parent_chain_and_origin(published: Published) -> None:
    img = published.images.multilayer
    lay = published.layout
    metas = [read_layers_json(lay.layers_json(d)) for d in img.layers]
    assert [m.diff_digest for m in metas] == img.diff_ids
    assert metas[0].whiteouts == "none" and metas[0].parent_chain is None
    # the second layer's whiteouts sit in /data and /links, which it omits; the third
    # omits /opt/app, /usr/bin, /data, /links: both completed on their parent chain
    chains = chain_ids(img.diff_ids)
    assert metas[1].whiteouts == "overlay" and metas[1].parent_chain == chains[0]
    assert metas[2].whiteouts == "overlay" and metas[2].parent_chain == chains[1]
    st = os.stat(lay.layerfs(img.layers[2]) / "opt/app")
    assert (st.st_mode & 0o7777, st.st_uid) == (0o750, 1000)
    # the OCI and the Docker manifest share config and layers: one origin
    assert read_origin_json(lay.origin_json(img.layers[0])) == [img.config_digest]
    for d in img.layers:
        assert (lay.layer_dir(d) / ".metadata").stat().st_mode & 0o777 == 0o755


@requires_root
def test_links_metadata_and_platforms(published: Published) -> None:
    lay = published.layout
    img = published.images.multilayer
    link = lay.link_path(img.host, img.name, img.tag)
    assert not os.path.isabs(os.readlink(link))
    assert os.path.realpath(link) == os.path.realpath(lay.flat_dir(img.config_digest))
    manifest = lay.manifest_json(img.host, img.name, img.tag).read_bytes()
    assert sha256_of(manifest) == img.manifest_digest
    assert sha256_of((lay.manifest_json(img.host, img.name, img.tag).parent / "config.json").read_bytes()) \
        == img.config_digest
    for tag, t in published.images.tagged.items():
        assert os.path.realpath(lay.link_path(t.host, t.name, tag)) == os.path.realpath(lay.flat_dir(t.config_digest))

    native = image_by_name(published.images, "multiarch/native")
    other = image_by_name(published.images, "multiarch/other")
    assert (lay.link_path(native.host, native.name, "v1") / "platform").read_text() == host_arch() + "\n"
    plat = lay.for_platform("linux", OTHER_ARCH)
    assert (plat.link_path(other.host, other.name, "v1") / "platform").read_text() == OTHER_ARCH + "\n"
    assert sha256_of(plat.manifest_json(other.host, other.name, "v1").read_bytes()) == other.manifest_digest
    assert not lay.manifest_json(img.host, "test/does-not-exist", "nope").exists()
    # The tag's index next to each platform's manifest (the snapshotter's pull matches a
    # HEAD against it); a tag of one image manifest has none.
    index = published.images.multiarch.digest
    for layout in (lay, plat):
        assert sha256_of(layout.manifest_json(other.host, other.name, "v1").with_name("index.json").read_bytes()) \
            == index
    assert not lay.manifest_json(img.host, img.name, img.tag).with_name("index.json").exists()


@requires_root
def test_multiarch_links_for_every_platform(published: Published) -> None:
    """DUCC's .multiarch/<arch>[:<variant>]/<registry>/<repo>:<tag>, as DIRAC and CVMFS
    variant symlinks resolve them, with the uname -m aliases."""
    lay = published.layout
    native = image_by_name(published.images, "multiarch/native")
    other = image_by_name(published.images, "multiarch/other")
    names = {"amd64": "amd64", "arm64": "arm64:v8"}
    unames = {"amd64": "x86_64", "arm64": "aarch64"}
    mdir = lay.root / ".multiarch"
    for arch, img in ((host_arch(), native), (OTHER_ARCH, other)):
        link = mdir / names[arch] / native.host / "test/multiarch:v1"
        assert not os.path.isabs(os.readlink(link))
        assert os.path.realpath(link) == os.path.realpath(lay.flat_dir(img.config_digest))
        assert (link / "platform").read_text() == arch + "\n"
        # CVMFS_ARCH (uname -m) and the Go name without variant find the same image
        assert os.path.realpath(mdir / unames[arch] / native.host / "test/multiarch:v1") == os.path.realpath(link)
        assert os.readlink(mdir / unames[arch]) == names[arch]
    assert os.path.realpath(mdir / "arm64") == os.path.realpath(mdir / "arm64:v8")
    # the default platform's single-platform images are there too, the others not
    ml = published.images.multilayer
    assert os.path.realpath(mdir / names[host_arch()] / ml.host / "test/multilayer:v1") == \
        os.path.realpath(lay.flat_dir(ml.config_digest))
    assert not os.path.lexists(mdir / names[OTHER_ARCH] / ml.host / "test/multilayer:v1")
    assert not (lay.root / ".platforms").exists()


@requires_root
def test_podman_store_lists_images_with_names(published: Published) -> None:
    images = json.loads((published.layout.podman_store / "overlay-images/images.json").read_text())
    names = {n for i in images for n in i.get("names", [])}
    host = published.images.multilayer.host
    assert f"{host}/test/multilayer:v1" in names and f"{host}/test/tagged:2.0" in names
    other = json.loads((published.layout.for_platform("linux", OTHER_ARCH).podman_store
                        / "overlay-images/images.json").read_text())
    assert [i["id"] for i in other] == [image_by_name(published.images, "multiarch/other").config_digest[7:]]


@requires_root
def test_state_records_tags_images_layers(published: Published) -> None:
    with State.open(published.state_db, published.root) as st:
        tags = {(t.key.repository, t.key.tag, t.key.platform): t for t in st.published_tags()}
        img = published.images.multilayer
        t = tags[(img.name, "v1", f"linux/{host_arch()}")]
        assert (t.manifest_digest, t.config_digest, t.platform_dir) == (img.manifest_digest, img.config_digest, "")
        layers = st.image_layers(img.manifest_digest)
        assert [l.digest for l in layers] == img.layers
        assert [l.chain_id for l in layers] == chain_ids(img.diff_ids)
        other = tags[("test/multiarch", "v1", f"linux/{OTHER_ARCH}")]
        assert other.platform_dir == f"linux-{OTHER_ARCH}"
        assert len(tags) == 7
        failed = st.conn.execute("SELECT last_error FROM tags WHERE repository='test/does-not-exist'").fetchone()
        assert "not found" in failed[0]


# ------------------------------------------------------------------------------ re-sync

@requires_root
def test_resync_without_change_is_head_only_and_writes_nothing(published: Published, registry) -> None:
    before = fs_state(published.root)
    registry.clear_log()
    again = published.convert()
    assert again.rc == 1  # the missing tag is still missing
    assert "9 images: 0 new, 0 updated, 7 unchanged, 1 failed, 1 skipped" in again.stdout, again.stdout
    assert registry.blob_get_count() == 0
    assert registry.manifest_get_count() == 0
    heads = [e for e in registry.access_log() if e.method == "HEAD" and "/manifests/" in e.path]
    assert len(heads) == 7  # one per tag (the two platforms of multiarch share one)
    assert fs_state(published.root) == before
    assert not any(published.layout.tmp_dir.iterdir())


def test_default_platform_is_one_per_repository(published: Published, capsys) -> None:
    img = published.images.multiarch
    res = run_cli("convert-image", img.ref, "--platform", f"linux/{OTHER_ARCH}", "--repository-root",
                  published.root, "--state-db", published.state_db)
    assert res.rc == 2
    assert f"default platform is linux/{host_arch()}, not linux/{OTHER_ARCH}" in capsys.readouterr().err


# ------------------------------------------------------------------------------ other runs

def test_moved_tag_switches_link(registry, tmp_path: Path) -> None:
    from tests.fixtures.images import Pusher
    from tests.fixtures.layers import Entry, Layer
    from tests.fixtures.oci_layout import ImageConfig, OciLayout, Platform

    oci = OciLayout(tmp_path / "layout")
    pusher = Pusher(registry.host)
    for version in ("one", "two"):
        layers = [Layer.from_entries([Entry.dir("/etc"), Entry.file("/etc/version", version + "\n")])]
        oci.tag(version, oci.add_image(layers, ImageConfig(platform=Platform("linux", host_arch()))))
    root, db = tmp_path / "repo", tmp_path / "state.db"
    ref = f"{registry.host}/moving/app:latest"
    lay = RepositoryLayout(root)
    link = lay.link_path(registry.host, "moving/app", "latest")

    pusher.copy(oci.root, "one", "moving/app", "latest")
    first = run_cli("convert-image", ref, "--repository-root", root, "--state-db", db)
    assert first.rc == 0 and "1 new" in first.stdout, first.stdout
    assert (link / "etc/version").read_text() == "one\n"
    old_target = os.readlink(link)
    # as if `latest` had been an index before: an update to a plain manifest drops index.json
    stale_index = lay.manifest_json(registry.host, "moving/app", "latest").with_name("index.json")
    stale_index.write_bytes(b'{"manifests": []}')

    pusher.copy(oci.root, "two", "moving/app", "latest")
    second = run_cli("convert-image", ref, "--repository-root", root, "--state-db", db)
    assert second.rc == 0 and "1 updated" in second.stdout, second.stdout
    assert (link / "etc/version").read_text() == "two\n"
    assert os.readlink(link) != old_target
    two = pusher.describe("moving/app", "latest")
    assert sha256_of(lay.manifest_json(registry.host, "moving/app", "latest").read_bytes()) == two.manifest_digest
    assert not stale_index.exists()
    images = json.loads((lay.podman_store / "overlay-images/images.json").read_text())
    owners = [i["id"] for i in images if ref in i.get("names", [])]
    assert owners == [two.config_digest[7:]]


def test_an_older_repository_is_upgraded_in_place(standard_images: StandardImages, registry, tmp_path: Path) -> None:
    """.flat symlinks (what older versions wrote), flat dirs without .singularity.d and
    missing .multiarch links in a repository without a format version are replaced by the
    next convert (the format upgrade marks their tags), without a layer download and
    without a moment where the entry is missing (renameat2 RENAME_EXCHANGE)."""
    img = standard_images.tagged["2.0"]
    root, db = tmp_path / "repo", tmp_path / "state.db"
    lay = RepositoryLayout(root)
    assert run_cli("convert-image", img.ref, "--repository-root", root, "--state-db", db).rc == 0
    flat, top = lay.flat_dir(img.config_digest), lay.chain_dir(chain_ids(img.diff_ids)[-1])
    from cvmfs_common.fsutil.atomic import remove_tree
    remove_tree(flat)
    os.symlink(os.path.relpath(top, flat.parent), flat)
    mlink = next((root / ".multiarch").glob(f"*/{img.host}/test/tagged:2.0"))
    os.unlink(mlink)
    format_file = root / ".metadata/.format"
    assert format_file.read_text() == "1\n"
    format_file.unlink()  # as an older version left the repository
    registry.clear_log()
    res = run_cli("convert-image", img.ref, "--repository-root", root, "--state-db", db)
    assert res.rc == 0, res.stdout
    assert [registry.blob_get_count(digest=d) for d in img.layers] == [0] * len(img.layers)  # the config only
    assert flat.is_dir() and not flat.is_symlink() and flat_minus_chain(flat, top) == []
    assert os.path.islink(mlink) and os.path.samefile(mlink, flat)
    assert not any(lay.tmp_dir.iterdir())
    assert format_file.read_text() == "1\n"
    # a flat dir without .singularity.d (the cvmfs backend's older copies) is redone too
    remove_tree(flat / ".singularity.d")
    format_file.unlink()
    old_ino = os.lstat(flat).st_ino
    assert run_cli("convert-image", img.ref, "--repository-root", root, "--state-db", db).rc == 0
    assert (flat / ".singularity.d/runscript").is_file() and os.lstat(flat).st_ino != old_ino
    assert run_cli("check", "--repository-root", root, "--state-db", db).rc == 0


def test_convert_image_of_missing_tag_fails(registry, tmp_path: Path) -> None:
    res = run_cli("convert-image", f"{registry.host}/{MISSING}", "--repository-root", tmp_path / "repo",
                  "--state-db", tmp_path / "state.db", "--no-podman-store")
    assert res.rc == 1
    assert "1 failed" in res.stdout and "not found" in res.stdout


def test_invalid_wishlist_exits_2_naming_file_and_line(tmp_path: Path, capsys) -> None:
    bad = tmp_path / "bad.yaml"
    bad.write_text("version: 1\nuser: u\ncvmfs_repo: r\noutput_format: o\ninput:\n  - 'UPPER/Case:x'\n")
    res = run_cli("convert", bad, "--repository-root", tmp_path / "repo", "--state-db", tmp_path / "s.db")
    assert res.rc == 2
    err = capsys.readouterr().err
    assert f"{bad}:6: input[0]: invalid image reference 'UPPER/Case:x' (invalid repository name" in err, err
    assert not (tmp_path / "repo").exists()


def test_maintenance_commands_need_their_arguments(tmp_path: Path, capsys) -> None:
    with pytest.raises(SystemExit) as e:  # loop needs wishlists (tests/publisher/sync/test_loop.py)
        run_cli("loop", "--repository-root", tmp_path)
    assert e.value.code == 2
    for cmd in ("gc", "check"):  # test_gc.py, test_check.py
        assert run_cli(cmd, "--state-db", tmp_path / "state.db").rc == 2
        assert f"{cmd} needs --repository-root" in capsys.readouterr().err


def test_a_glob_skips_invalid_tags_of_the_tag_list(registry, tmp_path: Path) -> None:
    img = push_image(registry.host, tmp_path, "glob/invalid", "v1", [Layer.from_entries([Entry.file("/a", "a")])])
    # The registry lists whatever its storage has: plant tags no client could push.
    tags = registry.storage / "docker/registry/v2/repositories/glob/invalid/_manifests/tags"
    for bad in ("-dash-first", "x" * 200):
        shutil.copytree(tags / "v1", tags / bad)
    root = tmp_path / "repo"
    wishlist = write_wishlist(tmp_path / "w.yaml", [f"{registry.host}/glob/invalid:*"])
    res = run_proc("convert", wishlist, "--repository-root", root, "--state-db", tmp_path / "s.db")
    assert res.rc == 0 and "1 new" in res.stdout and "0 failed" in res.stdout, res.stdout + res.stderr
    assert "skipping '-dash-first' from the registry's tag list" in res.stderr, res.stderr
    assert f"skipping '{'x' * 200}'" in res.stderr
    assert os.path.islink(RepositoryLayout(root).link_path(registry.host, "glob/invalid", img.tag))


def test_a_name_too_long_for_the_file_system_fails_before_any_write(registry, tmp_path: Path) -> None:
    name, tag = "long/" + "n" * 200, "t" * 100  # "<repo>:<tag>" is one 301-byte file name
    push_image(registry.host, tmp_path, name, tag, [Layer.from_entries([Entry.file("/a", "a")])])
    root = tmp_path / "repo"
    res = run_proc("convert-image", f"{registry.host}/{name}:{tag}", "--repository-root", root,
                   "--state-db", tmp_path / "s.db")
    assert res.rc == 1 and "1 failed" in res.stdout, res.stdout + res.stderr
    assert "is 301 bytes: too long for a file name (255 bytes at most)" in res.stdout, res.stdout
    assert "0 layers fetched" in res.stdout
    assert list(root.iterdir()) == []  # no layer, chain, .flat, link or metadata


def test_overlay_xattrs_of_a_tar_are_dropped_user_namespace_too(registry, tmp_path: Path) -> None:
    forged = {"user.overlay.opaque": b"y", "user.overlay.redirect": b"/etc", "trusted.overlay.opaque": b"y",
              "user.kept": b"1"}
    tar = tar_bytes([dir_("data", xattrs=forged), reg("data/file", b"x", xattrs=forged)])
    img = push_image(registry.host, tmp_path, "xattrs/forged", "v1",
                     [Layer.from_entries([Entry.dir("/data"), Entry.file("/data/below", "b")]), Layer(tar)])
    root = tmp_path / "repo"
    lay = RepositoryLayout(root)
    res = run_proc("convert-image", img.ref, "--repository-root", root, "--state-db", tmp_path / "s.db")
    assert res.rc == 0, res.stdout + res.stderr
    for name in ("user.overlay.opaque", "user.overlay.redirect", "trusted.overlay.opaque"):
        assert f"skipped data: xattr {name} not allowed" in res.stderr, res.stderr
    chain = lay.chain_dir(img.chain_ids()[-1])
    for top in (lay.layerfs(img.layers[1]), chain):
        for path in (top / "data", top / "data/file"):
            assert os.listxattr(path) == ["user.kept"], (path, os.listxattr(path))
    assert (chain / "data/below").read_text() == "b"  # no opaque dir forged over the lower one


def test_an_index_tag_published_without_index_json_gets_it_at_the_next_resync(standard_images: StandardImages,
                                                                              registry, tmp_path: Path) -> None:
    """Tags published before index.json was kept (a repository without a format version)
    gain it without being published again: one GET of the index by digest, written in the
    format upgrade's unit."""
    img = standard_images.multiarch
    root, db = tmp_path / "repo", tmp_path / "state.db"
    assert run_cli("convert-image", img.ref, "--repository-root", root, "--state-db", db).rc == 0
    index = RepositoryLayout(root).manifest_json(img.host, img.name, img.tag).with_name("index.json")
    index.unlink()
    (root / ".metadata/.format").unlink()
    before = {p: p.stat().st_mtime_ns for p in index.parent.iterdir()}
    registry.clear_log()
    again = run_cli("convert-image", img.ref, "--repository-root", root, "--state-db", db)
    assert again.rc == 0 and "1 unchanged" in again.stdout, again.stdout
    assert sha256_of(index.read_bytes()) == img.digest
    assert {p: p.stat().st_mtime_ns for p in before} == before  # manifest.json, config.json untouched
    gets = [e.path for e in registry.access_log() if e.method == "GET" and "/manifests/" in e.path]
    assert gets == [f"/v2/{img.name}/manifests/{img.digest}"], gets
    assert registry.blob_get_count() == 0
    registry.clear_log()
    assert run_cli("convert-image", img.ref, "--repository-root", root, "--state-db", db).rc == 0
    assert registry.manifest_get_count() == 0


@requires_root
def test_layers_published_before_the_diffid_links_gain_them_once(standard_images: StandardImages, registry,
                                                                 tmp_path: Path) -> None:
    """The first convert on a repository without a format version links every sound layer dir
    in .layers by its diffID (also dirs DUCC wrote: its layers.json names the diffID), once."""
    from cvmfs_common.repo.lookup import find_layer_by_diff_id
    from cvmfs_common.repo.metadata import LayerMetadata, write_layers_json

    img = standard_images.multilayer
    root, db = tmp_path / "repo", tmp_path / "state.db"
    lay = RepositoryLayout(root)
    assert run_cli("convert-image", img.ref, "--repository-root", root, "--state-db", db).rc == 0
    assert [find_layer_by_diff_id(lay, d).digest for d in img.diff_ids] == img.layers
    shutil.rmtree(lay.diffids_dir)  # as an older version left it
    ducc_blob, ducc_diff = "sha256:" + "ab" * 32, "sha256:" + "cd" * 32
    lay.layerfs(ducc_blob).mkdir(parents=True)
    write_layers_json(lay.layers_json(ducc_blob), LayerMetadata("cd" * 32, ducc_blob, ducc_diff, 1, None))
    (root / ".metadata/.format").unlink()
    registry.clear_log()
    again = run_cli("convert-image", img.ref, "--repository-root", root, "--state-db", db)
    assert again.rc == 0 and "1 unchanged" in again.stdout, again.stdout
    assert registry.blob_get_count() == 0
    assert [find_layer_by_diff_id(lay, d).digest for d in img.diff_ids] == img.layers
    assert find_layer_by_diff_id(lay, ducc_diff).digest == ducc_blob
    # once: a later run does not walk .layers again
    os.unlink(lay.diffid_link(ducc_diff))
    assert run_cli("convert-image", img.ref, "--repository-root", root, "--state-db", db).rc == 0
    assert not os.path.lexists(lay.diffid_link(ducc_diff))

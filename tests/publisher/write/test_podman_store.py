"""podmanStore (docs/DESIGN.md#podman-store): the format checked without podman, then real podman 4.3 running
the standard test images straight from a test repository -- kernel overlay for converted
whiteouts, fuse-overlayfs for raw ones -- with no layer copied into its graphroot."""
from __future__ import annotations

import hashlib
import json
import os
import shutil
import stat
import subprocess
from collections.abc import Iterator
from pathlib import Path

import pytest

from cvmfs_common.fsutil.beneath import NotBeneath
from cvmfs_common.oci.digest import chain_ids
from cvmfs_common.repo.metadata import LayerMetadata, write_layers_json
from cvmfs_common.repo.paths import RepositoryLayout
from publisher.write import podman_format as fmt
from publisher.write.podman_store import PodmanImage, PodmanLayer, PodmanRoot, PodmanStore, PodmanStoreError
from tests.fixtures.images import BuiltImage, StandardImages
from tests.fixtures.tree import (LISTING_COMMAND, RUNTIME_MOUNTS, ExpectedTree, TreeEntry,
                                 compare_trees, parse_listing)
from tests.fixtures.workdirs import new_workdir, remove_workdir

from tests.publisher.podmanenv import FUSE_OVERLAYFS, Podman, podman_missing
from tests.publisher.testrepo import podman_image

# ---------------------------------------------------------------------------------------
# the format, without podman


def _digest(data: bytes) -> str:
    return "sha256:" + hashlib.sha256(data).hexdigest()


def fake_image(layout: RepositoryLayout, layer_seeds: list[str], names: list[str],
               config_extra: str = "") -> PodmanImage:
    """An image whose layers are empty dirs in .layers (enough for the store's bookkeeping)."""
    layers = []
    for seed in layer_seeds:
        diff_id, blob = _digest(f"diff {seed}".encode()), _digest(f"blob {seed}".encode())
        layout.layerfs(blob).mkdir(parents=True, exist_ok=True)
        layers.append(PodmanLayer(diff_id, blob, 100, 200, layout.layerfs(blob)))
    config = json.dumps({"created": "2023-11-14T22:13:20Z", "extra": config_extra,
                         "rootfs": {"type": "layers", "diff_ids": [l.diff_id for l in layers]}}).encode()
    manifest = json.dumps({"schemaVersion": 2, "config": {"digest": _digest(config)},
                           "layers": [{"digest": l.compressed_digest} for l in layers]}).encode()
    return PodmanImage(_digest(config), config, _digest(manifest), manifest, names, layers)


@pytest.fixture
def layout(tmp_path: Path) -> RepositoryLayout:
    return RepositoryLayout(tmp_path / "repo")


def _snapshot(root: Path) -> dict[str, tuple]:
    out = {}
    for dirpath, dirnames, filenames in os.walk(root):
        for n in dirnames + filenames:
            p = os.path.join(dirpath, n)
            st = os.lstat(p)
            content = os.readlink(p) if stat.S_ISLNK(st.st_mode) else (
                Path(p).read_bytes() if stat.S_ISREG(st.st_mode) else None)
            out[p] = (st.st_mode, st.st_mtime_ns, st.st_ino, content)
    return out


def test_layer_ids_are_containers_image_ids() -> None:
    a, b, c = (_digest(x) for x in (b"a", b"b", b"c"))
    ids = fmt.layer_ids([a, b, c])
    assert ids[0] == a.removeprefix("sha256:")
    assert ids[1] == hashlib.sha256(f"{ids[0]}+{b.removeprefix('sha256:')}".encode()).hexdigest()
    assert ids[2] == hashlib.sha256(f"{ids[1]}+{c.removeprefix('sha256:')}".encode()).hexdigest()


def test_big_data_file_names_match_podman() -> None:
    # File names podman 4.3.1 itself wrote for these keys when pulling an image.
    assert fmt.big_data_file_name("manifest") == "manifest"
    key = "sha256:4c431674599db1603ebaa7d95d04c42bcf5386e217921ff433e19858a22f1ea1"
    assert fmt.big_data_file_name(key) == ("=c2hhMjU2OjRjNDMxNjc0NTk5ZGIxNjAzZWJhYTdkOTVkMDRjNDJi"
                                           "Y2Y1Mzg2ZTIxNzkyMWZmNDMzZTE5ODU4YTIyZjFlYTE=")
    assert fmt.big_data_file_name("manifest-sha256:1dbaf89f15c0e306c08b96743f19fb4c22a35c609c33efa3"
                                  "f986e289d45d44a8") == (
        "=bWFuaWZlc3Qtc2hhMjU2OjFkYmFmODlmMTVjMGUzMDZjMDhiOTY3NDNmMTlmYjRjMjJhMzVjNjA5YzMzZWZhM2Y5"
        "ODZlMjg5ZDQ1ZDQ0YTg=")


def test_store_layout_on_disk(layout: RepositoryLayout) -> None:
    image = fake_image(layout, ["base", "mid", "top"], ["docker.io/library/x:1"])
    store = PodmanStore(layout)
    store.add_image(image)
    root = layout.podman_store
    for lock in ("overlay-images/images.lock", "overlay-layers/layers.lock"):
        assert (root / lock).is_file() and (root / lock).stat().st_size == 0
    ids = fmt.layer_ids([l.diff_id for l in image.layers])
    [entry] = store.images()
    assert entry["id"] == image.config_digest.removeprefix("sha256:")
    assert entry["layer"] == ids[-1] and entry["digest"] == image.manifest_digest
    assert entry["names"] == ["docker.io/library/x:1"] and entry["created"] == "2023-11-14T22:13:20Z"
    for key, data in ((image.config_digest, image.config_bytes), ("manifest", image.manifest_bytes),
                      (f"manifest-{image.manifest_digest}", image.manifest_bytes)):
        assert key in entry["big-data-names"]
        assert entry["big-data-sizes"][key] == len(data) and entry["big-data-digests"][key] == _digest(data)
        assert (store.big_data_dir(entry["id"]) / fmt.big_data_file_name(key)).read_bytes() == data
    layers = {l["id"]: l for l in store.layers()}
    assert list(layers) == ids
    shorts = []
    for i, (lid, layer) in enumerate(zip(ids, image.layers)):
        e = layers[lid]
        assert e.get("parent") == (ids[i - 1] if i else None)
        assert (e["compressed-diff-digest"], e["compressed-size"], e["diff-digest"], e["diff-size"]) == \
            (layer.compressed_digest, 100, layer.diff_id, 200)
        d = root / "overlay" / lid
        assert not os.path.isabs(os.readlink(d / "diff"))
        assert (d / "diff").resolve() == layer.layerfs
        short = (d / "link").read_text()
        assert len(short) == 26 and short.isupper() and set(short) <= set("ABCDEFGHIJKLMNOPQRSTUVWXYZ234567")
        assert os.readlink(root / "overlay" / "l" / short) == f"../{lid}/diff"
        lower = d / "lower"
        assert (lower.read_text() if i else None) == (":".join(f"l/{s}" for s in reversed(shorts)) or None)
        assert i or not lower.exists()
        shorts.append(short)
    assert store.check() == []


def test_add_image_is_idempotent(layout: RepositoryLayout) -> None:
    store = PodmanStore(layout)
    image = fake_image(layout, ["a", "b"], ["docker.io/x/y:1", "registry.hub.docker.com/x/y:1"])
    store.add_image(image)
    before = _snapshot(layout.podman_store)
    store.add_image(image)
    store.add_image(fake_image(layout, ["a", "b"], ["docker.io/x/y:1", "docker.io/x/y:1"]))
    assert _snapshot(layout.podman_store) == before


def test_a_moved_name_leaves_the_old_image(layout: RepositoryLayout) -> None:
    store = PodmanStore(layout)
    old = fake_image(layout, ["a"], ["docker.io/x/y:latest", "docker.io/x/y:1"])
    new = fake_image(layout, ["a", "b"], ["docker.io/x/y:latest", "docker.io/x/y:2"])
    store.add_image(old)
    store.add_image(new)
    names = {i["id"]: i.get("names") for i in store.images()}
    assert names[old.config_digest[7:]] == ["docker.io/x/y:1"]
    assert names[new.config_digest[7:]] == ["docker.io/x/y:latest", "docker.io/x/y:2"]
    store.add_image(fake_image(layout, ["c"], ["docker.io/x/y:1"]))
    assert "names" not in next(i for i in store.images() if i["id"] == old.config_digest[7:])


def test_one_config_under_two_manifests_is_one_image(layout: RepositoryLayout) -> None:
    store = PodmanStore(layout)
    oci = fake_image(layout, ["a"], ["docker.io/x/oci:1"])
    manifest = oci.manifest_bytes.replace(b'"schemaVersion": 2', b'"schemaVersion": 2, "mediaType": "d"')
    docker = PodmanImage(oci.config_digest, oci.config_bytes, _digest(manifest), manifest,
                         ["docker.io/x/docker:1"], oci.layers)
    store.add_image(oci)
    store.add_image(docker)
    [entry] = store.images()
    assert entry["names"] == ["docker.io/x/docker:1", "docker.io/x/oci:1"]
    assert entry["digest"] == docker.manifest_digest
    assert entry["big-data-digests"][f"manifest-{oci.manifest_digest}"] == oci.manifest_digest
    assert entry["big-data-digests"][f"manifest-{docker.manifest_digest}"] == docker.manifest_digest
    assert store.check() == []


def test_add_images_at_once_equals_one_by_one(tmp_path: Path) -> None:
    """A batch (convert's one store write per run) ends as adding its images in order
    does: shared layers once, a name moved within the batch on its last image, two
    manifests of one config one image."""
    def batch(layout: RepositoryLayout) -> list[PodmanImage]:
        old = fake_image(layout, ["base", "a"], ["docker.io/x/a:latest", "docker.io/x/a:1"])
        oci = fake_image(layout, ["base", "c"], ["docker.io/x/oci:1"])
        manifest = oci.manifest_bytes.replace(b'"schemaVersion": 2', b'"schemaVersion": 2, "mediaType": "d"')
        return [old, fake_image(layout, ["base", "b"], ["docker.io/x/a:latest", "docker.io/x/a:2"]), oci,
                PodmanImage(oci.config_digest, oci.config_bytes, _digest(manifest), manifest,
                            ["docker.io/x/docker:1"], oci.layers), old]
    one, many = RepositoryLayout(tmp_path / "one"), RepositoryLayout(tmp_path / "many")
    PodmanStore(one).add_image(fake_image(one, ["z"], ["docker.io/x/a:2"]))  # already there: loses its name
    PodmanStore(many).add_image(fake_image(many, ["z"], ["docker.io/x/a:2"]))
    for image in batch(one):
        PodmanStore(one).add_image(image)
    store = PodmanStore(many)
    store.add_images(batch(many))
    assert store.images() == PodmanStore(one).images()
    assert [l["id"] for l in store.layers()] == [l["id"] for l in PodmanStore(one).layers()]
    assert sorted(os.listdir(many.podman_store / "overlay")) == sorted(os.listdir(one.podman_store / "overlay"))
    names = [i.get("names") for i in store.images()]
    assert names == [None, ["docker.io/x/a:latest", "docker.io/x/a:1"], ["docker.io/x/a:2"],
                     ["docker.io/x/docker:1", "docker.io/x/oci:1"]]
    assert store.check() == []


def test_a_batch_with_a_bad_image_is_refused_before_anything_is_written(layout: RepositoryLayout) -> None:
    store = PodmanStore(layout)
    good = fake_image(layout, ["a"], ["docker.io/x/a:1"])
    bad = fake_image(layout, ["b"], ["docker.io/x/b:1"])
    bad = PodmanImage(bad.config_digest, bad.config_bytes + b" ", bad.manifest_digest, bad.manifest_bytes,
                      bad.names, bad.layers)
    with pytest.raises(PodmanStoreError):
        store.validate(bad)
    with pytest.raises(PodmanStoreError):
        store.add_images([good, bad])
    assert not layout.podman_store.exists()


def test_remove_image_keeps_shared_layers(layout: RepositoryLayout) -> None:
    store = PodmanStore(layout)
    a = fake_image(layout, ["base", "a"], ["docker.io/x/a:1"])
    b = fake_image(layout, ["base", "b"], ["docker.io/x/b:1"])
    store.add_image(a)
    store.add_image(b)
    assert len(store.layers()) == 3  # the shared base once
    store.remove_image(a.config_digest)
    ids_b = fmt.layer_ids([l.diff_id for l in b.layers])
    assert [l["id"] for l in store.layers()] == ids_b
    assert sorted(os.listdir(layout.podman_store / "overlay")) == sorted(ids_b + ["l"])
    assert len(os.listdir(layout.podman_store / "overlay" / "l")) == 2
    assert not store.big_data_dir(a.config_digest[7:]).exists()
    assert all(l.layerfs.is_dir() for l in a.layers)  # .layers is gc's business, not ours
    store.remove_image(b.config_digest)
    store.remove_image(b.config_digest)
    assert store.images() == [] and store.layers() == []
    assert os.listdir(layout.podman_store / "overlay" / "l") == []
    assert sorted(os.listdir(layout.podman_store / "overlay-images")) == ["images.json", "images.lock"]


def test_remove_images_at_once_keeps_what_others_share(layout: RepositoryLayout) -> None:
    store = PodmanStore(layout)
    imgs = [fake_image(layout, ["base", n], [f"docker.io/x/{n}:1"]) for n in ("a", "b", "c")]
    for img in imgs:
        store.add_image(img)
    store.remove_images([imgs[0].config_digest, imgs[2].config_digest])
    ids_b = fmt.layer_ids([l.diff_id for l in imgs[1].layers])
    assert [i["id"] for i in store.images()] == [imgs[1].config_digest[7:]]
    assert [l["id"] for l in store.layers()] == ids_b
    assert sorted(os.listdir(layout.podman_store / "overlay")) == sorted(ids_b + ["l"])
    assert not store.big_data_dir(imgs[0].config_digest[7:]).exists()
    assert not store.big_data_dir(imgs[2].config_digest[7:]).exists()
    assert store.check() == []


def test_crash_leftovers_are_swept(layout: RepositoryLayout) -> None:
    store = PodmanStore(layout)
    store.add_image(fake_image(layout, ["a"], ["docker.io/x/a:1"]))
    stray_id = "ab" * 32
    (layout.podman_store / "overlay" / stray_id).mkdir()
    (layout.podman_store / "overlay" / "l" / "STRAY").symlink_to(f"../{stray_id}/diff")
    (layout.podman_store / "overlay-images" / ("cd" * 32)).mkdir()
    store.add_image(fake_image(layout, ["b"], ["docker.io/x/b:1"]))
    assert not (layout.podman_store / "overlay" / stray_id).exists()
    assert not os.path.lexists(layout.podman_store / "overlay" / "l" / "STRAY")
    assert not (layout.podman_store / "overlay-images" / ("cd" * 32)).exists()
    assert len(store.images()) == 2 and store.check() == []


@pytest.mark.parametrize("plant", ["fifo", "symlink-to-dev-zero", "symlink-to-a-file", "symlinked-dir"])
def test_planted_store_files_are_errors_not_hangs_or_reads_elsewhere(layout: RepositoryLayout, tmp_path: Path,
                                                                    plant: str) -> None:
    """images.json (read by convert's unchanged test, gc and check, and compared before each
    write) reached without following a symlink, and only as a bounded regular file."""
    store = PodmanStore(layout)
    store.add_image(fake_image(layout, ["a"], ["docker.io/x/a:1"]))
    images_dir = store.images_json.parent
    outside = tmp_path / "outside"
    outside.mkdir()
    (outside / fmt.IMAGES_JSON).write_text("[]")
    store.images_json.unlink()
    if plant == "fifo":
        os.mkfifo(store.images_json)
    elif plant == "symlink-to-dev-zero":
        os.symlink("/dev/zero", store.images_json)
    elif plant == "symlink-to-a-file":
        os.symlink(outside / fmt.IMAGES_JSON, store.images_json)
    else:
        shutil.rmtree(images_dir)
        os.symlink(outside, images_dir)
    with pytest.raises(PodmanStoreError, match="symbolic link|FIFO|no directory"):
        store.images()
    with pytest.raises((PodmanStoreError, NotBeneath)):
        store.add_image(fake_image(layout, ["b"], ["docker.io/x/b:1"]))
    assert (outside / fmt.IMAGES_JSON).read_text() == "[]"  # nothing written through the symlink


def test_a_short_link_another_tool_drew_is_kept_while_its_layer_is_needed(layout: RepositoryLayout) -> None:
    """Ours are derived from the layer id (the sweep reads no `link` file); one drawn at
    random, as containers/storage does, stays while it leads to a needed layer."""
    store = PodmanStore(layout)
    image = fake_image(layout, ["a"], ["docker.io/x/a:1"])
    store.add_image(image)
    [lid] = [l["id"] for l in store.layers()]
    links = layout.podman_store / "overlay" / "l"
    ours = fmt.short_link_id(lid)
    (links / ours).rename(links / "RANDOMSHORTLINKDRAWNBYPODMN")
    (layout.podman_store / "overlay" / lid / "link").write_text("RANDOMSHORTLINKDRAWNBYPODMN")
    (links / "STALE").symlink_to("../" + "ef" * 32 + "/diff")
    store.add_image(fake_image(layout, ["b"], ["docker.io/x/b:1"]))
    assert os.readlink(links / "RANDOMSHORTLINKDRAWNBYPODMN") == f"../{lid}/diff"
    assert not os.path.lexists(links / "STALE")
    assert len(store.images()) == 2


def test_bad_images_are_refused_and_change_nothing(layout: RepositoryLayout, tmp_path: Path) -> None:
    store = PodmanStore(layout)
    good = fake_image(layout, ["a"], ["docker.io/x/a:1"])
    bad = [
        PodmanImage(good.config_digest, good.config_bytes + b" ", good.manifest_digest,
                    good.manifest_bytes, good.names, good.layers),
        PodmanImage(good.config_digest, good.config_bytes, good.manifest_digest,
                    good.manifest_bytes, ["has space:1"], good.layers),
        PodmanImage(good.config_digest, good.config_bytes, good.manifest_digest,
                    good.manifest_bytes, good.names, good.layers * 2),
        PodmanImage(good.config_digest, good.config_bytes, good.manifest_digest, good.manifest_bytes,
                    good.names, [PodmanLayer(good.layers[0].diff_id, good.layers[0].compressed_digest,
                                             1, 1, tmp_path)]),
        fake_image(layout, ["missing"], ["docker.io/x/m:1"]),
    ]
    shutil.rmtree(bad[-1].layers[0].layerfs)
    for image in bad:
        with pytest.raises(PodmanStoreError):
            store.add_image(image)
    assert not layout.podman_store.exists() or store.images() == []


def test_platform_store_links_into_shared_layers(layout: RepositoryLayout) -> None:
    arm = layout.for_platform("linux", "arm64")
    image = fake_image(layout, ["a"], ["docker.io/x/a:1"])
    PodmanStore(arm).add_image(image)
    lid = fmt.layer_ids([image.layers[0].diff_id])[0]
    diff = arm.podman_store / "overlay" / lid / "diff"
    assert arm.podman_store == layout.root / ".multiarch" / ".podman" / "linux-arm64"  # no ":" for overlay
    assert diff.resolve() == image.layers[0].layerfs


def chain_image(layout: RepositoryLayout, layer_seeds: list[str], names: list[str],
                config_extra: str = "") -> PodmanImage:
    """fake_image served from its top chain (an empty dir in .chains)."""
    image = fake_image(layout, layer_seeds, names, config_extra)
    top = chain_ids([l.diff_id for l in image.layers])[-1]
    layout.chain_dir(top).mkdir(parents=True, exist_ok=True)
    image.root = PodmanRoot(top, layout.chain_dir(top), 300)
    return image


def test_chain_form_is_one_layer_with_the_top_chain_as_diff(layout: RepositoryLayout) -> None:
    store = PodmanStore(layout)
    image = chain_image(layout, ["base", "top"], ["docker.io/x/c:1"])
    store.add_image(image)
    top = chain_ids([l.diff_id for l in image.layers])[-1]
    lid = fmt.chain_layer_id(top)
    assert lid == hashlib.sha256(f"chain:{top}".encode()).hexdigest()
    assert lid not in fmt.layer_ids([l.diff_id for l in image.layers])
    [entry] = store.images()
    assert entry["layer"] == lid
    [layer] = store.layers()
    assert set(layer) == {"id", "created", "diff-digest", "diff-size"}
    assert (layer["id"], layer["diff-digest"], layer["diff-size"]) == (lid, f"sha256:{lid}", 300)
    d = layout.podman_store / "overlay" / lid
    assert not os.path.isabs(os.readlink(d / "diff")) and (d / "diff").resolve() == layout.chain_dir(top)
    assert not (d / "lower").exists()
    assert os.readlink(layout.podman_store / "overlay" / "l" / (d / "link").read_text()) == f"../{lid}/diff"
    assert store.check() == []
    before = _snapshot(layout.podman_store)
    store.add_image(image)
    assert _snapshot(layout.podman_store) == before


def test_chain_layers_are_shared_and_swept(layout: RepositoryLayout) -> None:
    """Two configs with the same layers share the chain layer; a per-layer image of the same
    layers keeps its own ids; a re-publish in chain form drops the per-layer entries."""
    store = PodmanStore(layout)
    a = chain_image(layout, ["base", "top"], ["docker.io/x/a:1"])
    b = chain_image(layout, ["base", "top"], ["docker.io/x/b:1"], config_extra="b")
    per_layer = fake_image(layout, ["base", "top"], ["docker.io/x/p:1"], config_extra="p")
    for image in (a, b, per_layer):
        store.add_image(image)
    ids = fmt.layer_ids([l.diff_id for l in a.layers])
    lid = fmt.chain_layer_id(a.root.chain_id)
    assert sorted(l["id"] for l in store.layers()) == sorted(ids + [lid])
    store.remove_image(a.config_digest)
    assert sorted(l["id"] for l in store.layers()) == sorted(ids + [lid])
    per_layer.root = b.root
    store.add_image(per_layer)  # the same config, now in chain form
    assert [l["id"] for l in store.layers()] == [lid]
    assert sorted(os.listdir(layout.podman_store / "overlay")) == sorted([lid, "l"])
    assert len(os.listdir(layout.podman_store / "overlay" / "l")) == 1
    store.remove_images([b.config_digest, per_layer.config_digest])
    assert store.layers() == [] and os.listdir(layout.podman_store / "overlay" / "l") == []


def test_chain_form_refuses_a_wrong_chain(layout: RepositoryLayout, tmp_path: Path) -> None:
    store = PodmanStore(layout)
    image = chain_image(layout, ["base", "top"], ["docker.io/x/c:1"])
    other = chain_image(layout, ["base"], ["docker.io/x/o:1"])
    for root in (other.root, PodmanRoot(image.root.chain_id, tmp_path, 1),
                 PodmanRoot(image.root.chain_id, image.root.path, -1)):
        image.root = root
        with pytest.raises(PodmanStoreError):
            store.add_image(image)
    assert not layout.podman_store.exists() or store.images() == []


def test_check_reports_a_layer_dir_with_raw_whiteouts(layout: RepositoryLayout) -> None:
    """A store written before the chain form (or by hand) that stacks raw layer dirs."""
    store = PodmanStore(layout)
    image = fake_image(layout, ["base", "top"], ["docker.io/x/r:1"])
    for layer, whiteouts in zip(image.layers, ("none", "raw")):
        write_layers_json(layout.layers_json(layer.compressed_digest), LayerMetadata(
            id=layer.diff_id[7:], compressed_diff_digest=layer.compressed_digest, diff_digest=layer.diff_id,
            diff_size=1, whiteouts=whiteouts))
    store.add_image(image)
    [problem] = store.check()
    assert fmt.layer_ids([l.diff_id for l in image.layers])[1] in problem and "whiteouts raw" in problem


# ---------------------------------------------------------------------------------------
# real podman

# What podman itself puts into a container (mount points, the /etc/mtab link), on top of
# the runtime mounts.
PODMAN_MOUNTS = RUNTIME_MOUNTS | {"/etc/hosts", "/etc/hostname", "/etc/resolv.conf", "/etc/mtab"}
OVERLAY_CASES = ["multilayer", "multilayer_docker", "tagged:1.1", "tagged:2.0"]
RAW_CASES = ["multilayer", "tagged:1.1"]


def _needs_podman() -> None:
    why = podman_missing()
    if why:
        pytest.skip(why)


def pick(images: StandardImages, case: str) -> BuiltImage:
    if case.startswith("tagged:"):
        return images.tagged[case.split(":", 1)[1]]
    return getattr(images, case)


def names_of(img: BuiltImage) -> list[str]:
    """What the publisher would write for a Docker Hub wishlist entry
    `https://registry.hub.docker.com/<repo>:<tag>`: docker.io's spelling and the wishlist's."""
    repo = img.name.replace("test/", "library/", 1) if img.name == "test/multilayer" else img.name
    return [f"docker.io/{repo}:{img.tag}", f"registry.hub.docker.com/{repo}:{img.tag}"]


def build_repo(root: Path, standard_images: StandardImages, cases: list[str],
               whiteouts: str, chain_root: bool = False) -> RepositoryLayout:
    layout = RepositoryLayout(root)
    store = PodmanStore(layout)
    for case in cases:
        img = pick(standard_images, case)
        store.add_image(podman_image(layout, img.host, img.name, img.manifest_digest,
                                     names_of(img), whiteouts, chain_root=chain_root))
    return layout


def umoci_tree(standard_images: StandardImages, case: str, work: Path) -> ExpectedTree:
    """The image's root fs as `umoci unpack` makes it (the reference, independent of us)."""
    if case.startswith("tagged:"):  # built by the fixtures next to the hand-written layout
        image = f"{standard_images.layout.parent / 'umoci-layout'}:{case.split(':', 1)[1]}"
    else:
        image = f"{standard_images.layout}:multilayer"
    bundle = work / f"umoci-{case.replace(':', '-')}"
    if not bundle.exists():
        subprocess.run(["umoci", "unpack", "--image", image, str(bundle)], check=True, capture_output=True)
    rootfs = bundle / "rootfs"
    entries: dict[str, TreeEntry] = {}
    inodes: dict[int, set[str]] = {}
    for dirpath, dirnames, filenames in os.walk(rootfs):
        for n in dirnames + filenames:
            p = Path(dirpath) / n
            st = os.lstat(p)
            kind = ("dir" if stat.S_ISDIR(st.st_mode) else "symlink" if stat.S_ISLNK(st.st_mode)
                    else "file" if stat.S_ISREG(st.st_mode) else "other")
            path = "/" + str(p.relative_to(rootfs))
            entries[path] = TreeEntry(kind, stat.S_IMODE(st.st_mode), st.st_uid, st.st_gid,
                                      st.st_size if kind == "file" else None,
                                      os.readlink(p) if kind == "symlink" else None)
            if kind != "dir" and st.st_nlink > 1:
                inodes.setdefault(st.st_ino, set()).add(path)
    return ExpectedTree(dict(sorted(entries.items())), [frozenset(s) for s in inodes.values() if len(s) > 1])


def graphroot_usage(podman: Podman) -> tuple[int, list[str]]:
    """(bytes under podman's graphroot, layer dirs it holds)."""
    total = 0
    for dirpath, _dirs, files in os.walk(podman.graphroot):
        total += sum(os.lstat(os.path.join(dirpath, f)).st_size for f in files)
    layer_dirs = [d for d in os.listdir(podman.graphroot / "overlay") if d != "l" and not d.startswith(".")] \
        if (podman.graphroot / "overlay").exists() else []
    return total, layer_dirs


@pytest.fixture(scope="module")
def podman_base() -> Iterator[Path]:
    _needs_podman()
    base = new_workdir("podman-t-")
    yield base
    remove_workdir(base)


@pytest.fixture(scope="module")
def overlay_repo(podman_base: Path, standard_images: StandardImages) -> RepositoryLayout:
    cases = OVERLAY_CASES + ["tagged:1.0"]
    return build_repo(podman_base / "repo-overlay", standard_images, cases, "overlay")


@pytest.fixture(scope="module")
def podman(podman_base: Path, overlay_repo: RepositoryLayout) -> Podman:
    return Podman(podman_base / "podman-overlay", stores=[overlay_repo.podman_store])


@pytest.fixture(scope="module")
def raw_repo(podman_base: Path, standard_images: StandardImages) -> RepositoryLayout:
    """As the cvmfs backend publishes: raw whiteouts, each image one podman layer = its top
    chain, and the layer dirs' `.wh.` files gone as after a real CernVM-FS publish."""
    return build_repo(podman_base / "repo-raw", standard_images, RAW_CASES, "raw", chain_root=True)


@pytest.fixture(scope="module")
def podman_raw(podman_base: Path, raw_repo: RepositoryLayout) -> Podman:
    return Podman(podman_base / "podman-raw", stores=[raw_repo.podman_store])


@pytest.fixture(scope="module")
def podman_fuse(podman_base: Path, raw_repo: RepositoryLayout) -> Podman:
    if not os.access(FUSE_OVERLAYFS, os.X_OK) or not os.path.exists("/dev/fuse"):
        pytest.skip("fuse-overlayfs or /dev/fuse missing (apt-get install fuse-overlayfs)")
    return Podman(podman_base / "podman-fuse", stores=[raw_repo.podman_store], mount_program=FUSE_OVERLAYFS)


def test_podman_lists_the_images_by_name(podman: Podman, overlay_repo: RepositoryLayout,
                                         standard_images: StandardImages) -> None:
    listed = {i["Id"]: i for i in podman.images()}
    for case in OVERLAY_CASES:
        img = pick(standard_images, case)
        entry = listed[img.config_digest.removeprefix("sha256:")]
        assert set(names_of(img)) <= set(entry["Names"]), case
        assert entry["ReadOnly"] is True
    # Short names resolve through docker.io's spelling, digests through the manifests.
    ml = standard_images.multilayer
    podman.run("multilayer:v1", "/bin/true")
    podman.run(f"docker.io/library/multilayer@{ml.manifest_digest}", "/bin/true")
    mld = standard_images.multilayer_docker  # same config: the same image, its second manifest
    podman.run(f"docker.io/{mld.name}@{mld.manifest_digest}", "/bin/true")
    assert PodmanStore(overlay_repo).check() == []


@pytest.mark.parametrize("case", OVERLAY_CASES)
def test_podman_run_shows_the_image_tree(podman: Podman, standard_images: StandardImages,
                                         podman_base: Path, case: str) -> None:
    img = pick(standard_images, case)
    observed = parse_listing(podman.run(names_of(img)[0], *LISTING_COMMAND).stdout)
    assert "/bin/busybox" in observed.entries
    assert compare_trees(img.tree, observed, ignore=PODMAN_MOUNTS) == []
    assert compare_trees(umoci_tree(standard_images, case, podman_base), observed, ignore=PODMAN_MOUNTS) == []
    # ... and by the wishlist's spelling.
    assert podman.run(names_of(img)[1], "/bin/true").returncode == 0


def test_images_share_their_common_layers(podman: Podman, overlay_repo: RepositoryLayout,
                                          standard_images: StandardImages) -> None:
    store = PodmanStore(overlay_repo)
    tops = {}
    all_ids: set[str] = set()
    for t, img in standard_images.tagged.items():
        ids = fmt.layer_ids(img.diff_ids)
        all_ids.update(ids)
        tops[t] = ids
    assert tops["1.1"][: len(tops["1.0"])] == tops["1.0"]
    assert tops["2.0"][: len(tops["1.1"])] == tops["1.1"]
    ml_ids = fmt.layer_ids(standard_images.multilayer.diff_ids)
    layer_ids = [l["id"] for l in store.layers()]
    assert sorted(layer_ids) == sorted(all_ids | set(ml_ids))  # each shared layer once
    # OCI and Docker manifests of the same config: one image, both digests known to podman.
    ml, mld = standard_images.multilayer, standard_images.multilayer_docker
    if ml.config_digest == mld.config_digest:
        entry = next(i for i in store.images() if i["id"] == ml.config_digest[7:])
        assert {f"manifest-{ml.manifest_digest}", f"manifest-{mld.manifest_digest}"} <= set(entry["big-data-names"])
    inspect = json.loads(podman("image", "inspect", names_of(standard_images.tagged["2.0"])[0],
                                names_of(standard_images.tagged["1.0"])[0]).stdout)
    assert inspect[0]["RootFS"]["Layers"][:1] == inspect[1]["RootFS"]["Layers"]


def test_podman_layer_ids_match_a_real_pull(podman_base: Path, standard_images: StandardImages) -> None:
    """The ids we give layers are the ones podman gives them when it pulls the image itself."""
    img = standard_images.tagged["2.0"]
    puller = Podman(podman_base / "podman-pull")
    puller("pull", "--tls-verify=false", img.ref)
    pulled = json.loads((puller.graphroot / "overlay-layers" / "layers.json").read_text())
    assert {l["id"] for l in pulled} == set(fmt.layer_ids(img.diff_ids))
    images = json.loads((puller.graphroot / "overlay-images" / "images.json").read_text())
    assert [i["id"] for i in images] == [img.config_digest.removeprefix("sha256:")]


def test_a_moved_tag_shows_the_new_image(podman: Podman, overlay_repo: RepositoryLayout,
                                         standard_images: StandardImages) -> None:
    store = PodmanStore(overlay_repo)
    moving = "docker.io/test/tagged:stable"
    for version in ("1.0", "2.0"):
        img = standard_images.tagged[version]
        store.add_image(podman_image(overlay_repo, img.host, img.name, img.manifest_digest,
                                     names_of(img) + [moving]))
        assert podman.run(moving, "/bin/cat", "/version").stdout.strip() == version
    old = next(i for i in podman.images() if i["Id"] == standard_images.tagged["1.0"].config_digest[7:])
    assert moving not in old["Names"]
    assert store.check() == []


def test_podman_graphroot_stays_empty(podman: Podman, standard_images: StandardImages) -> None:
    podman.run(names_of(standard_images.multilayer)[0], "/bin/sh", "-c", "echo x > /data/written")
    size, layer_dirs = graphroot_usage(podman)
    assert layer_dirs == []
    assert json.loads((podman.graphroot / "overlay-layers" / "layers.json").read_text()) == []
    assert size < 1 << 20, f"graphroot holds {size} bytes"


@pytest.mark.parametrize("overlay", ["kernel", "fuse-overlayfs"])
def test_raw_whiteouts_images_run_from_their_chains(request: pytest.FixtureRequest, raw_repo: RepositoryLayout,
                                                    standard_images: StandardImages, podman_base: Path,
                                                    overlay: str) -> None:
    """The layer dirs carry no deletions (their `.wh.` files are gone, as on a CernVM-FS
    client): the images still show exactly their trees, with either overlay."""
    pm: Podman = request.getfixturevalue("podman_raw" if overlay == "kernel" else "podman_fuse")
    ml = standard_images.multilayer
    second = raw_repo.layerfs(ml.layers[1])
    assert (second / "data").is_dir() and not (second / "data" / ".wh.delete-me.txt").exists()
    for case in RAW_CASES:
        img = pick(standard_images, case)
        assert img.tree.absent, case  # the case deletes something a lower layer has
        observed = parse_listing(pm.run(names_of(img)[0], *LISTING_COMMAND).stdout)
        assert not [p for p in observed.entries if "/.wh." in p], case
        for gone in img.tree.absent:
            assert gone not in observed.entries, f"{case}: deleted {gone} is visible"
        assert compare_trees(img.tree, observed, ignore=PODMAN_MOUNTS) == [], case
        assert compare_trees(umoci_tree(standard_images, case, podman_base), observed,
                             ignore=PODMAN_MOUNTS) == [], case
        # ... and by the wishlist's spelling and the manifest digest.
        assert pm.run(names_of(img)[1], "/bin/true").returncode == 0
    _, layer_dirs = graphroot_usage(pm)
    assert layer_dirs == []
    assert PodmanStore(raw_repo).check() == []


def _big_data_size(store: PodmanStore, image_id: str) -> int:
    [entry] = [i for i in store.images() if i["id"] == image_id]
    return sum(entry["big-data-sizes"].values())


def test_raw_whiteouts_images_in_podman_listing_and_inspect(podman_raw: Podman, raw_repo: RepositoryLayout,
                                                            standard_images: StandardImages) -> None:
    """One podman layer per image (its top chain); podman lists it with a size and shows the
    image's own diff_ids in inspect."""
    store = PodmanStore(raw_repo)
    listed = {i["Id"]: i for i in podman_raw.images()}
    for case in RAW_CASES:
        img = pick(standard_images, case)
        entry = listed[img.config_digest.removeprefix("sha256:")]
        assert set(names_of(img)) <= set(entry["Names"]) and entry["ReadOnly"] is True
        assert entry["Size"] > 0
        [inspect] = json.loads(podman_raw("image", "inspect", names_of(img)[0]).stdout)
        assert inspect["RootFS"]["Layers"] == img.diff_ids
        top = fmt.chain_layer_id(chain_ids(img.diff_ids)[-1])
        assert inspect["GraphDriver"]["Data"]["UpperDir"] == str(store.layer_dir(top) / "diff"), inspect["GraphDriver"]
        assert "LowerDir" not in inspect["GraphDriver"]["Data"]  # one layer: no lowers
        assert inspect["Size"] == sum(json.loads(raw_repo.layers_json(d).read_text())[0]["diff-size"]
                                      for d in img.layers) + _big_data_size(store, inspect["Id"])
    ml = standard_images.multilayer
    podman_raw.run(f"docker.io/library/multilayer@{ml.manifest_digest}", "/bin/true")
    assert {l["id"] for l in store.layers()} == {fmt.chain_layer_id(chain_ids(pick(standard_images, c).diff_ids)[-1])
                                                 for c in RAW_CASES}


def test_a_missing_layer_breaks_only_its_image(podman_base: Path, standard_images: StandardImages) -> None:
    root = new_workdir("repo-missing-", podman_base)
    layout = build_repo(root, standard_images, ["tagged:1.1", "tagged:2.0"], "overlay")
    pm = Podman(new_workdir("podman-missing-", podman_base), stores=[layout.podman_store])
    two, one = standard_images.tagged["2.0"], standard_images.tagged["1.1"]
    assert two.layers[-1] not in one.layers
    os.rename(layout.layerfs(two.layers[-1]), layout.layer_dir(two.layers[-1]) / "moved-away")
    assert {names_of(two)[0], names_of(one)[0]} <= pm.image_names()
    assert pm.run(names_of(two)[0], "/bin/true", check=False).returncode != 0
    assert pm.run(names_of(one)[0], "/bin/cat", "/version").stdout.strip() == "1.1"
    problems = PodmanStore(layout).check()
    assert len(problems) == 1 and two.layers[-1] in problems[0]


def test_store_on_a_read_only_mount(podman_base: Path, overlay_repo: RepositoryLayout,
                                    standard_images: StandardImages) -> None:
    """As on /cvmfs: podman must not need to write anything into the store."""
    ro = new_workdir("ro-", podman_base)
    subprocess.run(["mount", "--bind", str(overlay_repo.root), str(ro)], check=True)
    try:
        subprocess.run(["mount", "-o", "remount,bind,ro", str(ro)], check=True)
        pm = Podman(new_workdir("podman-ro-", podman_base), stores=[ro / "podmanStore"])
        img = standard_images.multilayer
        observed = parse_listing(pm.run(names_of(img)[0], *LISTING_COMMAND).stdout)
        assert compare_trees(img.tree, observed, ignore=PODMAN_MOUNTS) == []
    finally:
        subprocess.run(["umount", str(ro)], check=True)

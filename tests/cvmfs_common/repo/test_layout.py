"""The repository layout: paths, hostile input, metadata files, atomic publishing."""
from __future__ import annotations

import json
import os
import stat
import threading

import pytest

from cvmfs_common.oci.digest import InvalidDigest
from cvmfs_common.repo.metadata import (LayerMetadata, MetadataError, add_origin, read_layers_json, read_origin_json,
    write_layers_json, write_origin_json)
from cvmfs_common.repo.paths import (LayoutError, RepositoryLayout, multiarch_aliases, multiarch_name,
                                     variant_default_arch)
from cvmfs_common.fsutil.atomic import (atomic_symlink, atomic_write_file, exchange_dirs, fsync_dir, publish_dir,
    relative_link_target, syncfs)
from cvmfs_common.repo.diffids import ensure_diffid_link, retarget_or_drop
from cvmfs_common.repo.lookup import find_chain, find_layer, find_layer_by_diff_id
from cvmfs_common.oci.reference import InvalidReference

HEX = "ab" + "0123456789abcdef" * 3 + "0123456789abcd"
D = f"sha256:{HEX}"
CFG = "sha256:" + "cd" * 32
DIFF = "ef" * 32


def test_paths(tmp_path):
    L = RepositoryLayout(tmp_path)
    assert L.layer_dir(D) == tmp_path / ".layers" / "ab" / HEX
    assert L.layerfs(D) == tmp_path / ".layers" / "ab" / HEX / "layerfs"
    assert L.layers_json(D) == tmp_path / ".layers/ab" / HEX / ".metadata/layers.json"
    assert L.origin_json(D) == tmp_path / ".layers/ab" / HEX / ".metadata/origin.json"
    assert L.chain_dir(D) == tmp_path / ".chains/ab" / HEX
    assert L.flat_dir(CFG) == tmp_path / ".flat/cd" / CFG[7:]
    assert L.link_path("registry.hub.docker.com", "library/debian", "stable") == \
        tmp_path / "registry.hub.docker.com/library/debian:stable"
    assert L.manifest_json("docker.io", "library/debian", "stable") == \
        tmp_path / ".metadata/docker.io/library/debian:stable/manifest.json"
    assert L.podman_store == tmp_path / "podmanStore"
    assert L.tmp_dir == tmp_path / ".tmp"
    # digest-only references name the link by the digest (DUCC 1 does the same)
    assert L.link_path("ghcr.io", "a/b", CFG) == tmp_path / f"ghcr.io/a/b:{CFG}"
    # never "sha256:" in content-addressed paths
    for p in (L.layer_dir(D), L.chain_dir(D), L.flat_dir(CFG)):
        assert "sha256" not in str(p.relative_to(tmp_path))


def test_platform_layout_shares_content(tmp_path):
    L = RepositoryLayout(tmp_path).for_platform("linux", "arm64", "v8")
    assert L.image_root == tmp_path / ".multiarch/arm64:v8"
    assert L.link_path("docker.io", "library/debian", "12") == tmp_path / ".multiarch/arm64:v8/docker.io/library/debian:12"
    assert L.manifest_json("docker.io", "library/debian", "12") == \
        tmp_path / ".multiarch/arm64:v8/.metadata/docker.io/library/debian:12/manifest.json"
    # no ':' in a podman store path: overlay's lowerdir would split there
    assert L.podman_store == tmp_path / ".multiarch/.podman/linux-arm64-v8"
    # Go's default variants: arm64 means arm64/v8, arm means arm/v7
    assert RepositoryLayout(tmp_path).for_platform("linux", "arm64").image_root == tmp_path / ".multiarch/arm64:v8"
    assert RepositoryLayout(tmp_path).for_platform("linux", "arm", "v6").image_root == tmp_path / ".multiarch/arm:v6"
    assert RepositoryLayout(tmp_path).for_platform("linux", "386").image_root == tmp_path / ".multiarch/386"
    # content stays shared with the default platform
    assert L.layerfs(D) == RepositoryLayout(tmp_path).layerfs(D)
    assert L.flat_dir(CFG) == RepositoryLayout(tmp_path).flat_dir(CFG)
    assert L.tmp_dir == tmp_path / ".tmp"
    assert RepositoryLayout(tmp_path).for_platform("linux", "amd64").platform == "linux-amd64"
    for bad in (("linux", "../x"), ("linux", ""), ("Linux", "amd64"), ("linux", "amd64", "v8/.."), ("linux", "a\x00")):
        with pytest.raises(LayoutError):
            RepositoryLayout(tmp_path).for_platform(*bad)
    with pytest.raises(LayoutError):
        RepositoryLayout(tmp_path, platform="../../etc")


def test_multiarch_names_and_aliases(tmp_path):
    assert multiarch_name("amd64") == "amd64" and multiarch_name("arm64") == "arm64:v8"
    assert multiarch_name("arm", "v6") == "arm:v6" and multiarch_name("ppc64le") == "ppc64le"
    for bad in (("../x",), ("amd64", "v1/.."), ("AMD64",), ("",)):
        with pytest.raises(LayoutError):
            multiarch_name(*bad)
    L = RepositoryLayout(tmp_path)
    assert L.multiarch_link("arm64:v8", "docker.io", "library/debian", "12") == \
        tmp_path / ".multiarch/arm64:v8/docker.io/library/debian:12"
    with pytest.raises(LayoutError):
        L.multiarch_link("../..", "docker.io", "library/debian", "12")
    assert multiarch_aliases("amd64") == ["x86-64", "x86_64"]
    assert multiarch_aliases("arm64:v8") == ["aarch64", "arm64"]
    assert multiarch_aliases("arm:v6") == ["armel"] and multiarch_aliases("386") == ["i386", "i686"]
    assert multiarch_aliases("arm:v7") == ["armv7l"]  # uname -m: what CVMFS_ARCH is on such a client
    assert multiarch_aliases("s390x") == []
    (tmp_path / ".multiarch/arm64:v8").mkdir(parents=True)
    made = L.ensure_multiarch_aliases("arm64:v8")
    assert sorted(p.name for p in made) == ["aarch64", "arm64"]
    assert os.readlink(tmp_path / ".multiarch/aarch64") == "arm64:v8"
    assert L.ensure_multiarch_aliases("arm64:v8") == []
    with pytest.raises(LayoutError):
        L.link_path("podmanstore", "a", "b")


def test_variant_link_target_is_duccs_byte_for_byte(tmp_path) -> None:
    """DUCC's GetVariantSymlinkTarget: one ../ per directory of <registry>/<repo> above the
    link, then .multiarch/$(CVMFS_ARCH:-<GOARCH>)/<registry>/<repo>:<tag>."""
    L = RepositoryLayout(tmp_path)
    assert L.variant_link_target("amd64", "docker.io", "user/myimage", "latest") == \
        "../../.multiarch/$(CVMFS_ARCH:-amd64)/docker.io/user/myimage:latest"
    assert L.variant_link_target("amd64", "ghcr.io", "org/team/tool", "1.0") == \
        "../../../.multiarch/$(CVMFS_ARCH:-amd64)/ghcr.io/org/team/tool:1.0"
    assert L.variant_link_target("arm64", "127.0.0.1:5000", "x", "v1") == \
        "../.multiarch/$(CVMFS_ARCH:-arm64)/127.0.0.1:5000/x:v1"
    # the default names a .multiarch entry: the Go arch where it is the dir or an alias
    assert [variant_default_arch(n) for n in ("amd64", "arm64:v8", "arm:v7", "ppc64le")] == \
        ["amd64", "arm64", "arm:v7", "ppc64le"]
    for bad in ("$(X)", "../x", ""):
        with pytest.raises(LayoutError):
            L.variant_link_target(bad, "docker.io", "a", "b")


HOSTILE_DIGESTS = [
    "../../etc", "sha256:../../x", "sha256:" + "../" * 21 + "x", "/etc/passwd",
    "sha256:" + HEX.upper(), "sha256:" + HEX[:10], HEX, "sha256:" + HEX + "\x00",
    "sha256:" + HEX[:63] + "/", "md5:" + HEX, "",
]


@pytest.mark.parametrize("bad", HOSTILE_DIGESTS)
def test_hostile_digests_raise_before_touching(tmp_path, bad):
    root = tmp_path / "repo"  # does not exist: any touch would create or stat it
    L = RepositoryLayout(root)
    for fn in (L.layer_dir, L.layerfs, L.layers_json, L.origin_json, L.chain_dir, L.flat_dir):
        with pytest.raises(InvalidDigest):
            fn(bad)
    with pytest.raises(InvalidDigest):
        find_layer(L, bad)
    with pytest.raises(InvalidDigest):
        find_chain(L, bad)
    assert not root.exists()
    assert list(tmp_path.iterdir()) == []


HOSTILE_NAMES = [
    ("..", "a", "b"), ("reg.io", "../a", "b"), ("reg.io", "a/../../b", "b"), ("reg.io", "/abs", "b"),
    ("/etc", "a", "b"), ("reg.io", "a//b", "t"), ("reg.io", "", "t"), ("", "a", "t"),
    ("reg.io", "a\x00b", "t"), ("reg.io", "a", "t\x00"), ("reg.io", "a", "../../t"),
    ("reg.io", "a", "t/x"), ("reg.io", "a", ""), ("reg\x00.io", "a", "t"), ("reg.io/x", "a", "t"),
    ("reg.io", "a/.", "t"), ("reg.io", "a", ".."), ("reg.io", "A", "t"), ("reg.io", "a", "sha256:../x"),
    ("podmanStore", "a", "t"), ("PODMANSTORE", "a", "t"),
]


@pytest.mark.parametrize("registry, repository, tag", HOSTILE_NAMES)
def test_hostile_names_raise_before_touching(tmp_path, registry, repository, tag):
    root = tmp_path / "repo"
    L = RepositoryLayout(root)
    for fn in (L.link_path, L.image_metadata_dir, L.manifest_json):
        with pytest.raises((InvalidReference, LayoutError)):
            fn(registry, repository, tag)
    with pytest.raises((InvalidReference, LayoutError)):
        _link_to_flat(L, registry, repository, tag, CFG)
    assert not root.exists()


def test_layout_helpers_refuse_paths_outside_root(tmp_path):
    L = RepositoryLayout(tmp_path / "repo")
    with pytest.raises(LayoutError):
        L.atomic_write_file(tmp_path / "outside.json", b"{}")
    with pytest.raises(LayoutError):
        L.atomic_write_file(tmp_path / "repo" / ".." / "outside.json", b"{}")
    with pytest.raises(LayoutError):
        L.atomic_symlink("x", tmp_path / "elsewhere")
    assert not (tmp_path / "outside.json").exists()
    assert not (tmp_path / "repo").exists()


def _meta(**kw) -> LayerMetadata:
    args = dict(id=DIFF, compressed_diff_digest=D, diff_digest=f"sha256:{DIFF}", diff_size=1234,
                whiteouts="overlay", created="2024-01-02T03:04:05Z")
    args.update(kw)
    return LayerMetadata(**args)


def test_layers_json_roundtrip_and_key_spelling(tmp_path):
    L = RepositoryLayout(tmp_path)
    m = _meta(parent_chain="sha256:" + "11" * 32)
    write_layers_json(L.layers_json(D), m)
    obj = json.loads(L.layers_json(D).read_text())
    assert obj == [{"id": DIFF, "created": "2024-01-02T03:04:05Z", "compressed-diff-digest": D,
                    "diff-digest": f"sha256:{DIFF}", "diff-size": 1234, "whiteouts": "overlay",
                    "parent-chain": "sha256:" + "11" * 32}]
    assert read_layers_json(L.layers_json(D)) == m
    # parent-chain omitted when absent
    assert "parent-chain" not in _meta().to_json_obj()


def test_layers_json_as_ducc_writes_it(tmp_path):
    # DUCC (ducc/lib StoreLayerInfo): json.MarshalIndent of [LayerInfo], no whiteouts key.
    p = tmp_path / "layers.json"
    p.write_text(json.dumps([{"id": DIFF, "created": "2021-03-04T05:06:07.123456789+01:00",
                              "compressed-diff-digest": D, "diff-digest": f"sha256:{DIFF}",
                              "diff-size": 99}], indent=" "))
    m = read_layers_json(p)
    assert m.whiteouts is None and m.parent_chain is None
    assert not m.serves_as_overlay_lower
    assert _meta(whiteouts="none").serves_as_overlay_lower
    assert not _meta(whiteouts="raw").serves_as_overlay_lower


@pytest.mark.parametrize("change", [
    {"id": "../x"}, {"diff_digest": "sha256:" + "00" * 32}, {"compressed_diff_digest": "sha256:x"},
    {"diff_size": -1}, {"diff_size": "12"}, {"diff_size": True}, {"whiteouts": "maybe"},
    {"parent_chain": "sha256:../x"},
])
def test_layer_metadata_validation(change):
    with pytest.raises(MetadataError):
        _meta(**change)


@pytest.mark.parametrize("content", [b"", b"{}", b"[]", b"[{}]", b"[1]", b"not json",
                                     b'[{"id": "x"}]', json.dumps([{}, {}]).encode()])
def test_malformed_layers_json(tmp_path, content):
    p = tmp_path / "layers.json"
    p.write_bytes(content)
    with pytest.raises(MetadataError):
        read_layers_json(p)


def test_origin_json(tmp_path):
    p = tmp_path / "m" / "origin.json"
    assert add_origin(p, CFG) == [CFG]
    other = "sha256:" + "ee" * 32
    assert add_origin(p, other) == [CFG, other]
    assert add_origin(p, CFG) == [CFG, other]  # no duplicates
    assert json.loads(p.read_text()) == {"origin": [CFG, other]}
    write_origin_json(p, [other])
    assert read_origin_json(p) == [other]
    with pytest.raises(InvalidDigest):
        add_origin(p, "sha256:../x")
    p.write_text('{"origin": ["sha256:../x"]}')
    with pytest.raises(MetadataError):
        read_origin_json(p)
    p.write_text('{"origin": "x"}')
    with pytest.raises(MetadataError):
        read_origin_json(p)


def test_find_layer(tmp_path):
    L = RepositoryLayout(tmp_path)
    assert find_layer(L, D) is None
    L.layerfs(D).mkdir(parents=True)
    found = find_layer(L, D)
    assert found is not None and found.metadata is None and found.metadata_error == "no layers.json"
    assert found.layerfs == L.layerfs(D)
    write_layers_json(L.layers_json(D), _meta())
    found = find_layer(L, D)
    assert found.metadata == _meta() and found.metadata_error is None
    # metadata for another blob is not trusted
    write_layers_json(L.layers_json(D), _meta(compressed_diff_digest=CFG))
    found = find_layer(L, D)
    assert found.metadata is None and CFG in found.metadata_error
    L.layers_json(D).write_text("garbage")
    assert find_layer(L, D).metadata is None
    # a file where the dir should be is "absent"
    other = "sha256:" + "12" * 32
    L.layer_dir(other).mkdir(parents=True)
    L.layerfs(other).write_text("not a dir")
    assert find_layer(L, other) is None


def test_diffid_links(tmp_path):
    L = RepositoryLayout(tmp_path)
    diff = f"sha256:{DIFF}"
    gz, zst = D, "sha256:" + "34" * 32
    assert L.diffid_link(diff) == tmp_path / ".diffids" / "ef" / DIFF
    assert find_layer_by_diff_id(L, diff) is None
    with pytest.raises(ValueError):
        ensure_diffid_link(L, diff, gz)  # not published
    for blob in (gz, zst):
        L.layerfs(blob).mkdir(parents=True)
        write_layers_json(L.layers_json(blob), _meta(compressed_diff_digest=blob))
    assert ensure_diffid_link(L, diff, gz)
    assert os.readlink(L.diffid_link(diff)) == f"../../.layers/ab/{HEX}"
    assert find_layer_by_diff_id(L, diff).digest == gz
    assert not ensure_diffid_link(L, diff, zst)  # the link already names a sound layer
    # gc removed the gzip dir: the zstd one takes over; once both are gone the link goes
    assert retarget_or_drop(L, diff, [zst], [gz]) is None  # names a layer that stays
    assert retarget_or_drop(L, diff, [gz], [zst]) == "retargeted"
    assert find_layer_by_diff_id(L, diff).digest == zst
    assert retarget_or_drop(L, diff, [zst], []) == "removed"
    assert not os.path.lexists(L.diffid_link(diff))
    # a link naming anything but a layer dir of that diffID is not followed
    L.diffid_link(diff).symlink_to("../../.chains/ab/" + HEX)
    assert find_layer_by_diff_id(L, diff) is None
    L.diffid_link(diff).unlink()
    write_layers_json(L.layers_json(gz), _meta(compressed_diff_digest=gz, diff_digest="sha256:" + "56" * 32,
                                               id="56" * 32))
    L.diffid_link(diff).symlink_to(L.diffid_link_target(gz))
    assert find_layer_by_diff_id(L, diff) is None


def test_find_chain(tmp_path):
    L = RepositoryLayout(tmp_path)
    assert find_chain(L, D) is None
    L.chain_dir(D).mkdir(parents=True)
    assert find_chain(L, D) == L.chain_dir(D)


def _link_to_flat(L, registry, repository, tag, config_digest):
    """A tag link to a flat dir, relative and atomic (as publisher/write/image.py makes them)."""
    link = L.link_path(registry, repository, tag)
    L.atomic_symlink(relative_link_target(link, L.flat_dir(config_digest)), link)
    return link


def test_relative_link_target_resolves(tmp_path):
    L = RepositoryLayout(tmp_path)
    L.flat_dir(CFG).mkdir(parents=True)
    (L.flat_dir(CFG) / "marker").write_text("x")
    link = _link_to_flat(L, "registry.hub.docker.com", "library/debian", "stable", CFG)
    target = os.readlink(link)
    assert not os.path.isabs(target)
    assert target == relative_link_target(link, L.flat_dir(CFG))
    assert target == "../../.flat/cd/" + CFG[7:]
    assert (link / "marker").read_text() == "x"
    # the same under a platform view (deeper) and after moving the whole repository
    P = L.for_platform("linux", "arm64")
    plink = _link_to_flat(P, "docker.io", "a/b/c", "1", CFG)
    assert (plink / "marker").read_text() == "x"
    moved = tmp_path.parent / (tmp_path.name + "-moved")
    os.rename(tmp_path, moved)
    try:
        assert (moved / "registry.hub.docker.com/library/debian:stable/marker").read_text() == "x"
    finally:
        os.rename(moved, tmp_path)
    # nothing left in .tmp by the atomic helpers
    assert list(L.tmp_dir.iterdir()) == []


def test_atomic_symlink_never_missing(tmp_path):
    link = tmp_path / "d" / "link"
    atomic_symlink("target-0", link)
    stop = threading.Event()
    missing: list[str] = []

    def reader():
        while not stop.is_set():
            try:
                os.readlink(link)
            except FileNotFoundError as e:
                missing.append(str(e))

    t = threading.Thread(target=reader)
    t.start()
    try:
        for i in range(1, 500):
            atomic_symlink(f"target-{i}", link)
    finally:
        stop.set()
        t.join()
    assert missing == []
    assert os.readlink(link) == "target-499"
    assert sorted(os.listdir(link.parent)) == ["link"]  # no temp links left
    (tmp_path / "realdir").mkdir()
    with pytest.raises(IsADirectoryError):
        atomic_symlink("x", tmp_path / "realdir")
    assert (tmp_path / "realdir").is_dir()


def test_atomic_write_file(tmp_path):
    p = tmp_path / "a" / "manifest.json"
    atomic_write_file(p, b"one")
    atomic_write_file(p, b"two", mode=0o600)
    assert p.read_bytes() == b"two"
    assert stat.S_IMODE(p.stat().st_mode) == 0o600
    assert os.listdir(p.parent) == ["manifest.json"]
    L = RepositoryLayout(tmp_path / "repo")
    q = L.manifest_json("docker.io", "library/x", "1")
    L.atomic_write_file(q, b"{}")
    assert q.read_bytes() == b"{}" and list(L.tmp_dir.iterdir()) == []


def test_atomic_write_file_failure_leaves_nothing(tmp_path):
    p = tmp_path / "f"
    p.write_bytes(b"old")

    with pytest.raises(TypeError):
        atomic_write_file(p, "not bytes")  # type: ignore[arg-type]
    assert p.read_bytes() == b"old"
    assert os.listdir(tmp_path) == ["f"]


def test_publish_dir_never_replaces(tmp_path):
    L = RepositoryLayout(tmp_path)
    w1 = L.make_work_dir("layer-")
    assert w1.parent == L.tmp_dir
    (w1 / "file").write_text("first")
    dst = L.layer_dir(D)
    assert publish_dir(w1, dst) is True
    assert (dst / "file").read_text() == "first" and not w1.exists()
    w2 = L.make_work_dir("layer-")
    (w2 / "file").write_text("second")
    assert publish_dir(w2, dst) is False
    assert (dst / "file").read_text() == "first" and w2.exists()
    # plain rename() would replace an EMPTY directory: publish_dir must not
    empty = L.chain_dir(D)
    empty.mkdir(parents=True)
    assert publish_dir(w2, empty) is False
    assert list(empty.iterdir()) == [] and (w2 / "file").exists()


def test_exchange_dirs(tmp_path):
    L = RepositoryLayout(tmp_path)
    cur = L.flat_dir(CFG)
    w = L.make_work_dir()
    (w / "v").write_text("1")
    exchange_dirs(w, cur)  # nothing there yet: plain publish
    assert (cur / "v").read_text() == "1"
    w = L.make_work_dir()
    (w / "v").write_text("2")
    exchange_dirs(w, cur)
    assert (cur / "v").read_text() == "2"
    assert (w / "v").read_text() == "1"  # the old content, for the caller to remove


def test_clean_tmp(tmp_path):
    L = RepositoryLayout(tmp_path)
    assert L.clean_tmp() == 0  # no .tmp yet
    w = L.make_work_dir()
    ro = w / "a" / "ro"
    ro.mkdir(parents=True)
    (ro / "f").write_text("x")
    os.chmod(ro, 0o555)
    os.symlink("/", w / "root-link")  # must not be followed
    (L.tmp_dir / "stray-file").write_text("x")
    L.layer_dir(D).mkdir(parents=True)
    assert L.clean_tmp() == 2
    assert list(L.tmp_dir.iterdir()) == []
    assert L.layer_dir(D).is_dir()


def test_sync_helpers(tmp_path):
    fsync_dir(tmp_path)
    syncfs(tmp_path)
    with pytest.raises(FileNotFoundError):
        syncfs(tmp_path / "missing")


def test_durable_false_writes_files_and_links_unsynced_on_every_platform_view(tmp_path, monkeypatch) -> None:
    """The publisher inside a CernVM-FS transaction: its publish makes the writes durable.
    Every other layout (the snapshotter's included) fsyncs the file and its parent."""
    calls: list[int] = []
    real = os.fsync
    monkeypatch.setattr(os, "fsync", lambda fd: (calls.append(fd), real(fd))[1])
    for layout in (RepositoryLayout(tmp_path, durable=False),
                   RepositoryLayout(tmp_path, durable=False).for_platform("linux", "arm64")):
        assert layout.durable is False
        layout.atomic_write_file(layout.image_root / "a/file", b"x")
        layout.atomic_symlink("file", layout.image_root / "a/link")
        assert (layout.image_root / "a/file").read_bytes() == b"x"
        assert os.readlink(layout.image_root / "a/link") == "file"
    assert calls == []
    RepositoryLayout(tmp_path).atomic_write_file(tmp_path / "b", b"y")
    assert len(calls) == 2  # the file, then its parent

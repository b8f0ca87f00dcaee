"""Layers used more than once. One that omits parent directories (docs/DESIGN.md#parent-chain) is completed
on its parent chain, recorded as `parent-chain`, and unpacked privately for a chain on
another parent; a blob repeated within an image is fetched once."""
from __future__ import annotations

import os
from pathlib import Path

from cvmfs_common.oci.digest import chain_ids
from cvmfs_common.repo.paths import RepositoryLayout
from cvmfs_common.repo.metadata import read_layers_json
from publisher.write import podman_format as fmt
from publisher.write.podman_store import PodmanStore
from tests.fixtures.layers import Entry, Layer

from tests.publisher.clirun import push_image, run_cli
from tests.fixtures.marks import requires_root


@requires_root
def test_shared_layer_on_two_different_parents(registry, tmp_path: Path) -> None:
    # The same top layer (it omits /app and /lib) on two bases that disagree about them.
    top = Layer.from_entries([Entry.file("/app/new", "n\n"), Entry.file("/lib/libx.so", "x\n")])
    base_a = Layer.from_entries([Entry.dir("/app", 0o750, 1000, 1000), Entry.dir("/usr"),
                                 Entry.dir("/usr/lib"), Entry.symlink("/lib", "usr/lib")])
    base_b = Layer.from_entries([Entry.dir("/app", 0o700, 2000, 2000), Entry.dir("/lib", 0o755)])
    a = push_image(registry.host, tmp_path, "parents/a", "v1", [base_a, top])
    b = push_image(registry.host, tmp_path, "parents/b", "v1", [base_b, top])
    assert a.layers[1] == b.layers[1]
    root, db = tmp_path / "repo", tmp_path / "state.db"
    for img in (a, b):
        res = run_cli("convert-image", img.ref, "--repository-root", root, "--state-db", db)
        assert res.rc == 0, res.stdout
    lay = RepositoryLayout(root)

    meta = read_layers_json(lay.layers_json(top.digest))
    assert meta.parent_chain == chain_ids(a.diff_ids)[0]  # completed on a's base
    fa, fb = lay.flat_dir(a.config_digest), lay.flat_dir(b.config_digest)
    st_a, st_b = os.stat(fa / "app"), os.stat(fb / "app")
    assert (st_a.st_mode & 0o7777, st_a.st_uid) == (0o750, 1000)
    assert (st_b.st_mode & 0o7777, st_b.st_uid) == (0o700, 2000)
    # on a, /lib stays the merged-usr symlink and the file lands in /usr/lib
    assert os.readlink(fa / "lib") == "usr/lib" and (fa / "usr/lib/libx.so").read_text() == "x\n"
    assert (fb / "lib").is_dir() and not (fb / "lib").is_symlink() and (fb / "lib/libx.so").is_file()
    assert (fa / "app/new").is_file() and (fb / "app/new").is_file()
    assert not any(lay.tmp_dir.iterdir())
    # podman: a stacks its layer dirs; b's top layer dir was completed on a's base, so b is
    # one podman layer, its top chain (stacked, /app would show a's 0750 1000).
    tops = {i["id"]: i["layer"] for i in PodmanStore(lay).images()}
    assert tops[a.config_digest[7:]] == fmt.layer_ids(a.diff_ids)[-1]
    chain_b = chain_ids(b.diff_ids)[-1]
    assert tops[b.config_digest[7:]] == fmt.chain_layer_id(chain_b)
    assert (PodmanStore(lay).layer_dir(fmt.chain_layer_id(chain_b)) / "diff").resolve() == lay.chain_dir(chain_b)
    checked = run_cli("check", "--repository-root", root, "--state-db", db)
    assert checked.rc == 0 and ": 0 problems" in checked.stdout, checked.stdout


def test_one_blob_twice_in_an_image(registry, tmp_path: Path) -> None:
    """Empty layers (the same blob) repeat in many images: fetched once, chained twice."""
    empty = Layer.from_entries([])
    base = Layer.from_entries([Entry.dir("/etc"), Entry.file("/etc/a", "a\n")])
    mid = Layer.from_entries([Entry.dir("/etc"), Entry.file("/etc/b", "b\n")])
    img = push_image(registry.host, tmp_path, "reuse/twice", "v1", [base, empty, mid, empty])
    root = tmp_path / "repo"
    registry.clear_log()
    res = run_cli("convert-image", img.ref, "--repository-root", root, "--state-db", tmp_path / "s.db")
    assert res.rc == 0, res.stdout
    assert registry.blob_get_count(empty.digest) == 1
    lay = RepositoryLayout(root)
    chains = chain_ids(img.diff_ids)
    assert len(set(chains)) == 4 and all(lay.chain_dir(c).is_dir() for c in chains)
    assert sorted(os.listdir(lay.chain_dir(chains[-1]) / "etc")) == ["a", "b"]

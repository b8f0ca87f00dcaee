"""A layer published in an earlier unit: its origin.json is never rewritten, and a layer the
state records is taken as there without opening its dir -- except for a tag marked for repair
(docs/DESIGN.md#origin, docs/DESIGN.md#format)."""
from __future__ import annotations

from pathlib import Path

from cvmfs_common.repo.metadata import read_origin_json
from cvmfs_common.repo.paths import RepositoryLayout
from cvmfs_common.fsutil.atomic import remove_tree
from publisher.core.state import GC_UNFINISHED, State
from tests.fixtures.images import BuiltImage
from tests.fixtures.layers import Entry, Layer
from tests.publisher.clirun import push_image, run_cli, write_wishlist

BASE = [Layer.from_entries([Entry.dir("/etc"), Entry.file("/etc/base", "base\n")]),
        Layer.from_entries([Entry.dir("/usr"), Entry.file("/usr/lib-base", "lib\n")])]


def _image(host: str, work: Path, name: str, *top: Layer) -> BuiltImage:
    return push_image(host, work / name.replace("/", "-"), name, "v1", [*BASE, *top])


def _top(text: str) -> Layer:
    return Layer.from_entries([Entry.dir("/app"), Entry.file(f"/app/{text}", text + "\n")])


def _convert(wishlist: Path, refs: list[str], root: Path, db: Path, *backend: str) -> None:
    write_wishlist(wishlist, refs)
    res = run_cli("convert", wishlist, *backend, "--repository-root", root, "--state-db", db)
    assert res.rc == 0, res.stdout


def test_origin_json_lists_the_images_of_the_unit_that_made_the_layer(registry, cvmfs_standin,
                                                                       tmp_path: Path) -> None:
    """(cvmfs backend, batched: one round's images share its units)"""
    repo = cvmfs_standin.mkfs("unpacked.example.org")
    db, wl = tmp_path / "state.db", tmp_path / "w.yaml"
    shared = _top("shared")
    a = _image(registry.host, tmp_path, "origin/a", _top("a"))
    b = _image(registry.host, tmp_path, "origin/b", _top("b"))
    c = _image(registry.host, tmp_path, "origin/c", shared, _top("c"))
    d = _image(registry.host, tmp_path, "origin/d", shared, _top("d"))
    lay = RepositoryLayout(repo)
    _convert(wl, [a.ref], repo, db, "--backend", "cvmfs")
    _convert(wl, [a.ref, b.ref, c.ref, d.ref], repo, db, "--backend", "cvmfs")

    for digest in a.layers[:2]:  # the base: made for a, never rewritten for b, c, d
        assert read_origin_json(lay.origin_json(digest)) == [a.config_digest]
    assert read_origin_json(lay.origin_json(b.layers[2])) == [b.config_digest]
    # new in one unit, used by two of its images: both listed
    assert sorted(read_origin_json(lay.origin_json(shared.digest))) == sorted([c.config_digest, d.config_digest])
    checked = run_cli("check", "--repository-root", repo, "--state-db", db, "--backend", "cvmfs")
    assert checked.rc == 0, checked.stdout


def test_a_known_layer_is_not_opened_but_a_repair_looks(registry, tmp_path: Path) -> None:
    root, db, wl = tmp_path / "repo", tmp_path / "state.db", tmp_path / "w.yaml"
    a = _image(registry.host, tmp_path, "known/a", _top("a"))
    b = _image(registry.host, tmp_path, "known/b", _top("b"))
    lay = RepositoryLayout(root)
    _convert(wl, [a.ref], root, db)
    # damage the base layer's metadata as check would find it: a look would re-ingest it
    base = a.layers[0]
    garbage = b"not json\n"
    lay.layers_json(base).write_bytes(garbage)
    lay.diffid_link(a.diff_ids[0]).unlink()
    registry.clear_log()

    _convert(wl, [a.ref, b.ref], root, db)  # b, a new tag on a's base
    assert registry.blob_get_count(base) == 0
    assert lay.layers_json(base).read_bytes() == garbage  # neither read as unusable nor replaced
    assert not lay.diffid_link(a.diff_ids[0]).exists()  # not re-checked either
    assert (lay.flat_dir(b.config_digest) / "etc/base").read_text() == "base\n"

    with State.open(db, root) as st:
        (tag_id,), = st.conn.execute("SELECT id FROM tags WHERE repository='known/a'").fetchall()
        assert st.mark_repairs({tag_id: "layer dir damaged"}) == 1
    _convert(wl, [a.ref, b.ref], root, db)
    assert registry.blob_get_count(base) == 1  # a repair looks at the dirs and re-ingests
    assert lay.layers_json(base).read_bytes() != garbage
    assert lay.diffid_link(a.diff_ids[0]).exists()
    checked = run_cli("check", "--repository-root", root, "--state-db", db)
    assert checked.rc == 0, checked.stdout


def test_while_a_gc_is_unfinished_every_layer_dir_is_looked_at(registry, tmp_path: Path) -> None:
    """gc removes dirs before it forgets their rows: a gc killed in between leaves rows of
    layers that are gone, and a new tag on them must bring them back."""
    root, db, wl = tmp_path / "repo", tmp_path / "state.db", tmp_path / "w.yaml"
    a = _image(registry.host, tmp_path, "gcwindow/a", _top("a"))
    b = _image(registry.host, tmp_path, "gcwindow/b", _top("b"))
    lay = RepositoryLayout(root)
    _convert(wl, [a.ref], root, db)
    with State.open(db, root) as st:
        st.set_flag(GC_UNFINISHED, "1")
    remove_tree(lay.layer_dir(a.layers[0]))  # what that gc removed
    _convert(wl, [b.ref], root, db)
    assert lay.layers_json(a.layers[0]).is_file()
    assert (lay.flat_dir(b.config_digest) / "etc/base").read_text() == "base\n"

"""publisher.core.state: the sqlite source of truth, and the one-publisher-per-repository lock."""
from __future__ import annotations

from pathlib import Path

import pytest

from cvmfs_common.oci.digest import sha256_of
from publisher.core.runlock import lock_path_for, exclusive
from publisher.core.state import GC_UNFINISHED, ImageRecord, LayerRecord, State, StateError, TagKey

from tests.fixtures.images import StandardImages, host_arch

from tests.publisher.clirun import run_cli, run_proc, write_wishlist
from tests.fixtures.marks import requires_root

OTHER_ARCH = "arm64" if host_arch() != "arm64" else "amd64"


def d(s: str) -> str:
    return sha256_of(s.encode())


def image(name: str) -> ImageRecord:
    layers = [LayerRecord(d(f"{name}-l{i}"), d(f"{name}-diff{i}"), 10, 20, "none", None, d(f"{name}-c{i}"))
              for i in range(2)]
    return ImageRecord(d(f"{name}-m"), d(f"{name}-cfg"), "application/vnd.oci.image.manifest.v1+json",
                       "linux/amd64", layers)


def test_publish_touch_fail_and_move(tmp_path: Path) -> None:
    key = TagKey("reg.example.org", "lib/x", "v1", "linux/amd64")
    with State.open(tmp_path / "s.db", tmp_path / "repo") as st:
        entry = st.upsert_entry("reg.example.org/lib/x:v1", "linux/amd64", "w.yaml:3")
        assert st.upsert_entry("reg.example.org/lib/x:v1", "linux/amd64", "w.yaml:4") == entry
        assert st.tag(key) is None
        st.record_failure(key, "", entry, "boom")
        rec = st.tag(key)
        assert rec is not None and not rec.published and rec.last_error == "boom"

        one = image("one")
        st.record_published(key, "", entry, one.manifest_digest, one)
        rec = st.tag(key)
        assert rec.published and rec.config_digest == one.config_digest and rec.last_error is None
        assert [l.chain_id for l in st.image_layers(one.manifest_digest)] == [l.chain_id for l in one.layers]

        two = image("two")
        st.record_published(key, "", entry, d("an-index"), two)  # the tag moved
        rec = st.tag(key)
        assert (rec.manifest_digest, rec.top_digest) == (two.manifest_digest, d("an-index"))
        st.touch_tag(key, "", entry)
        st.record_failure(key, "", entry, "registry down")
        rec = st.tag(key)
        assert rec.published and rec.manifest_digest == two.manifest_digest  # the old image stays
        counts = st.counts()
        assert (counts["tags"], counts["images"], counts["layers"]) == (1, 2, 4)
        # images no tag points at any more: what gc will look for
        orphans = st.conn.execute("SELECT manifest_digest FROM images WHERE manifest_digest NOT IN "
                                  "(SELECT manifest_digest FROM tags WHERE manifest_digest IS NOT NULL)").fetchall()
        assert orphans == [(one.manifest_digest,)]


def test_trusted_layers_leave_out_repairs_and_an_unfinished_gc(tmp_path: Path) -> None:
    """convert takes these layers as published without opening their dirs."""
    with State.open(tmp_path / "s.db", tmp_path / "repo") as st:
        for name in ("one", "two"):
            st.record_published(TagKey("reg.example.org", "lib/x", name, "linux/amd64"), "", None, d(name),
                                image(name))
        all_four = {l.digest for n in ("one", "two") for l in image(n).layers}
        assert {r[0] for r in st.trusted_layers()} == all_four
        assert st.trusted_layers()[0][1:] == (d("one-diff0"), 20, "none", None)
        (tag_id,), = st.conn.execute("SELECT id FROM tags WHERE tag='one'").fetchall()
        st.mark_repairs({tag_id: "a layer dir is gone"})  # its dirs may be gone: looked at
        assert {r[0] for r in st.trusted_layers()} == {l.digest for l in image("two").layers}
        st.set_flag(GC_UNFINISHED, "1")  # it may have removed dirs whose rows it still has
        assert st.trusted_layers() == []
        st.clear_flag(GC_UNFINISHED)
        assert len(st.trusted_layers()) == 2


def test_state_belongs_to_one_repository(tmp_path: Path) -> None:
    State.open(tmp_path / "s.db", tmp_path / "repo-a").close()
    with pytest.raises(StateError, match="belongs to repository"):
        State.open(tmp_path / "s.db", tmp_path / "repo-b")
    with State.open(tmp_path / "s.db", tmp_path / "repo-a") as st:
        assert st.conn.execute("PRAGMA journal_mode").fetchone()[0] == "wal"


def test_second_publisher_on_the_same_state_is_refused(tmp_path: Path, capsys) -> None:
    db = tmp_path / "s.db"
    wl = write_wishlist(tmp_path / "w.yaml", ["127.0.0.1:1/x/y:z"])
    with exclusive(lock_path_for(db)):
        res = run_cli("convert", wl, "--repository-root", tmp_path / "repo", "--state-db", db)
    assert res.rc == 2
    assert "another cvmfs-publisher is working on this repository" in capsys.readouterr().err


def _published(db: Path, root: Path) -> list[tuple]:
    with State.open(db, root) as st:
        return sorted((str(t.key), t.platform_dir, t.top_digest, t.manifest_digest, t.config_digest,
                       tuple((l.digest, l.diff_id, l.diff_size, l.whiteouts, l.parent_chain, l.chain_id)
                             for l in st.image_layers(t.manifest_digest)))
                      for t in st.published_tags())


@requires_root
def test_a_damaged_or_truncated_state_is_refused_and_rebuilt_from_the_repository(
        standard_images: StandardImages, tmp_path: Path) -> None:
    host = standard_images.multilayer.host
    root, db = tmp_path / "repo", tmp_path / "state.db"
    args = ("--repository-root", root, "--state-db", db)
    wishlist = write_wishlist(tmp_path / "w.yaml", [
        f"{host}/test/multilayer:v1", f"{host}/test/tagged:*", f"{host}/test/multiarch:v1"],
        platforms=[f"linux/{host_arch()}", f"linux/{OTHER_ARCH}"])
    assert run_proc("convert", wishlist, *args).rc == 0
    before = _published(db, root)
    assert len(before) >= 5 and any(pdir for _, pdir, *_ in before)

    # Damaged: a clear error, exit 3, no traceback, for every command.
    good = db.read_bytes()
    db.write_bytes(b"garbage!" * 16 + good[128:])
    for cmd in (("convert", wishlist), ("check",), ("gc",)):
        res = run_proc(*cmd, *args)
        assert res.rc == 3, (cmd, res.stdout, res.stderr)
        assert "is damaged" in res.stderr and "state rebuild" in res.stderr and "Traceback" not in res.stderr
    # Truncated to nothing: sqlite would start afresh and forget every publish.
    db.write_bytes(b"")
    res = run_proc("convert", wishlist, *args)
    assert res.rc == 3 and "is empty (truncated?)" in res.stderr and "Traceback" not in res.stderr, res.stderr
    # Truncated half-way.
    db.write_bytes(good[: len(good) // 2])
    res = run_proc("check", *args)
    assert res.rc == 3 and "Traceback" not in res.stderr, res.stderr

    rebuilt = run_proc("state", "rebuild", *args)
    assert rebuilt.rc == 0, rebuilt.stdout + rebuilt.stderr
    assert f"{len(before)} tags" in rebuilt.stdout and ".broken-" in rebuilt.stdout, rebuilt.stdout
    assert _published(db, root) == before
    res = run_proc("check", *args)
    assert res.rc == 0 and ": 0 problems" in res.stdout, res.stdout
    again = run_proc("convert", wishlist, *args)
    assert again.rc == 0 and "0 layers fetched" in again.stdout and "0 failed" in again.stdout, again.stdout


def test_an_empty_state_for_an_empty_repository_is_a_fresh_start(tmp_path: Path) -> None:
    (tmp_path / "s.db").touch()  # e.g. killed right after sqlite created the file
    with State.open(tmp_path / "s.db", tmp_path / "repo") as st:
        assert st.published_tags() == []

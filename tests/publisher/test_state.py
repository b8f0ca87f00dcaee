"""publisher.state: the sqlite source of truth, and the one-publisher-per-repository lock."""
from __future__ import annotations

from pathlib import Path

import pytest

from cvmfs_common.digest import sha256_of
from publisher.runlock import lock_path_for, exclusive
from publisher.state import ImageRecord, LayerRecord, State, StateError, TagKey

from .clirun import run_cli, write_wishlist


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

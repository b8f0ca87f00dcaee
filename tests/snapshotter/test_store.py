"""The sqlite metadata store on its own (snapshotter/store.py): rows, transactions, the DUCC id
codec (including rows an older version wrote), labels, parents and usage."""

import hashlib
import os
import sqlite3
from pathlib import Path

import pytest

from cvmfs_common.oci.digest import ducc2_chain_ids, ducc_chain_ids
from snapshotter.core import Snapshotter
from snapshotter.errors import AlreadyExists, FailedPrecondition, InvalidArgument, NotFound
from snapshotter.filters import parse_all
from snapshotter.labels import CVMFS_LAYER_DIGEST_LABEL, SNAPSHOT_REF_LABEL
from snapshotter.lineage import DuccIds, Lineage
from snapshotter.model import Kind, Lower, Usage
from snapshotter.store import Store


def d(text: str) -> str:
    return "sha256:" + hashlib.sha256(text.encode()).hexdigest()


def nothing(*_args) -> None:
    pass


@pytest.fixture
def store(tmp_path: Path):
    s = Store(str(tmp_path / "metadata.db"))
    yield s
    s.close()


def raw(path: Path, sql: str, *args) -> list[tuple]:
    with sqlite3.connect(path) as db:
        return db.execute(sql, args).fetchall()


def committed(store: Store, name: str, parent: str = "", labels=None, usage=Usage(0, 0), lineage=None) -> int:
    store.create(f"tmp-{name}", parent, Kind.ACTIVE, {}, nothing, lineage)
    return store.commit(name, f"tmp-{name}", labels or {}, usage, nothing)


# -- rows ---------------------------------------------------------------------------------

def test_rows_get_increasing_ids_that_are_never_reused(store, tmp_path):
    a = store.create("a", "", Kind.ACTIVE, {}, nothing)
    b = store.create("b", "", Kind.VIEW, {}, nothing)
    assert (a.snapshot.id, b.snapshot.id) == (1, 2)
    store.remove("b", nothing)
    c = store.create("c", "", Kind.ACTIVE, {}, nothing)
    assert c.snapshot.id == 3  # ids name directories: a removed one's id never comes back
    assert raw(tmp_path / "metadata.db", "SELECT id, key, kind FROM snapshots ORDER BY id") == [
        (1, "a", 2), (3, "c", 2)]
    assert raw(tmp_path / "metadata.db", "PRAGMA user_version") == [(1,)]


def test_stat_and_lookup_of_missing_or_empty_keys(store):
    with pytest.raises(NotFound, match="'nope' does not exist"):
        store.stat("nope")
    with pytest.raises(NotFound):
        store.lookup("nope")
    with pytest.raises(InvalidArgument, match="key must not be empty"):
        store.create("", "", Kind.ACTIVE, {}, nothing)
    store.create("k", "", Kind.ACTIVE, {}, nothing)
    with pytest.raises(AlreadyExists, match="'k' already exists"):
        store.create("k", "", Kind.VIEW, {}, nothing)
    info = store.stat("k")
    assert (info.name, info.parent, info.kind, info.labels) == ("k", "", Kind.ACTIVE, {})
    assert info.created_ns == info.updated_ns > 0


# -- transactions ---------------------------------------------------------------------------

def test_failing_make_dirs_leaves_no_row(store):
    def boom(snapshot_id, lowers):
        raise OSError("disk full")

    with pytest.raises(OSError, match="disk full"):
        store.create("k", "", Kind.ACTIVE, {"a": "1"}, boom)
    with pytest.raises(NotFound):
        store.stat("k")
    assert store.create("k", "", Kind.ACTIVE, {}, nothing).info.labels == {}  # the key is free again


def test_failing_link_keeps_the_snapshot_active(store):
    store.create("k", "", Kind.ACTIVE, {"a": "1"}, nothing)

    def boom(snapshot_id):
        raise OSError("no link")

    with pytest.raises(OSError, match="no link"):
        store.commit("c", "k", {}, Usage(10, 1), boom)
    assert store.stat("k").kind == Kind.ACTIVE and store.stat("k").labels == {"a": "1"}
    with pytest.raises(NotFound):
        store.stat("c")


def test_failing_detach_keeps_the_row_and_its_labels(store):
    store.create("k", "", Kind.ACTIVE, {"a": "1"}, nothing)

    def boom(snapshot_id):
        raise OSError("busy")

    with pytest.raises(OSError, match="busy"):
        store.remove("k", boom)
    assert store.stat("k").labels == {"a": "1"}


def test_all_ids_are_read_under_the_write_lock(store, tmp_path):
    store.create("a", "", Kind.ACTIVE, {}, nothing)
    store.create("b", "", Kind.ACTIVE, {}, nothing)
    other = sqlite3.connect(tmp_path / "metadata.db", timeout=0)

    def try_write(ids):
        with pytest.raises(sqlite3.OperationalError, match="locked"):
            other.execute("INSERT INTO snapshots (key, kind, created, updated) VALUES ('x', 2, 0, 0)")
        return ids

    assert store.with_all_ids_locked(try_write) == {1, 2}
    other.close()


# -- the DUCC id codec ---------------------------------------------------------------------------

def test_lineage_is_stored_as_the_space_joined_pair(store, tmp_path):
    ducc = DuccIds(d("one"), d("two"))
    store.create("k", "", Kind.ACTIVE, {}, nothing, Lineage(d("chain"), ducc))
    assert raw(tmp_path / "metadata.db", "SELECT chain_id, ducc_chain FROM snapshots") == [
        (d("chain"), f"{d('one')} {d('two')}")]
    facts = store.parent_facts("k")
    assert facts.lineage == Lineage(d("chain"), ducc) and facts.kind == Kind.ACTIVE and facts.source is None
    store.create("none", "", Kind.ACTIVE, {}, nothing)
    assert raw(tmp_path / "metadata.db", "SELECT ducc_chain FROM snapshots WHERE key = 'none'") == [(None,)]
    assert store.parent_facts("none").lineage == Lineage(None, None)
    assert store.parent_facts("missing") is None


# The schema as version 1 wrote it (a copy: the store's own may grow, old files must still read).
_V1_SCHEMA = """
CREATE TABLE snapshots (
    id INTEGER PRIMARY KEY AUTOINCREMENT, key TEXT NOT NULL UNIQUE, parent_id INTEGER REFERENCES snapshots(id),
    kind INTEGER NOT NULL, created INTEGER NOT NULL, updated INTEGER NOT NULL,
    size INTEGER NOT NULL DEFAULT 0, inodes INTEGER NOT NULL DEFAULT 0, source TEXT,
    whole_stack INTEGER NOT NULL DEFAULT 0, chain_id TEXT, ducc_chain TEXT);
CREATE INDEX snapshots_parent ON snapshots(parent_id);
CREATE TABLE labels (snapshot_id INTEGER NOT NULL REFERENCES snapshots(id) ON DELETE CASCADE,
    name TEXT NOT NULL, value TEXT NOT NULL, PRIMARY KEY (snapshot_id, name)) WITHOUT ROWID;
CREATE INDEX labels_name_value ON labels(name, value);
PRAGMA user_version = 1;
"""


def test_a_root_written_by_an_older_version_still_reads(tmp_path):
    """A committed parent row as the string-typed code wrote it: its DUCC ids are read back
    typed and a child layer prepared on it continues DUCC's chains."""
    blobs = [d("blob0"), d("blob1")]
    root = tmp_path / "root"
    (root / "snapshots" / "1" / "fs").mkdir(parents=True)
    (root / "l").mkdir()
    os.symlink("../snapshots/1/fs", root / "l" / "1")
    old = f"{ducc_chain_ids(blobs)[0]} {ducc2_chain_ids(blobs)[0]}"
    with sqlite3.connect(root / "metadata.db") as db:
        db.executescript(_V1_SCHEMA)
        db.execute("INSERT INTO snapshots (key, kind, created, updated, size, inodes, chain_id, ducc_chain)"
                   " VALUES ('base', 3, 1, 2, 4096, 1, ?, ?)", (d("chain0"), old))
        db.execute("INSERT INTO labels VALUES (1, 'l', 'v')")
    db.close()

    store = Store(str(root / "metadata.db"))
    facts = store.parent_facts("base")
    assert facts.lineage == Lineage(d("chain0"), DuccIds(ducc_chain_ids(blobs)[0], ducc2_chain_ids(blobs)[0]))
    assert store.lookup("base") == (1, Kind.COMMITTED, Usage(4096, 1))
    assert store.stat("base").labels == {"l": "v"}
    store.close()

    sn = Snapshotter(root)
    try:
        sn.prepare("child", "base", {SNAPSHOT_REF_LABEL: d("chain1"), CVMFS_LAYER_DIGEST_LABEL: blobs[1]})
    finally:
        sn.close()
    assert raw(root / "metadata.db", "SELECT chain_id, ducc_chain FROM snapshots WHERE key = 'child'") == [
        (d("chain1"), f"{ducc_chain_ids(blobs)[1]} {ducc2_chain_ids(blobs)[1]}")]


# -- labels ------------------------------------------------------------------------------------

def test_labels_are_replaced_on_commit_and_updated_by_field_path(store, tmp_path):
    store.create("k", "", Kind.ACTIVE, {"a": "1", "b": "2"}, nothing)
    store.commit("c", "k", {"x": "9"}, Usage(0, 0), nothing)
    assert store.stat("c").labels == {"x": "9"}  # not inherited from the active snapshot
    assert store.update("c", {"y": "1", "x": "ignored"}, ["labels.y"]).labels == {"x": "9", "y": "1"}
    assert store.update("c", {}, ["labels.x"]).labels == {"y": "1"}  # absent in labels: deleted
    assert store.update("c", {"z": ""}, []).labels == {"z": ""}  # no paths: all replaced
    with pytest.raises(InvalidArgument, match="cannot update 'parent'"):
        store.update("c", {}, ["parent"])
    store.remove("c", nothing)
    assert raw(tmp_path / "metadata.db", "SELECT count(*) FROM labels") == [(0,)]


def test_walk_by_label_and_parent(store):
    committed(store, "base", labels={"role": "base"})
    store.create("a", "base", Kind.ACTIVE, {"role": "x"}, nothing)
    store.create("v", "", Kind.VIEW, {"role": "x"}, nothing)
    names = lambda flt: sorted(i.name for i in store.walk(parse_all(flt)))  # noqa: E731
    assert names(["labels.role==x"]) == ["a", "v"]
    assert names(['parent=="base"']) == ["a"]
    assert names(["kind==committed"]) == ["base"]
    assert names(["labels.role==x,kind==view", "name==base"]) == ["base", "v"]
    assert names([]) == ["a", "base", "v"]


# -- parents -----------------------------------------------------------------------------------

def test_parent_rules(store):
    with pytest.raises(NotFound, match="parent snapshot 'p' does not exist"):
        store.create("k", "p", Kind.ACTIVE, {}, nothing)
    store.create("p", "", Kind.ACTIVE, {}, nothing)
    with pytest.raises(InvalidArgument, match="not a committed snapshot"):
        store.create("k", "p", Kind.ACTIVE, {}, nothing)
    store.commit("base", "p", {}, Usage(0, 0), nothing)
    store.create("k", "base", Kind.ACTIVE, {}, nothing)
    with pytest.raises(FailedPrecondition, match="has children"):
        store.remove("base", nothing)
    assert store.stat("k").parent == "base"
    store.remove("k", nothing)
    assert store.remove("base", nothing) == (1, Kind.COMMITTED)


def test_lowers_are_nearest_first_and_stop_below_a_whole_stack(store):
    committed(store, "a")  # 1
    committed(store, "b", "a")  # 2
    store.create_committed_remote("chain", "b", {}, "/repo/.chains/x", True, nothing)  # 3: the full root fs
    store.create_committed_remote("layer", "chain", {}, "/repo/.layers/y", False, nothing)  # 4
    seen = {}
    store.create("k", "layer", Kind.ACTIVE, {}, lambda i, lowers: seen.update(lowers=lowers))
    expected = (Lower(4, "/repo/.layers/y"), Lower(3, "/repo/.chains/x"))  # a and b are hidden by the chain
    assert seen["lowers"] == expected
    snap = store.snapshot("k")
    assert (snap.id, snap.kind, snap.lowers) == (5, Kind.ACTIVE, expected)
    assert store.create("v", "b", Kind.VIEW, {}, nothing).snapshot.lowers == (Lower(2, None), Lower(1, None))
    with pytest.raises(FailedPrecondition, match="is committed"):
        store.snapshot("b")


# -- usage -------------------------------------------------------------------------------------

def test_usage_is_fixed_at_commit(store):
    store.create("k", "", Kind.ACTIVE, {}, nothing)
    assert store.lookup("k") == (1, Kind.ACTIVE, Usage(0, 0))
    store.commit("c", "k", {}, Usage(123 * 4096, 7), nothing)
    assert store.lookup("c") == (1, Kind.COMMITTED, Usage(123 * 4096, 7))
    with pytest.raises(FailedPrecondition, match="not active"):
        store.commit("c2", "c", {}, Usage(0, 0), nothing)

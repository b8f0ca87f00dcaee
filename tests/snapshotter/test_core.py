"""The domain Snapshotter on a real sqlite file and real directories (no grpc)."""

import os
from pathlib import Path

import pytest

from snapshotter.core import Snapshotter
from snapshotter.errors import AlreadyExists, FailedPrecondition, InvalidArgument, NotFound
from snapshotter.model import Kind
from tests.snapshotter.deep_tree import make_chain, remove_everything


@pytest.fixture
def sn(tmp_path: Path):
    s = Snapshotter(tmp_path / "root")
    yield s
    s.close()


def committed(sn: Snapshotter, name: str, parent: str = "", content: dict[str, str] | None = None) -> None:
    mounts = sn.prepare(f"tmp-{name}", parent, {})
    upper = mounts[0].source if mounts[0].type == "bind" else _opt(mounts[0].options, "upperdir")
    for rel, data in (content or {}).items():
        Path(upper, rel).write_text(data)
    sn.commit(name, f"tmp-{name}", {"l": name})


def _opt(options, name):
    return next(o.split("=", 1)[1] for o in options if o.startswith(name + "="))


def test_active_without_parent_is_rw_bind(sn):
    (m,) = sn.prepare("k", "", {})
    assert (m.type, m.options) == ("bind", ("rw", "rbind"))
    assert os.path.isdir(m.source)


def test_view_of_one_layer_is_ro_bind_of_parent(sn):
    committed(sn, "base", content={"f": "x"})
    (m,) = sn.view("v", "base", {})
    assert (m.type, m.options) == ("bind", ("ro", "rbind"))
    assert Path(m.source, "f").read_text() == "x"


def test_active_with_parents_is_overlay_nearest_lower_first(sn):
    committed(sn, "a")
    committed(sn, "b", "a")
    (m,) = sn.prepare("k", "b", {})
    assert m.type == "overlay"
    lowers = _opt(m.options, "lowerdir").split(":")
    assert [os.path.basename(p) for p in lowers] == ["2", "1"]
    assert all(p.startswith(str(sn.root / "l") + "/") for p in lowers)
    assert os.path.realpath(lowers[0]) == os.path.realpath(sn.dirs.fs_dir(2))
    assert _opt(m.options, "upperdir") and _opt(m.options, "workdir")


def test_view_with_several_lowers_is_overlay_without_upper(sn):
    committed(sn, "a")
    committed(sn, "b", "a")
    (m,) = sn.view("v", "b", {})
    assert m.type == "overlay"
    assert not any(o.startswith(("upperdir=", "workdir=")) for o in m.options)


def test_errors_match_containerd(sn):
    sn.prepare("k", "", {})
    with pytest.raises(AlreadyExists):
        sn.prepare("k", "", {})
    with pytest.raises(NotFound):
        sn.prepare("k2", "missing", {})
    with pytest.raises(InvalidArgument):
        sn.prepare("k2", "k", {})  # parent not committed
    with pytest.raises(NotFound):
        sn.commit("c", "missing", {})
    sn.view("v", "", {})
    with pytest.raises(FailedPrecondition):
        sn.commit("c", "v", {})  # views cannot be committed
    committed(sn, "base")
    with pytest.raises(AlreadyExists):
        sn.commit("base", "k", {})
    with pytest.raises(FailedPrecondition):
        sn.mounts("base")
    sn.prepare("child", "base", {})
    with pytest.raises(FailedPrecondition):
        sn.remove("base")
    with pytest.raises(NotFound):
        sn.remove("missing")
    with pytest.raises(NotFound):
        sn.stat("missing")


def test_commit_replaces_labels_and_keeps_parent(sn):
    committed(sn, "a")
    sn.prepare("k", "a", {"old": "1"})
    sn.commit("b", "k", {"new": "2"})
    info = sn.stat("b")
    assert (info.kind, info.parent, info.labels) == (Kind.COMMITTED, "a", {"new": "2"})
    with pytest.raises(NotFound):
        sn.stat("k")


def test_update_field_paths(sn):
    sn.prepare("k", "", {"a": "1", "b": "2"})
    before = sn.stat("k")
    info = sn.update(type(before)("k", "", Kind.ACTIVE, 0, 0, {"a": "9", "c": "3"}), ["labels.a", "labels.b"])
    assert info.labels == {"a": "9"}  # b absent from the request: deleted
    assert info.updated_ns >= before.updated_ns and info.created_ns == before.created_ns
    info = sn.update(type(before)("k", "", Kind.ACTIVE, 0, 0, {"z": "1"}), [])
    assert info.labels == {"z": "1"}
    with pytest.raises(InvalidArgument):
        sn.update(type(before)("k", "", Kind.ACTIVE, 0, 0, {}), ["parent"])


def test_keys_are_opaque_never_paths(sn, tmp_path):
    for key in ["../../etc", "/abs/key", "ünïcødé/✓", "k" * 4096, "a\nb"]:
        sn.prepare(key, "", {})
        assert sn.stat(key).name == key
    assert not (tmp_path / "etc").exists()
    assert sorted(os.listdir(sn.root / "snapshots")) == ["1", "2", "3", "4", "5"]


def test_walk_filters_and_uses_index(sn):
    committed(sn, "a")
    committed(sn, "b", "a")
    sn.prepare("k", "b", {"containerd.io/snapshot.ref": "sha256:x"})
    assert [i.name for i in sn.walk(['labels."containerd.io/snapshot.ref"==sha256:x,parent=="b"'])] == ["k"]
    assert sorted(i.name for i in sn.walk(["kind==committed"])) == ["a", "b"]
    assert sorted(i.name for i in sn.walk(["name==a", "name==k"])) == ["a", "k"]
    with pytest.raises(InvalidArgument):
        sn.walk(["name=="])


def test_walk_by_label_does_not_scan(sn, monkeypatch):
    for i in range(50):
        sn.prepare(f"k{i}", "", {"n": str(i)})
    queries = []
    conn = sn.store._conn()
    conn.set_trace_callback(queries.append)
    assert [i.name for i in sn.walk(["labels.n==7"])] == ["k7"]
    conn.set_trace_callback(None)
    plans = [conn.execute("EXPLAIN QUERY PLAN " + q).fetchall() for q in queries if q.startswith("SELECT")]
    assert plans and not any("SCAN" in str(p) and "USING" not in str(p) for p in plans), plans


def test_usage_active_and_committed(sn):
    (m,) = sn.prepare("k", "", {})
    Path(m.source, "f").write_bytes(b"x" * 100_000)
    os.link(Path(m.source, "f"), Path(m.source, "hard"))
    active = sn.usage("k")
    assert active.inodes == 2 and active.size >= 100_000
    sn.commit("c", "k", {})
    assert sn.usage("c") == active


def test_remove_deletes_dirs(sn):
    (m,) = sn.prepare("k", "", {})
    sn.remove("k")
    assert not os.path.exists(m.source)
    assert os.listdir(sn.root / "l") == []


def test_cleanup_removes_orphans_only(sn):
    committed(sn, "a")
    (sn.root / "snapshots" / "77").mkdir()
    (sn.root / "snapshots" / "new-78").mkdir()
    (sn.root / "snapshots" / "rm-79-0123456789ab" / "fs").mkdir(parents=True)  # a Remove's, killed mid-delete
    os.symlink("../snapshots/77/fs", sn.root / "l" / "77")
    sn.cleanup()
    assert os.listdir(sn.root / "snapshots") == ["1"]
    assert os.listdir(sn.root / "l") == ["1"]


def test_state_survives_reopen(tmp_path):
    s = Snapshotter(tmp_path / "root")
    committed(s, "a")
    s.prepare("k", "a", {"x": "y"})
    s.close()
    s2 = Snapshotter(tmp_path / "root")
    assert s2.stat("k").labels == {"x": "y"}
    assert s2.mounts("k")[0].type == "overlay"
    s2.close()


def test_orphan_dir_with_next_id_is_replaced(sn):
    # A crash after the dirs were made but before the row was committed leaves
    # snapshots/<next id>; the next Prepare gets that id again and must not reuse content.
    stale = sn.root / "snapshots" / "1" / "fs"
    stale.mkdir(parents=True)
    (stale / "junk").write_text("x")
    (m,) = sn.prepare("k", "", {})
    assert os.listdir(m.source) == []


def test_cleanup_leaves_a_live_removal_alone(sn, monkeypatch):
    """A Remove deleting its (renamed) dir outside the lock while a Cleanup runs: the
    Cleanup must neither delete it under the Remove's feet nor fail."""
    import threading

    import snapshotter.fs as fs_module

    sn.prepare("k", "", {})
    started, release = threading.Event(), threading.Event()
    real_remove_tree = fs_module.remove_tree
    deleting: list[str] = []

    def slow_remove_tree(path):
        deleting.append(os.path.basename(path))
        started.set()
        assert release.wait(30)
        real_remove_tree(path)

    monkeypatch.setattr(fs_module, "remove_tree", slow_remove_tree)
    remover = threading.Thread(target=sn.remove, args=("k",))
    remover.start()
    assert started.wait(30)
    monkeypatch.setattr(fs_module, "remove_tree", real_remove_tree)
    assert deleting[0].startswith("rm-1-")
    sn.cleanup()  # sees rm-1-… owned by the Remove: skips it
    assert os.listdir(sn.root / "snapshots") == deleting
    release.set()
    remover.join(30)
    assert os.listdir(sn.root / "snapshots") == []


def test_failed_deletion_is_retried_by_cleanup(sn, monkeypatch):
    import snapshotter.fs as fs_module
    from snapshotter.core import CleanupIncomplete

    sn.prepare("k", "", {})
    real_remove_tree = fs_module.remove_tree

    def failing(path):
        raise OSError(5, "Input/output error", str(path))

    monkeypatch.setattr(fs_module, "remove_tree", failing)
    sn.remove("k")  # the snapshot is gone; its dir is left as an rm-* entry
    with pytest.raises(NotFound):
        sn.stat("k")
    (left,) = os.listdir(sn.root / "snapshots")
    assert left.startswith("rm-1-")
    with pytest.raises(CleanupIncomplete, match="could not remove 1 orphaned entries"):
        sn.cleanup()
    monkeypatch.setattr(fs_module, "remove_tree", real_remove_tree)
    sn.cleanup()
    assert os.listdir(sn.root / "snapshots") == []


def test_one_process_per_root(tmp_path):
    from snapshotter.fs import RootInUse

    first = Snapshotter(tmp_path / "root")
    with pytest.raises(RootInUse, match="another cvmfs-snapshotter is using"):
        Snapshotter(tmp_path / "root")
    first.close()
    Snapshotter(tmp_path / "root").close()


def test_usage_of_a_5000_level_tree(sn):
    (m,) = sn.prepare("k", "", {})
    make_chain(m.source, 5000)
    try:
        usage = sn.usage("k")
        assert usage.inodes == 1 + 5000 + 1  # the root, the dirs, the file
        assert usage.size >= 10_000
        sn.commit("c", "k", {})  # measures the same way
        assert sn.usage("c") == usage
    finally:
        remove_everything(os.path.join(m.source, "d"))  # pytest's own clean-up recurses


def test_failed_remove_transaction_gives_the_snapshot_its_dir_back(sn, monkeypatch):
    committed(sn, "a", content={"f": "x"})
    real_detach = sn.dirs.detach

    def detach_then_fail(snapshot_id, doomed):
        real_detach(snapshot_id, doomed)
        raise OSError(28, "No space left on device")  # the transaction rolls back

    monkeypatch.setattr(sn.dirs, "detach", detach_then_fail)
    with pytest.raises(OSError):
        sn.remove("a")
    monkeypatch.undo()
    assert sn.stat("a").name == "a"
    assert Path(sn.root / "l" / "1" / "f").read_text() == "x"  # link and dir are back
    assert sorted(os.listdir(sn.root / "snapshots")) == ["1"]
    sn.cleanup()
    (m,) = sn.view("v", "a", {})
    assert Path(m.source, "f").read_text() == "x"


def test_writes_containerd_builds_on_are_fsynced_removals_need_not_be(sn):
    """Power-loss durability (docs/DESIGN.md#durability): Prepare and Commit commit with
    synchronous=FULL (the WAL is fsynced, as bolt fsyncs), Remove with NORMAL."""

    def level() -> int:  # the calling thread's connection: 1 NORMAL, 2 FULL
        return sn.store._conn().execute("PRAGMA synchronous").fetchone()[0]

    sn.prepare("a", "", {})
    assert level() == 2
    sn.remove("a")
    assert level() == 1
    sn.prepare("b", "", {})
    assert level() == 2
    sn.store._conn().execute("PRAGMA synchronous = NORMAL")
    sn.store._local.durable = False
    sn.commit("c", "b", {})
    assert level() == 2


@pytest.mark.parametrize("call", ["commit", "usage"])
def test_a_remove_while_the_usage_is_measured_is_not_found(sn, monkeypatch, call):
    """Remove renames the directory away inside its transaction: the walk of Commit/Usage
    fails (ENOENT) while the row is still there for readers. The answer is NotFound."""
    import snapshotter.core as core_mod

    sn.prepare("k", "", {})

    def removed_meanwhile(path):
        sn.remove("k")
        raise FileNotFoundError(2, "No such file or directory", path)  # what the walk meets

    monkeypatch.setattr(core_mod, "disk_usage", removed_meanwhile)
    with pytest.raises(NotFound):
        sn.commit("c", "k", {}) if call == "commit" else sn.usage("k")

"""Stat and Mounts answered from memory: never an answer a finished write has changed."""

import threading
from pathlib import Path

import pytest

from snapshotter.core import Snapshotter
from snapshotter.errors import FailedPrecondition, NotFound
from snapshotter.model import Info, Kind
from snapshotter.readcache import KeyedCache


@pytest.fixture
def sn(tmp_path: Path):
    s = Snapshotter(tmp_path / "root")
    yield s
    s.close()


def test_a_value_read_before_a_write_finished_is_not_kept():
    cache: KeyedCache[str] = KeyedCache(10)
    gen = cache.generation()
    cache.drop("k")  # a write committed while the read ran
    cache.put("k", "old", gen)
    assert cache.get("k") is None
    cache.put("k", "new", cache.generation())
    assert cache.get("k") == "new"
    cache.drop("k")
    assert cache.get("k") is None


def test_stat_follows_commit_update_remove(sn):
    sn.prepare("active", "", {"a": "1"})
    assert sn.stat("active").labels == {"a": "1"}
    sn.commit("done", "active", {"c": "2"})
    with pytest.raises(NotFound):
        sn.stat("active")
    first = sn.stat("done")
    assert (first.kind, first.labels) == (Kind.COMMITTED, {"c": "2"})
    assert sn.stat("done") is first  # from memory
    sn.update(Info("done", "", Kind.COMMITTED, 0, 0, {"u": "3"}), ["labels.u"])
    assert sn.stat("done").labels == {"c": "2", "u": "3"}
    sn.remove("done")
    with pytest.raises(NotFound):
        sn.stat("done")


def test_mounts_follow_remove_and_a_new_snapshot_under_the_same_key(sn):
    sn.prepare("base-tmp", "", {})
    sn.commit("base", "base-tmp", {})
    first = sn.prepare("k", "base", {})
    assert sn.mounts("k") is first  # from memory
    sn.remove("k")
    with pytest.raises(NotFound):
        sn.mounts("k")
    (m,) = sn.prepare("k", "", {})  # the same key, no parent now
    assert sn.mounts("k")[0].type == m.type == "bind"
    sn.commit("k2", "k", {})
    with pytest.raises(NotFound):
        sn.mounts("k")
    with pytest.raises(FailedPrecondition):
        sn.mounts("k2")


def test_a_stat_that_read_before_an_update_committed_does_not_keep_its_answer(sn):
    sn.prepare("t", "", {})
    sn.commit("c", "t", {"n": "old"})
    cache = sn.store._infos
    real_put = cache.put
    read_done, update_done = threading.Event(), threading.Event()

    def slow_put(key, value, generation):  # the Stat has read sqlite; the update commits now
        read_done.set()
        update_done.wait(10)
        real_put(key, value, generation)

    cache.put = slow_put
    answers = []
    reader = threading.Thread(target=lambda: answers.append(sn.stat("c")))
    reader.start()
    assert read_done.wait(10)
    sn.update(Info("c", "", Kind.COMMITTED, 0, 0, {"n": "new"}), ["labels.n"])
    update_done.set()
    reader.join()
    cache.put = real_put
    assert answers[0].labels == {"n": "old"}  # it read before the update: fine for a racing call
    assert sn.stat("c").labels == {"n": "new"}  # but it was not kept

"""`cvmfs-publisher gc` on a real CernVM-FS 2.12 stratum 0: the names go in one
transaction, the content trees (.flat, .chains, .layers dirs) in one `cvmfs_server ingest
--delete` (catalog level, no walk through the union). A failed ingest and a kill -9 between
the two steps leave trees nothing points at: the next gc deletes them. What a client sees is
checked through the client mount; `cvmfs_server check` must be clean."""
from __future__ import annotations

import time

import pytest

from cvmfs_common.oci.digest import chain_ids
from cvmfs_common.repo.paths import RepositoryLayout
from tests.fixtures.images import BuiltImage, StandardImages
from tests.publisher.clirun import write_wishlist

from .publishing import assert_check_clean, convert, kill9_when
from .stratum0 import Repository, Stratum0
from .test_batch import assert_whole

pytestmark = pytest.mark.e2e

# cvmfs_server, except that `ingest` fails (GC_INGEST=fail) or waits to be killed (=wait)
SERVER = """#!/bin/sh
if [ "$1" = ingest ]; then
    case "$(cat /w/gc-ingest 2>/dev/null)" in
    fail) echo "Synchronization failed (stand-in failure)"; exit 1 ;;
    wait) echo $PPID >/w/gc-waiting; sleep 600 ;;
    esac
fi
exec cvmfs_server "$@"
"""


def setup_half_dropped(s0: Stratum0, standard_images: StandardImages, name: str,
                       db: str) -> tuple[Repository, list[BuiltImage], list[BuiltImage]]:
    """Six images converted, then a wishlist of three: the other three are gc's to take."""
    repo = s0.mkfs(name)
    drop = [standard_images.multilayer, standard_images.tagged["1.0"], standard_images.fifo]
    keep = [standard_images.tagged["1.1"], standard_images.apptainer, standard_images.tagged["2.0"]]
    wishlist = s0.host_w / f"{name}.yaml"
    write_wishlist(wishlist, [i.ref for i in drop + keep], repo=name)
    assert "6 new" in convert(s0, repo, f"/w/{name}.yaml", db).stdout
    write_wishlist(wishlist, [i.ref for i in keep], repo=name)
    convert(s0, repo, f"/w/{name}.yaml", db)
    time.sleep(2)
    return repo, drop, keep


def gc(s0: Stratum0, repo: Repository, db: str, server: str = "cvmfs_server", check: bool = True):
    r = s0.sh(f"cd / && CVMFS_SERVER={server} cvmfs-publisher gc --older-than 1s --backend cvmfs "
              f"--repository-root {repo.root} --state-db {db} --log-level debug >/w/gc.out 2>&1", check=False)
    out = (s0.host_w / "gc.out").read_text(errors="replace")
    if check:
        assert r.returncode == 0, out[-6000:]
    return r.returncode, out


def dropped_trees(lay: RepositoryLayout, drop: list[BuiltImage], keep: list[BuiltImage]) -> list:
    kept_chains = {c for i in keep for c in chain_ids(i.diff_ids)}
    return [lay.flat_dir(i.config_digest) for i in drop] + \
        [lay.chain_dir(c) for i in drop for c in chain_ids(i.diff_ids) if c not in kept_chains]


def test_gc_deletes_the_trees_with_one_ingest(stratum0: Stratum0, standard_images: StandardImages) -> None:
    name = "unpacked.gcingest.test"
    db = "/w/state/gcingest.db"
    repo, drop, keep = setup_half_dropped(stratum0, standard_images, name, db)
    lay = RepositoryLayout(stratum0.host_view(repo.client))
    trees = dropped_trees(lay, drop, keep)
    assert all(t.is_dir() for t in trees)

    before = repo.revision()
    _, out = gc(stratum0, repo, db)
    # one revision for the names, one for every tree (a single `ingest -d ... -d ...`)
    assert repo.revision() == before + 2, out
    ingests = [line for line in out.splitlines() if "running cvmfs_server ingest" in line]
    assert len(ingests) == 1 and ingests[0].count(" -d ") >= len(trees), out
    assert "storage is freed by `cvmfs_server gc`" in out, out
    assert [t for t in trees if t.exists()] == []
    assert not any(lay.link_path(i.host, i.name, i.tag).exists() for i in drop)
    assert_whole(stratum0, repo, keep)
    assert_check_clean(repo)

    # nothing left to do: no revision
    before = repo.revision()
    _, out = gc(stratum0, repo, db)
    assert repo.revision() == before, out


def test_a_failed_or_killed_ingest_then_the_next_gc_deletes_the_trees(
        stratum0: Stratum0, standard_images: StandardImages) -> None:
    name = "unpacked.gckill.test"
    db = "/w/state/gckill.db"
    repo, drop, keep = setup_half_dropped(stratum0, standard_images, name, db)
    lay = RepositoryLayout(stratum0.host_view(repo.client))
    trees = dropped_trees(lay, drop, keep)
    (stratum0.host_w / "gc-server").write_text(SERVER)
    stratum0.sh("chmod 755 /w/gc-server; rm -f /w/gc-waiting; echo fail >/w/gc-ingest")

    # ingest refused: a clear error, the names are gone, the trees and the state's rows stay
    rc, out = gc(stratum0, repo, db, "/w/gc-server", check=False)
    assert rc != 0 and "ERROR deleting" in out and "Synchronization failed" in out, out
    assert all(t.is_dir() for t in trees)
    assert not any(lay.link_path(i.host, i.name, i.tag).exists() for i in drop)
    assert_whole(stratum0, repo, keep)
    assert_check_clean(repo)

    # kill -9 while ingest waits to start
    stratum0.sh("echo wait >/w/gc-ingest")
    kill9_when(stratum0, "gckill", f"CVMFS_SERVER=/w/gc-server setsid cvmfs-publisher gc --older-than 1s "
               f"--backend cvmfs --repository-root {repo.root} --state-db {db}",
               (stratum0.host_w / "gc-waiting").is_file, group=True)
    assert all(t.is_dir() for t in trees)

    # the next gc finds the trees again (the state kept their rows) and deletes them
    _, out = gc(stratum0, repo, db)
    assert [t for t in trees if t.exists()] == [], out
    assert_whole(stratum0, repo, keep)
    assert_check_clean(repo)

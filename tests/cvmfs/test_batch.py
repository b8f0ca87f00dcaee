"""A round of images through a real CernVM-FS 2.12 stratum 0 in two revisions, whatever the
number of images: their layers, then chains and flat dirs (grafting the published layer
files instead of copying them), names, metadata and podman store entries of all of them.

What a client sees is checked through the client mount; `cvmfs_server check` must be clean;
a `kill -9` inside the second (the batched) transaction must leave a repository the next
round repairs."""
from __future__ import annotations

from pathlib import Path

import pytest

from cvmfs_common.oci.digest import chain_ids
from cvmfs_common.repo.paths import RepositoryLayout
from tests.fixtures.images import BuiltImage, StandardImages
from tests.fixtures.tree import compare_trees
from tests.publisher.clirun import write_wishlist
from tests.publisher.repotree import flat_tree_problems, observed_tree

from .publishing import IGNORE, assert_check_clean, convert, kill9_when, split_hardlinks
from .stratum0 import Repository, Stratum0

pytestmark = pytest.mark.e2e

# A round's new images make two revisions: one for their layers, one for the rest (the
# tests force it with --one-unit-mb 0: their layers are small), or one when their layers
# are small.
ROUND_REVISIONS = 2
TWO_UNITS = "--one-unit-mb 0"


def round_images(standard_images: StandardImages) -> list[BuiltImage]:
    return [standard_images.multilayer, standard_images.tagged["1.0"], standard_images.tagged["1.1"],
            standard_images.apptainer, standard_images.fifo]


def assert_whole(s0: Stratum0, repo: Repository, images: list[BuiltImage]) -> None:
    """Every image's top chain and flat dir, as a client sees them, are the image's tree."""
    lay = RepositoryLayout(s0.host_view(repo.client))
    for img in images:
        top = observed_tree(lay.chain_dir(chain_ids(img.diff_ids)[-1]))
        assert split_hardlinks(img, top, compare_trees(img.tree, top, ignore=IGNORE)) == [], img.ref
        flat = observed_tree(lay.flat_dir(img.config_digest))
        assert split_hardlinks(img, flat, flat_tree_problems(img.tree, flat, IGNORE)) == [], img.ref
        assert (lay.flat_dir(img.config_digest) / ".singularity.d/env/10-docker2singularity.sh").is_file()


def test_a_round_is_two_revisions_and_grafts_its_chains(stratum0: Stratum0,
                                                        standard_images: StandardImages) -> None:
    name = "unpacked.batch.test"
    repo = stratum0.mkfs(name)
    db = "/w/state/batch.db"
    images = round_images(standard_images)
    write_wishlist(stratum0.host_w / "batch.yaml", [i.ref for i in images], repo=name)
    before = repo.revision()
    out = convert(stratum0, repo, "/w/batch.yaml", db, TWO_UNITS).stdout
    assert f"{len(images)} new" in out, out
    assert repo.revision() == before + ROUND_REVISIONS
    assert_whole(stratum0, repo, images)
    assert_check_clean(repo)

    # No change: no revision.
    before = repo.revision()
    out = convert(stratum0, repo, "/w/batch.yaml", db, TWO_UNITS).stdout
    assert f"0 new, 0 updated, {len(images)} unchanged" in out, out
    assert repo.revision() == before

    # One more tag on a base the repository has: its chains graft the published files.
    more = [*images, standard_images.tagged["2.0"]]
    write_wishlist(stratum0.host_w / "batch.yaml", [i.ref for i in more], repo=name)
    before = repo.revision()
    out = convert(stratum0, repo, "/w/batch.yaml", db, TWO_UNITS).stdout
    assert "1 new" in out, out
    assert repo.revision() - before <= ROUND_REVISIONS
    log = (stratum0.host_w / f"convert-{name}.log").read_text(errors="replace")
    assert not list(Path(stratum0.host_view(repo.client)).rglob(".cvmfsgraft-*"))  # publish consumed them
    assert "transaction -T" not in log  # no template transaction: one per revision would bound nothing
    assert_whole(stratum0, repo, more)
    assert_check_clean(repo)


SLOW_SERVER = """#!/bin/sh
# cvmfs_server, except that the second publish of a run first waits (the test kills the
# publisher then: inside the batched transaction, with everything of the round written)
if [ "$1" = publish ]; then
    n=$(( $(cat /w/slow-count 2>/dev/null || echo 0) + 1 )); echo $n >/w/slow-count
    if [ $n -eq 2 ]; then echo $PPID >/w/slow-publisher; sleep 600; fi
fi
exec cvmfs_server "$@"
"""


def test_kill9_inside_the_batched_transaction_then_the_next_round_repairs(
        stratum0: Stratum0, standard_images: StandardImages) -> None:
    name = "unpacked.batchkill.test"
    repo = stratum0.mkfs(name)
    db = "/w/state/batchkill.db"
    images = round_images(standard_images)
    write_wishlist(stratum0.host_w / "batchkill.yaml", [i.ref for i in images], repo=name)
    (stratum0.host_w / "slow-server").write_text(SLOW_SERVER)
    stratum0.sh("chmod 755 /w/slow-server; rm -f /w/slow-count /w/slow-publisher")
    start = repo.revision()
    # killed with its group: the publisher and the publish it waits on
    kill9_when(stratum0, "batchkill", f"CVMFS_SERVER=/w/slow-server setsid cvmfs-publisher convert "
               f"/w/batchkill.yaml --backend cvmfs --repository-root {repo.root} --state-db {db} --log-level debug "
               f"{TWO_UNITS}", (stratum0.host_w / "slow-publisher").is_file, group=True, timeout=600)
    assert repo.in_transaction()
    assert repo.revision() == start + 1  # the layers were published; the rest was not
    log = (stratum0.host_w / "batchkill.log").read_text(errors="replace")
    assert f"for layers of {len(images)} image(s)" in log and f"transaction open for {len(images)} image(s)" in log

    out = convert(stratum0, repo, "/w/batchkill.yaml", db, TWO_UNITS).stdout
    assert "aborting it" in out, out
    assert f"{len(images)} new" in out and "0 failed" in out, out
    # a round again: the layers the killed run published are there, those it would have
    # unpacked in its second unit (they omit parent dirs: unpacked on their parent chain) not
    assert repo.revision() <= start + 1 + ROUND_REVISIONS
    assert_whole(stratum0, repo, images)
    assert_check_clean(repo)

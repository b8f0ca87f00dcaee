"""A hung repository (FUSE getattr that sleeps) never hangs containerd: pulls fall back."""

from __future__ import annotations

import os
import subprocess
import sys
import time
from pathlib import Path

import pytest

from tests.e2e.pulls import cvmfs_pull
from tests.fixtures.marks import fuse_missing
from tests.fixtures.polling import wait_until
from tests.fixtures.tree import LISTING_COMMAND, compare_trees, parse_listing
from tests.fixtures.workdirs import new_workdir

pytestmark = pytest.mark.e2e

HANG_SECONDS = 60
STAT_TIMEOUT = 1.0


@pytest.fixture
def hung_repo(e2e_base):
    why = fuse_missing()
    if why:
        pytest.skip(why)
    mnt = new_workdir("hung-", e2e_base) / "mnt"
    log = open(mnt.parent / "hangfs.log", "w")
    proc = subprocess.Popen([sys.executable, str(Path(__file__).with_name("hangfs.py")), str(mnt), str(HANG_SECONDS)],
                            stdout=log, stderr=subprocess.STDOUT)
    wait_until(lambda: os.path.ismount(mnt), 20, "hangfs mount", proc, Path(log.name))
    yield mnt
    subprocess.run(["fusermount", "-u", "-z", str(mnt)], check=False)
    subprocess.run(["umount", "-l", str(mnt)], check=False, capture_output=True)
    proc.kill()
    proc.wait(10)
    log.close()


def test_pull_falls_back_and_rpcs_stay_bounded(registry, standard_images, snapshotter_factory, containerd_factory,
                                             hung_repo):
    # hung_repo comes last so it is torn down first: a thread stuck in the FUSE
    # request keeps the snapshotter from exiting until the FUSE daemon goes away.
    img = standard_images.multilayer
    sn = snapshotter_factory(repositories=[hung_repo], extra_args=["--stat-timeout", str(STAT_TIMEOUT)])
    cd = containerd_factory(sn.address)
    start = time.monotonic()
    res = cvmfs_pull(cd, img.ref)
    elapsed = time.monotonic() - start
    assert f"0 layers from the repository, {len(img.layers)} downloaded" in res.stderr, res.stderr
    # One lookup times out; later ones fail fast while it is stuck: far below the hang.
    assert elapsed < HANG_SECONDS / 2, f"pull took {elapsed:.1f}s"
    assert "did not answer" in sn.log() or "not answering" in sn.log()
    t0 = time.monotonic()
    out = cd.run(img.ref, *LISTING_COMMAND).stdout
    assert time.monotonic() - t0 < HANG_SECONDS / 2
    problems = compare_trees(img.tree, parse_listing(out))
    assert not problems, "\n".join(problems)

"""Hostile entries in a published repository, through the real publisher, snapshotter daemon,
containerd and registry: a FIFO where a tag's metadata file or a layer's layers.json should
be neither hangs the bounded prober nor makes the repository count as unavailable: the
other layers are still served from it, and the pull takes no prober timeout."""

from __future__ import annotations

import os
import time

import pytest

from cvmfs_common.repo.paths import RepositoryLayout
from tests.e2e.daemonpull import check_tree, control, pull

pytestmark = pytest.mark.e2e

STAT_TIMEOUT = 2.0


def fifo_in_place_of(path) -> None:
    path.unlink()
    os.mkfifo(path)


def test_fifos_in_the_metadata_neither_hang_the_prober_nor_hide_the_repository(
        registry_factory, push_standard_images, snapshotter_factory, containerd_factory, e2e_base):
    from tests.fixtures.workdirs import new_workdir
    from tests.publisher.clirun import run_cli

    reg = registry_factory()
    img = push_standard_images(reg).multilayer
    repo = RepositoryLayout(new_workdir("repo-", e2e_base))
    res = run_cli("convert-image", img.ref, "--repository-root", repo.root,
                  "--state-db", new_workdir("pub-state-", e2e_base) / "state.db")
    assert res.rc == 0, res.stdout
    tag_dir = repo.manifest_json(reg.host, img.name, img.tag).parent
    fifo_in_place_of(tag_dir / "config.json")      # the daemon's pull reads the tag's metadata
    fifo_in_place_of(repo.layers_json(img.layers[0]))  # every lookup of layer 0 reads it
    sn = snapshotter_factory(repositories=[repo.root], extra_args=["--stat-timeout", f"{STAT_TIMEOUT:g}s"])
    cd = containerd_factory(sn.address)
    started = time.monotonic()
    res = pull(cd, img.ref, "--plain-http", "--daemon", "--control-socket", control(sn))
    took = time.monotonic() - started
    # The tag's copy is incomplete: manifest and config come from the registry. Layer 0's
    # metadata is unusable: its chain directory serves it. The rest as usual.
    assert "(manifest and config from the repository)" not in res.stderr, res.stderr
    assert f"{len(img.layers)} layers from the repository, 0 downloaded" in res.stderr, res.stderr
    assert "did not answer" not in sn.log() and "not answering" not in sn.log(), sn.log()
    assert took < 60, took
    check_tree(cd, img)


HANG_SECONDS = 60


@pytest.fixture
def hang_at(e2e_base):
    """hangfs (every getattr below its root sleeps) mounted on a directory inside a repository:
    one entry that hangs, the rest of the repository fine."""
    from tests.fixtures.marks import fuse_missing

    why = fuse_missing()
    if why:
        pytest.skip(why)
    mounted: list[tuple] = []

    def mount(where):
        import subprocess
        import sys
        from pathlib import Path

        from tests.fixtures.polling import wait_until

        log = open(new_log(e2e_base), "w")
        proc = subprocess.Popen([sys.executable, str(Path(__file__).with_name("hangfs.py")), str(where),
                                 str(HANG_SECONDS)], stdout=log, stderr=subprocess.STDOUT)
        mounted.append((where, proc, log))
        wait_until(lambda: os.path.ismount(where), 20, "hangfs mount", proc, Path(log.name))

    yield mount
    import subprocess

    for where, proc, log in mounted:
        subprocess.run(["fusermount", "-u", "-z", str(where)], check=False)
        subprocess.run(["umount", "-l", str(where)], check=False, capture_output=True)
        proc.kill()
        proc.wait(10)
        log.close()


def new_log(base):
    from tests.fixtures.workdirs import new_workdir

    return new_workdir("hangfs-", base) / "hangfs.log"


def test_the_prober_recovers_from_one_hung_entry(registry_factory, push_standard_images, snapshotter_factory,
                                                 containerd_factory, e2e_base, hang_at):
    """Layer 0's directory hangs (a FUSE mount over it): its lookup times out once, and the
    next questions get a fresh prober thread: layer 0 is downloaded (the publisher keeps no
    chain directory for a bottom layer), layers 1 and 2 are served from the repository."""
    from tests.fixtures.workdirs import new_workdir
    from tests.publisher.clirun import run_cli

    reg = registry_factory()
    img = push_standard_images(reg).multilayer
    repo = RepositoryLayout(new_workdir("repo-", e2e_base))
    res = run_cli("convert-image", img.ref, "--repository-root", repo.root,
                  "--state-db", new_workdir("pub-state-", e2e_base) / "state.db")
    assert res.rc == 0, res.stdout
    sn = snapshotter_factory(repositories=[repo.root], extra_args=["--stat-timeout", "1s"])
    cd = containerd_factory(sn.address)
    hung = repo.layer_dir(img.layers[0])
    hung.rename(hung.with_name("aside"))  # FUSE mounts on an empty directory
    hung.mkdir()
    hang_at(hung)
    res = pull(cd, img.ref, "--plain-http", "--daemon", "--control-socket", control(sn))
    assert f"did not answer layer {img.layers[0]}" in sn.log(), sn.log()
    assert f"{len(img.layers) - 1} layers from the repository, 1 downloaded" in res.stderr, res.stderr
    assert f"layer 1/{len(img.layers)} {img.layers[0][:19]}: downloaded" in res.stderr, res.stderr  # the hung one
    check_tree(cd, img)

"""kill -9 in the middle of a conversion: nothing partial becomes visible, a re-run completes."""
from __future__ import annotations

import os
import signal
from pathlib import Path

import pytest

from cvmfs_common.oci.digest import chain_ids
from cvmfs_common.repo.paths import RepositoryLayout
from cvmfs_common.repo.lookup import find_layer
from tests.fixtures.images import BuiltImage
from tests.fixtures.tree import compare_trees

from tests.publisher.clirun import popen_cli, run_cli
from tests.publisher.inflight import wait_for_work
from tests.fixtures.marks import requires_root
from tests.publisher.repotree import flat_minus_chain, observed_tree

pytestmark = requires_root

def _assert_nothing_partial(lay: RepositoryLayout, img: BuiltImage) -> None:
    for xx in (lay.layers_dir.iterdir() if lay.layers_dir.exists() else []):
        for d in xx.iterdir():
            found = find_layer(lay, f"sha256:{d.name}")
            assert found is not None and found.metadata is not None, f"partial layer dir {d}"
            assert (d / ".metadata/origin.json").is_file()
    assert not os.path.lexists(lay.link_path(img.host, img.name, img.tag))
    assert not lay.manifest_json(img.host, img.name, img.tag).exists()
    assert not lay.flat_dir(img.config_digest).exists()
    assert not (lay.podman_store / "overlay-images/images.json").exists() or \
        img.config_digest[7:] not in (lay.podman_store / "overlay-images/images.json").read_text()
    # what is published at top level is layout only: no stray temp files next to it
    assert {p.name for p in lay.root.iterdir()} <= {".layers", ".chains", ".tmp", ".flat", "podmanStore",
                                                   ".multiarch", ".metadata"}
    # (.metadata/.format went with the first unit: the repository format, docs/DESIGN.md#format)


@pytest.mark.parametrize("phase", ["layer-", "chain-"])
def test_kill_9_then_rerun_completes(big_image: BuiltImage, tmp_path: Path, phase: str) -> None:
    root, db = tmp_path / "repo", tmp_path / "state.db"
    lay = RepositoryLayout(root)
    args = ("convert-image", big_image.ref, "--repository-root", root, "--state-db", db, "--jobs", "2",
            "--log-level", "debug")
    proc = popen_cli(*args, log=tmp_path / "killed.log")
    try:
        wait_for_work(lay.tmp_dir, phase)
        proc.send_signal(signal.SIGKILL)
        proc.wait(timeout=30)
    finally:
        if proc.poll() is None:
            proc.kill()
            proc.wait()
    assert proc.returncode == -signal.SIGKILL, (tmp_path / "killed.log").read_text()
    _assert_nothing_partial(lay, big_image)

    again = run_cli(*args[:-2])
    assert again.rc == 0, again.stdout
    assert not any(lay.tmp_dir.iterdir()), "work dirs left behind"
    top = chain_ids(big_image.diff_ids)[-1]
    assert compare_trees(big_image.tree, observed_tree(lay.chain_dir(top))) == []
    assert flat_minus_chain(lay.flat_dir(big_image.config_digest), lay.chain_dir(top)) == []
    assert os.path.realpath(lay.link_path(big_image.host, big_image.name, big_image.tag)) == \
        os.path.realpath(lay.flat_dir(big_image.config_digest))

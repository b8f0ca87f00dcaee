"""A registry that answers slowly or never: each costs its own bound, named for what
happened (issue 23, item 6: HEADs and slow-drip blobs)."""
from __future__ import annotations

import os
import threading
import time
from pathlib import Path

import pytest

from cvmfs_common.repo.paths import RepositoryLayout
from tests.cvmfs_common.netfaults import Frontend, Seen, TricklingProxy
from tests.fixtures.images import Pusher, host_arch
from tests.fixtures.layers import Layer
from tests.fixtures.oci_layout import ImageConfig, OciLayout, Platform

from tests.publisher.clirun import run_proc, write_wishlist
from tests.publisher.looprun import Images


@pytest.fixture
def drip_setup(registry_factory, tmp_path: Path):
    reg = registry_factory()
    images = Images(reg.host, tmp_path)
    images.make("slow", {"/etc/version": "slow\n", "/data/big": os.urandom(400_000).hex()})
    images.push("slow", "test/slow", "v1")
    images.push("fast", "test/fast", "v1")
    with TricklingProxy(("127.0.0.1", reg.port), after=64 * 1024, every=1, step=64) as proxy:
        yield reg, proxy


def test_a_slow_drip_blob_is_reported_as_too_slow(drip_setup, tmp_path: Path) -> None:
    reg, proxy = drip_setup
    root = tmp_path / "repo"
    wishlist = write_wishlist(tmp_path / "w.yaml", [f"{proxy.host}/test/slow:v1", f"{reg.host}/test/fast:v1"])
    res = run_proc("convert", wishlist, "--repository-root", root, "--state-db", tmp_path / "s.db",
                   "--no-podman-store", "--transfer-window", "3s", timeout=300)
    assert res.rc == 1, res.stdout + res.stderr
    failed = next(line for line in res.stdout.splitlines() if "FAILED" in line)
    assert "malformed" not in failed and "TransferTooSlow" in failed and "KiB/s" in failed, failed
    assert os.path.islink(RepositoryLayout(root).link_path(reg.host, "test/fast", "v1"))


def test_junk_dripping_slowly_is_reported_as_too_slow_not_as_a_malformed_layer(drip_setup, tmp_path: Path) -> None:
    """What arrived first is no tar, and the rest never comes: the download failed before
    the layer could be judged (its digest is unknown), so that is what is reported."""
    reg, proxy = drip_setup
    junk = Layer(b"no tar header here" + os.urandom(400_000))
    oci = OciLayout(tmp_path / "junk")
    oci.tag("junk", oci.add_image([junk], ImageConfig(platform=Platform("linux", host_arch()))))
    Pusher(reg.host).copy(oci.root, "junk", "test/junk", "v1")
    root = tmp_path / "repo"
    res = run_proc("convert-image", f"{proxy.host}/test/junk:v1", "--repository-root", root,
                   "--state-db", tmp_path / "s.db", "--no-podman-store", "--transfer-window", "3s", timeout=300)
    assert res.rc == 1, res.stdout + res.stderr
    failed = next(line for line in res.stdout.splitlines() if "FAILED" in line)
    assert "malformed" not in failed and "TransferTooSlow" in failed and "KiB/s" in failed, failed
    assert f"blob {junk.digest}" in failed, failed


def test_a_head_that_never_answers_costs_its_own_deadline_once(registry, tmp_path: Path) -> None:
    images = Images(registry.host, tmp_path)
    images.push("fast", "test/fast", "v1")
    images.push("fast", "test/dead", "v1")
    release = threading.Event()

    def never_answer(seen: Seen):
        if seen.method == "HEAD" and "/test/dead/" in seen.path:
            release.wait(600)  # the registry took the request and says nothing
        return None

    root = tmp_path / "repo"
    with Frontend(registry.host, never_answer) as front:
        wishlist = write_wishlist(tmp_path / "w.yaml", [f"{front.host}/test/dead:v1", f"{front.host}/test/fast:v1"])
        started = time.monotonic()
        try:
            res = run_proc("convert", wishlist, "--repository-root", root, "--state-db", tmp_path / "s.db",
                           "--no-podman-store", "--head-timeout", "3s", timeout=200)
        finally:
            release.set()
        took = time.monotonic() - started
        heads = [r for r in front.requests if r.method == "HEAD" and "/test/dead/" in r.path]
    print(f"\nconvert with a never-answering HEAD, --head-timeout 3s: {took:.1f} s")
    assert res.rc == 1, res.stdout + res.stderr
    failed = next(line for line in res.stdout.splitlines() if "FAILED" in line)
    assert "test/dead:v1" in failed and "DeadlineExceeded" in failed and "HEAD" in failed, failed
    assert "timed out, and no answer within the HEAD deadline of 3 s" in failed, failed
    assert len(heads) == 1  # no retry after the deadline
    assert "1 new" in res.stdout and os.path.islink(RepositoryLayout(root).link_path(front.host, "test/fast", "v1"))

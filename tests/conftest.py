"""Shared fixtures: real registry, containerd and cvmfs-snapshotter (tests/fixtures/).

Tiers: every test that uses a real component (a registry, containerd, podman, a root fs
container, CernVM-FS, FUSE) carries the marker `real`, set here from the fixtures it uses or
from its module's marks; `-m "not real"` (`scripts/test.sh --fast`) is the fast tier."""
import pytest

from tests.fixtures.plugin import (  # noqa: F401  (pytest finds fixtures by name)
    containerd,
    containerd_factory,
    e2e_base,
    own_registry,
    push_standard_images,
    pytest_runtest_makereport,
    registry,
    registry_factory,
    rootfs_factory,
    snapshotter,
    snapshotter_factory,
    standard_images,
)

# Fixtures that start (or need) a real component; a test using any of them, directly or
# through other fixtures, is `real`. A new fixture over a real component belongs here.
REAL_FIXTURES = frozenset({
    "registry", "registry_factory", "standard_images", "push_standard_images",
    "snapshotter", "snapshotter_factory", "containerd", "containerd_factory",
    "rootfs_factory", "stratum0",
    "plain_containerd",      # tests/cvmfs_common/oci/test_chainid_containerd.py
    "podman_base",           # tests/publisher/write/test_podman_store.py: a private podman
    "hung_repo",             # tests/e2e/test_hung_repository.py: a FUSE file system
})
# Marks that imply a real component (set on modules that start one without a fixture).
REAL_MARKS = ("e2e", "runtimes")


def pytest_collection_modifyitems(config: pytest.Config, items: list[pytest.Item]) -> None:
    for item in items:
        names = set(getattr(item, "fixturenames", ()))
        if names & REAL_FIXTURES or any(item.get_closest_marker(m) for m in REAL_MARKS):
            item.add_marker(pytest.mark.real)

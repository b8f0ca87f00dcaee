"""Shared fixtures: real registry, containerd and cvmfs-snapshotter (tests/fixtures/)."""
from tests.fixtures.plugin import (  # noqa: F401  (pytest finds fixtures by name)
    containerd,
    containerd_factory,
    e2e_base,
    push_standard_images,
    pytest_runtest_makereport,
    registry,
    registry_factory,
    rootfs_factory,
    snapshotter,
    snapshotter_factory,
    standard_images,
)

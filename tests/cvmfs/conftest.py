"""Fixtures of the real-CernVM-FS tier: one stratum 0 container per session (stratum0.py)."""
from __future__ import annotations

import contextlib
from pathlib import Path
from typing import Iterator

import pytest

from tests.fixtures.rootfs import RootfsUnavailable, start_container, stop_container

from .stratum0 import DistributionMissing, Stratum0, bookworm_spec, find_distribution


@contextlib.contextmanager
def running_stratum0(base: Path, **kw) -> Iterator[Stratum0]:
    """A stratum 0 container booted under ``base`` (``kw``: RootfsContainer's), removed after."""
    try:
        spec = bookworm_spec(find_distribution())
        c = start_container(spec, base, "s0-", **kw)
    except (RootfsUnavailable, DistributionMissing) as e:
        pytest.skip(str(e))
    try:
        yield Stratum0(c).boot()
    finally:
        stop_container(c)


@pytest.fixture(scope="session")
def stratum0(e2e_base: Path) -> Iterator[Stratum0]:
    # init: every cvmfs_server mount leaves orphans; a PID 1 that reaps them keeps a long
    # session below the container's process limit (sleep as PID 1 never does)
    with running_stratum0(e2e_base, init=True) as s0:
        yield s0

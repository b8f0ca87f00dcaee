"""Fixtures of the runtime matrix: a Debian release's root fs running our stack (a fresh
loopback registry with the standard images is `own_registry`, tests/fixtures; repositories
are written on the host into the container's /w: stack.repo_in)."""
from __future__ import annotations

from typing import Callable, Iterator

import pytest

from .stack import DIST_IN_CONTAINER, Runtime, Stack, shared_containerd_dir


@pytest.fixture
def stack_factory(request: pytest.FixtureRequest, rootfs_factory) -> Iterator[Callable[..., Stack]]:
    """`make(runtime, registries=[url], repositories=[...], before_start=fn(container))` → a
    started Stack; its logs are printed when the test fails."""
    made: list[Stack] = []

    def make(runtime: Runtime, *, before_start: Callable | None = None, **kw) -> Stack:
        binds = []
        if runtime.tarball:
            dist = shared_containerd_dir()
            if dist is None or not (dist / runtime.tarball).is_file():
                pytest.skip(f"containerd {runtime.containerd} needs {runtime.tarball} in ../shared/containerd "
                            "(or $CVMFS_TEST_CONTAINERD_DIST)")
            binds.append((str(dist), DIST_IN_CONTAINER, True))
        c = rootfs_factory(runtime.spec, binds=binds)
        stack = Stack(c, runtime, **kw)
        made.append(stack)
        if before_start is not None:
            before_start(c)
        return stack.start()

    yield make
    rep = getattr(request.node, "rep_call", None)
    if rep is not None and rep.failed:
        for s in made:
            print(s.logs())

"""Fixtures of the runtime matrix: a Debian release's root fs running our stack, a fresh
loopback registry with the standard images, repositories written on the host into the
container's /w."""
from __future__ import annotations

from typing import Callable, Iterator

import pytest

from cvmfs_common.repo.paths import RepositoryLayout

from .stack import DIST_IN_CONTAINER, Runtime, Stack, shared_containerd_dir


@pytest.fixture
def own_registry(registry_factory, push_standard_images):
    """A registry of the test's own (its blobs may be deleted) with the standard images."""
    reg = registry_factory()
    return reg, push_standard_images(reg)


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


def repo_in(stack_or_container) -> RepositoryLayout:
    """The repository at /w/repo inside the container, written from the host."""
    c = getattr(stack_or_container, "c", stack_or_container)
    root = c.host_w / "repo"
    root.mkdir(parents=True, exist_ok=True)
    return RepositoryLayout(root)

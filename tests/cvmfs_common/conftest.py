"""Fixtures for the registry-client tests: small images pushed to fresh registries.

The registry itself and the standard images come from tests/fixtures (tests/conftest.py)."""
from __future__ import annotations

import os
from pathlib import Path
from typing import Callable

import pytest

from tests.fixtures.images import BuiltImage, Pusher, host_arch
from tests.fixtures.layers import Entry, Layer
from tests.fixtures.oci_layout import ImageConfig, OciLayout, Platform
from tests.fixtures.registry import Registry
from tests.fixtures.workdirs import new_workdir


def push_small_image(reg: Registry, work: Path, name: str, tag: str = "v1",
                     big_file: int = 0, creds: tuple[str, str] | None = None) -> BuiltImage:
    """Two layers; with big_file > 0 the second carries that many random (incompressible)
    bytes, so a blob is large enough to be cut mid-transfer."""
    layout = OciLayout(work / f"layout-{name.replace('/', '-')}-{tag}")
    layers = [Layer.from_entries([Entry.dir("/etc"), Entry.file("/etc/hello", f"hello {name}\n")])]
    second = [Entry.dir("/data"), Entry.file("/data/small", "x\n")]
    if big_file:
        second.append(Entry.file("/data/big", os.urandom(big_file)))
    layers.append(Layer.from_entries(second))
    desc = layout.add_image(layers, ImageConfig(platform=Platform("linux", host_arch())))
    layout.tag(tag, desc)
    pusher = Pusher(reg.host, creds)
    pusher.copy(layout.root, tag, name, tag, fmt="oci")
    return pusher.describe(name, tag, layer_tars=[l.tar for l in layers])


@pytest.fixture
def small_image(e2e_base: Path) -> Callable[..., BuiltImage]:
    def push(reg: Registry, name: str, **kwargs) -> BuiltImage:
        return push_small_image(reg, new_workdir("small-", e2e_base), name, **kwargs)
    return push

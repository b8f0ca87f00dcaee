"""Catching a conversion mid-way: an image whose big layer takes a moment to unpack, and the
work dirs under .tmp/ that show which stage is running (for kill -9 and lock tests)."""
from __future__ import annotations

import os
from pathlib import Path

from tests.fixtures.images import BuiltImage, Pusher, busybox_entries, host_arch
from tests.fixtures.layers import Entry, Layer
from tests.fixtures.oci_layout import ImageConfig, OciLayout, Platform
from tests.fixtures.polling import wait_until

FILES = 2_000  # unpacking takes a moment (a kill lands mid-way); the suite stays fast


def push_big_image(registry_host: str, work: Path, name: str = "test/big") -> BuiltImage:
    """busybox, a layer of FILES small files, and a top layer with a whiteout."""
    many = [Entry.dir("/many")] + [Entry.dir(f"/many/d{i:03d}") for i in range(100)]
    many += [Entry.file(f"/many/d{i % 100:03d}/f{i:05d}", f"{i}\n" * 20) for i in range(FILES)]
    top = Layer.from_entries([Entry.file("/etc/top", "top\n"), Entry.whiteout("/etc/group")])
    layers = [Layer.from_entries(busybox_entries()), Layer.from_entries(many), top]
    oci = OciLayout(work / "layout")
    oci.tag("big", oci.add_image(layers, ImageConfig(platform=Platform("linux", host_arch()))))
    pusher = Pusher(registry_host)
    pusher.copy(oci.root, "big", name, "v1")
    return pusher.describe(name, "v1", layer_tars=[l.tar for l in layers])


def work_started(tmp: Path, prefix: str = "layer-") -> bool:
    """A work dir of that stage (layer-, chain-) under `tmp` with a directory in it that
    already holds more than one entry: the stage is writing."""
    for entry in os.scandir(tmp):
        if entry.name.startswith(prefix):
            for sub in os.scandir(entry.path):
                if sub.is_dir() and len(os.listdir(sub.path)) > 1:
                    return True
    return False


def wait_for_work(tmp: Path, prefix: str = "layer-", timeout: float = 60) -> None:
    # FileNotFoundError: .tmp/ or a work dir not there yet, or already renamed away
    wait_until(lambda: work_started(tmp, prefix), timeout, f"a {prefix} work dir under {tmp}",
               interval=0.002, retry_on=(FileNotFoundError,))

"""`podman run` straight from a repository's podmanStore vs `podman pull` + `podman run`
from a loopback registry, measured in the same run. The ratio is printed last.

    sudo .venv/bin/python bench/podman_bench.py [--runs 5] [--payload-mb 64]

Both sides start from an empty private graphroot every time (the pull side must download
and unpack; the store side must not), with the same podman flags
(docs/DESIGN.md#test-environment). The image is the fixtures' busybox root plus one layer
of --payload-mb MiB of incompressible data, so the difference grows with image size as it
does for real images.
"""
from __future__ import annotations

import argparse
import os
import statistics
import sys
import time
from pathlib import Path

sys.path.insert(0, str(Path(__file__).resolve().parents[1]))

from cvmfs_common.repo.paths import RepositoryLayout  # noqa: E402
from publisher.write.podman_store import PodmanStore  # noqa: E402
from tests.fixtures.images import Pusher, busybox_entries, host_arch  # noqa: E402
from tests.fixtures.layers import Entry, Layer  # noqa: E402
from tests.fixtures.oci_layout import ImageConfig, OciLayout, Platform  # noqa: E402
from tests.fixtures.registry import Registry  # noqa: E402
from tests.fixtures.workdirs import new_workdir, remove_workdir  # noqa: E402
from tests.publisher.podmanenv import Podman, podman_missing  # noqa: E402
from tests.publisher.testrepo import podman_image  # noqa: E402

NAME, TAG = "bench/payload", "v1"
STORE_NAME = f"docker.io/{NAME}:{TAG}"


def build_image(registry: Registry, work: Path, payload_mb: int) -> tuple[str, int]:
    """Push busybox + payload; returns (manifest digest, compressed bytes)."""
    layers = [Layer.from_entries(busybox_entries()),
              Layer.from_entries([Entry.dir("/payload"),
                                  Entry.file("/payload/data", os.urandom(payload_mb << 20))])]
    layout = OciLayout(work / "layout")
    desc = layout.add_image(layers, ImageConfig(platform=Platform("linux", host_arch())))
    layout.tag(TAG, desc)
    pusher = Pusher(registry.host)
    pusher.copy(work / "layout", TAG, NAME, TAG)
    return pusher.describe(NAME, TAG, layer_tars=[l.tar for l in layers]).manifest_digest, \
        sum(len(l.blob) for l in layers)


def timed(fn) -> float:
    start = time.monotonic()
    fn()
    return time.monotonic() - start


def main(argv: list[str] | None = None) -> int:
    ap = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    ap.add_argument("--runs", type=int, default=5)
    ap.add_argument("--payload-mb", type=int, default=64)
    ap.add_argument("--keep", action="store_true", help="keep the work dir")
    args = ap.parse_args(argv)
    why = podman_missing()
    if why:
        print(f"skipped: {why}")
        return 0
    base = new_workdir("podman-bench-")
    registry = Registry(base / "registry").start()
    try:
        digest, blob_bytes = build_image(registry, base, args.payload_mb)
        layout = RepositoryLayout(base / "repo")
        PodmanStore(layout).add_image(podman_image(layout, registry.host, NAME, digest, [STORE_NAME]))
        cmd = ("/bin/sh", "-c", "test -s /payload/data")
        store_times, pull_times = [], []
        for i in range(args.runs):
            store = Podman(base / f"store-{i}", stores=[layout.podman_store])
            store_times.append(timed(lambda: store.run(STORE_NAME, *cmd)))
            puller = Podman(base / f"pull-{i}")
            ref = f"{registry.host}/{NAME}:{TAG}"
            pull_times.append(timed(lambda: (puller("pull", "--quiet", "--tls-verify=false", ref),
                                             puller.run(ref, *cmd))))
            for p in (store, puller):  # keep disk use flat (podman leaves graph/overlay mounted)
                remove_workdir(p.workdir)
        store_s, pull_s = statistics.median(store_times), statistics.median(pull_times)
        print(f"image: busybox + {args.payload_mb} MiB payload, {blob_bytes / 2**20:.1f} MiB of blobs, "
              f"{args.runs} runs each, fresh graphroot every time")
        print(f"podman run from podmanStore:        median {store_s:.3f} s  "
              f"({', '.join(f'{t:.3f}' for t in store_times)})")
        print(f"podman pull + run from the registry: median {pull_s:.3f} s  "
              f"({', '.join(f'{t:.3f}' for t in pull_times)})")
        print(f"ratio (pull + run) / (run from store): {pull_s / store_s:.2f}")
    finally:
        registry.stop()
        if not args.keep:
            remove_workdir(base)
    return 0


if __name__ == "__main__":
    sys.exit(main())

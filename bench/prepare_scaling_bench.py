#!/usr/bin/env python3
"""Prepare latency of cvmfs-snapshotter with 10 000 existing snapshots vs with 100.

    sudo .venv/bin/python bench/prepare_scaling_bench.py
    sudo .venv/bin/python bench/prepare_scaling_bench.py --large 2000 --samples 200   # quick

Two snapshotter processes, each with a root pre-populated (in-process, through the
domain Snapshotter, so populating is not what is timed) with --small / --large committed
snapshots: chains of --depth layers, labelled as containerd's unpacker labels them. Then,
over direct gRPC to each socket, in alternating batches: Prepare an active snapshot on
the top of a chain with a `containerd.io/snapshot.ref` label (the unpacker's shape, so
the repository lookup runs too), then Remove it (so the count stays put; Remove is not
timed). Prints p50/p99 per population and, LAST, the ratio large/small (target p99 <= 1.5x).
Nothing is asserted.
"""
from __future__ import annotations

import argparse
import hashlib
import secrets
import sys
import time
from pathlib import Path

sys.path.insert(0, str(Path(__file__).resolve().parents[1]))

import grpc  # noqa: E402

from bench.benchlib import compiled_bytecode, fmt_ms, machine, percentile, ratio, require_root, workdir  # noqa: E402
from cvmfs_api.containerd.services.snapshots.v1 import snapshots_pb2 as pb  # noqa: E402
from cvmfs_api.containerd.services.snapshots.v1 import snapshots_pb2_grpc as pb_grpc  # noqa: E402
from tests.fixtures.snapshotter import SnapshotterProcess  # noqa: E402

REF_LABEL = "containerd.io/snapshot.ref"


def chain_id(*parts: object) -> str:
    return "sha256:" + hashlib.sha256("/".join(map(str, parts)).encode()).hexdigest()


def populate(root: Path, count: int, depth: int) -> list[str]:
    """`count` committed snapshots in chains of `depth`, keyed as containerd's metadata
    keys them (`<ns>/<n>/<chainID>`); returns the chain tops."""
    from snapshotter.core import Snapshotter

    sn = Snapshotter(root)
    tops: list[str] = []
    n = 0
    try:
        while n < count:
            parent = ""
            for level in range(min(depth, count - n)):
                chain = chain_id(len(tops), level)
                n += 1
                key = f"default/{n}/extract-{n} {chain}"
                name = f"default/{n}/{chain}"
                sn.prepare(key, parent, {REF_LABEL: chain, "containerd.io/snapshot.unpack": "1"})
                sn.commit(name, key, {REF_LABEL: chain, "containerd.io/gc.root": "x" * 8})
                parent = name
            tops.append(parent)
    finally:
        sn.close()
    return tops


class Side:
    def __init__(self, name: str, base: Path, count: int, depth: int) -> None:
        self.name = name
        t0 = time.monotonic()
        self.process = SnapshotterProcess(base / name, extra_args=["--log-level", "warning"])
        self.tops = populate(self.process.root, count, depth)
        print(f"{name}: {count} snapshots populated in {time.monotonic() - t0:.1f}s", file=sys.stderr)
        self.process.start()
        self.channel = grpc.insecure_channel(f"unix://{self.process.address}")
        self.stub = pb_grpc.SnapshotsStub(self.channel)
        self.samples: list[float] = []
        self.n = 0

    def batch(self, size: int, record: bool = True) -> None:
        for _ in range(size):
            self.n += 1
            parent = self.tops[self.n % len(self.tops)]
            chain = chain_id("new", secrets.token_hex(8))
            key = f"default/x{self.n}/extract-{self.n} {chain}"
            start = time.perf_counter()
            self.stub.Prepare(pb.PrepareSnapshotRequest(key=key, parent=parent, labels={REF_LABEL: chain}))
            elapsed = time.perf_counter() - start
            self.stub.Remove(pb.RemoveSnapshotRequest(key=key))
            if record:
                self.samples.append(elapsed)

    def close(self) -> None:
        self.channel.close()
        self.process.stop()


def main(argv: list[str] | None = None) -> int:
    ap = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    ap.add_argument("--small", type=int, default=100)
    ap.add_argument("--large", type=int, default=10_000)
    ap.add_argument("--depth", type=int, default=10, help="layers per image chain")
    ap.add_argument("--samples", type=int, default=1000, help="timed Prepares per side")
    ap.add_argument("--batch", type=int, default=50, help="Prepares per side before switching")
    ap.add_argument("--keep", action="store_true")
    args = ap.parse_args(argv)
    require_root()
    compiled_bytecode()

    with workdir("bench-ps-", args.keep) as base:
        sides = [Side("small", base, args.small, args.depth), Side("large", base, args.large, args.depth)]
        try:
            for side in sides:
                side.batch(20, record=False)  # warm-up: connection, sqlite cache
            while any(len(s.samples) < args.samples for s in sides):
                for side in sides:
                    side.batch(min(args.batch, args.samples - len(side.samples)))
        finally:
            for side in sides:
                side.close()
    small, large = sides
    print(f"\n{'existing snapshots':>20} {'Prepare p50':>12} {'p99':>8}   (ms, {args.samples} samples each)")
    for side, count in ((small, args.small), (large, args.large)):
        print(f"{count:20d} {fmt_ms(percentile(side.samples, 50)):>12} {fmt_ms(percentile(side.samples, 99))}")
    print(f"\nmachine: {machine()}")
    print(f"Prepare with {args.large} / with {args.small} existing snapshots (target p99 <= 1.5x):")
    print(f"  p50 {ratio(percentile(large.samples, 50), percentile(small.samples, 50))}"
          f"   p99 {ratio(percentile(large.samples, 99), percentile(small.samples, 99))}")
    return 0


if __name__ == "__main__":
    sys.exit(main())

#!/usr/bin/env python3
"""Idle memory of cvmfs-snapshotter vs a bare grpcio server (a minimal Python gRPC
server on a unix socket with no services), measured in the same run.

    sudo .venv/bin/python bench/memory_bench.py
    sudo .venv/bin/python bench/memory_bench.py --rpcs 5000

RSS (VmRSS) of each process: right after it answers on its socket and has settled
(--settle seconds), and for the snapshotter also idle after a load of --rpcs snapshot
RPCs (Prepare/Commit/Stat/List/Remove over direct gRPC, 100-layer chains) — memory a
long-running node daemon keeps. Prints the ratios LAST (target: idle snapshotter
<= 55 MB; the bare server is the floor any Python gRPC server pays).
Nothing is asserted.
"""
from __future__ import annotations

import argparse
import hashlib
import subprocess
import sys
import time
from pathlib import Path

sys.path.insert(0, str(Path(__file__).resolve().parents[1]))

import grpc  # noqa: E402

from bench.benchlib import compiled_bytecode, machine, pss_kib, rss_kib, workdir  # noqa: E402
from cvmfs_api.containerd.services.snapshots.v1 import snapshots_pb2 as pb  # noqa: E402
from cvmfs_api.containerd.services.snapshots.v1 import snapshots_pb2_grpc as pb_grpc  # noqa: E402
from tests.fixtures._proc import terminate  # noqa: E402
from tests.fixtures.polling import wait_until  # noqa: E402
from tests.fixtures.snapshotter import SnapshotterProcess, unix_socket_answers  # noqa: E402

# The baseline: what `import grpc` + a started server with the same executor costs.
BARE_SERVER = """
import sys, threading
from concurrent import futures
import grpc
server = grpc.server(futures.ThreadPoolExecutor(max_workers=16))
server.add_insecure_port("unix:" + sys.argv[1])
server.start()
threading.Event().wait()
"""


def load(address: Path, rpcs: int) -> None:
    """Unpacker-shaped RPCs straight to the snapshotter's socket."""
    with grpc.insecure_channel(f"unix://{address}") as channel:
        stub = pb_grpc.SnapshotsStub(channel)
        done, image = 0, 0
        while done < rpcs:
            image += 1
            parent, names = "", []
            for layer in range(100):
                chain = "sha256:" + hashlib.sha256(f"{image}/{layer}".encode()).hexdigest()
                key, name = f"m/{image}/extract {chain}", f"m/{image}/{chain}"
                labels = {"containerd.io/snapshot.ref": chain}
                stub.Prepare(pb.PrepareSnapshotRequest(key=key, parent=parent, labels=labels))
                stub.Commit(pb.CommitSnapshotRequest(name=name, key=key, labels=labels))
                stub.Stat(pb.StatSnapshotRequest(key=name))
                parent = name
                names.append(name)
                done += 3
            done += sum(1 for _ in stub.List(pb.ListSnapshotsRequest()))
            for name in reversed(names):
                stub.Remove(pb.RemoveSnapshotRequest(key=name))
                done += 1


def measure(pid: int, settle: float) -> tuple[int, int]:
    time.sleep(settle)
    return rss_kib(pid), pss_kib(pid)


def main(argv: list[str] | None = None) -> int:
    ap = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    ap.add_argument("--settle", type=float, default=3.0, help="seconds to wait before reading memory")
    ap.add_argument("--rpcs", type=int, default=2000, help="RPCs of load before the second idle reading")
    ap.add_argument("--keep", action="store_true")
    args = ap.parse_args(argv)
    compiled_bytecode()

    with workdir("bench-mem-", args.keep) as base:
        sock = base / "bare.sock"
        bare = subprocess.Popen([sys.executable, "-c", BARE_SERVER, str(sock)], stdin=subprocess.DEVNULL)
        try:
            wait_until(lambda: unix_socket_answers(sock), 30, "bare grpc server", bare)
            bare_rss, bare_pss = measure(bare.pid, args.settle)
        finally:
            terminate(bare)
        repo = base / "repo"
        repo.mkdir()
        sn = SnapshotterProcess(base / "sn", repositories=[repo], extra_args=["--log-level", "info"]).start()
        try:
            idle_rss, idle_pss = measure(sn.pid, args.settle)
            load(sn.address, args.rpcs)
            loaded_rss, loaded_pss = measure(sn.pid, args.settle)
        finally:
            sn.stop()

    mb = 1024
    print(f"\n{'process':40} {'RSS MB':>8} {'PSS MB':>8}")
    print(f"{'bare grpcio server':40} {bare_rss / mb:8.1f} {bare_pss / mb:8.1f}")
    print(f"{'cvmfs-snapshotter, idle after start':40} {idle_rss / mb:8.1f} {idle_pss / mb:8.1f}")
    print(f"{f'cvmfs-snapshotter, idle after {args.rpcs} RPCs':40} {loaded_rss / mb:8.1f} {loaded_pss / mb:8.1f}")
    print(f"\nmachine: {machine()}")
    print(f"idle snapshotter RSS: {idle_rss / mb:.1f} MB after start, {loaded_rss / mb:.1f} MB after load "
          f"(target <= 55 MB)")
    print(f"ratio to the bare grpcio server: {idle_rss / bare_rss:.2f}x after start, "
          f"{loaded_rss / bare_rss:.2f}x after load")
    return 0


if __name__ == "__main__":
    sys.exit(main())

#!/usr/bin/env python3
"""Snapshot RPC load shaped like containerd's unpacker, through containerd's snapshots API:
snapshotter=overlayfs (containerd's built-in) vs snapshotter=cvmfs-snapshotter (our proxy).

    sudo .venv/bin/python bench/rpc_bench.py                  # 200 layers x 3 rounds
    sudo .venv/bin/python bench/rpc_bench.py --layers 50 --rounds 1

Each side has a containerd of its own. Per layer: Prepare (key `extract-<unique> <chainID>`,
parent = the previous chainID, label containerd.io/snapshot.ref) → Mounts → write
--files small files into the upper dir (not timed) → Commit (name = chainID) → Stat; then
--lists List calls over all; then Remove all, top first. Each round holds a lease (as the
unpacker does) and deletes it with sync=True, so containerd's GC has removed the backend's
snapshots before the next round starts; rounds alternate sides.

The fair baseline (skip with --no-overlay-proxy) is containerd's own overlayfs snapshotter
served as a proxy plugin (bench/overlayproxy/main.go: overlay.NewSnapshotter +
snapshotservice.FromSnapshotter on a unix socket, built offline in GOPATH mode from
Debian's golang-github-containerd-containerd-dev and cached under bench/out/): the same
code as snapshotter=overlayfs, paying the same containerd -> socket -> gRPC hop as ours.
A fourth side (skip with --no-null) is bench/nullsnapshotter.py behind its own containerd:
a Python snapshots server doing nothing but dict updates. It separates the cost of the
proxy hop itself (containerd → unix socket → grpcio) from our own work. Our snapshotter
gets an (empty) repository, so every Prepare also runs its repository lookup, as on a
node where the repository is mounted but lacks the layer.
`--syscalls` runs `strace -c -f` on each proxy backend over the timed rounds and prints
its syscalls per layer (fsyncs, directory operations, futex handoffs); the times of such
a run are distorted, only the counts are meant.
Prints p50/p99 per method and, LAST, the ratios (targets: cvmfs / overlay-proxy <= 0.8x;
cvmfs / built-in overlayfs <= 1.0x), then each side's best round (all RPCs of one image
of --layers layers, best of --rounds, as "best of 3" measures an unpacker; `--lists 1`
for the one List an unpack is followed by).
Nothing is asserted.
"""
from __future__ import annotations

import argparse
import hashlib
import os
import secrets
import subprocess
import sys
import time
from collections import defaultdict
from pathlib import Path
from typing import Callable

sys.path.insert(0, str(Path(__file__).resolve().parents[1]))

import grpc  # noqa: E402

from bench.benchlib import OUT, compiled_bytecode, fmt_ms, machine, percentile, ratio, require_root, workdir  # noqa: E402
from cvmfs_api.containerd.services.leases.v1 import leases_pb2, leases_pb2_grpc  # noqa: E402
from cvmfs_api.containerd.services.snapshots.v1 import snapshots_pb2 as pb  # noqa: E402
from cvmfs_api.containerd.services.snapshots.v1 import snapshots_pb2_grpc as pb_grpc  # noqa: E402
from tests.fixtures.containerd import Containerd  # noqa: E402
from tests.fixtures._proc import terminate  # noqa: E402
from tests.fixtures.polling import wait_until  # noqa: E402
from tests.fixtures.snapshotter import SnapshotterProcess, unix_socket_answers  # noqa: E402

METHODS = ("Prepare", "Mounts", "Commit", "Stat", "List", "Remove")
REF_LABEL = "containerd.io/snapshot.ref"
NAMESPACE = "bench"
Samples = dict[str, list[float]]


def free_port() -> int:
    import socket

    with socket.socket() as s:
        s.bind(("127.0.0.1", 0))
        return s.getsockname()[1]


def chain_ids(n: int, seed: str) -> list[str]:
    return ["sha256:" + hashlib.sha256(f"{seed}/{i}".encode()).hexdigest() for i in range(n)]


def upper_dir(mounts) -> str:
    """Where the unpacker would write: the bind source or the overlay upperdir."""
    m = mounts[0]
    if m.type == "bind":
        return m.source
    return next(o.split("=", 1)[1] for o in m.options if o.startswith("upperdir="))


class Client:
    """The same Python client for both sides: containerd's socket, `snapshotter` set."""

    def __init__(self, address: Path, snapshotter: str) -> None:
        self.channel = grpc.insecure_channel(f"unix://{address}")
        self.stub = pb_grpc.SnapshotsStub(self.channel)
        self.leases = leases_pb2_grpc.LeasesStub(self.channel)
        self.snapshotter = snapshotter

    def close(self) -> None:
        self.channel.close()

    def timed(self, samples: Samples, method: str, call: Callable[[], object]) -> object:
        start = time.perf_counter()
        out = call()
        samples[method].append(time.perf_counter() - start)
        return out

    def round(self, samples: Samples, layers: int, files: int, lists: int) -> None:
        """One image's worth of layers under a lease, as the unpacker holds one (without
        it, containerd's GC collects unreferenced snapshots while we work)."""
        lease = f"bench-{secrets.token_hex(6)}"
        ns = (("containerd-namespace", NAMESPACE),)
        self.leases.Create(leases_pb2.CreateRequest(id=lease), metadata=ns)
        try:
            self._round(samples, layers, files, lists, ns + (("containerd-lease", lease),))
        finally:
            # sync: containerd's GC removes the backend's snapshots before this returns,
            # so the next round does not share the CPU with it.
            self.leases.Delete(leases_pb2.DeleteRequest(id=lease, sync=True), metadata=ns)

    def _round(self, samples: Samples, layers: int, files: int, lists: int, md: tuple) -> None:
        s = self.snapshotter
        chains = chain_ids(layers, secrets.token_hex(8))
        parent = ""
        for chain in chains:
            key = f"extract-{time.time_ns()}-{secrets.token_urlsafe(6)} {chain}"
            self.timed(samples, "Prepare", lambda: self.stub.Prepare(
                pb.PrepareSnapshotRequest(snapshotter=s, key=key, parent=parent, labels={REF_LABEL: chain}),
                metadata=md))
            resp = self.timed(samples, "Mounts", lambda: self.stub.Mounts(
                pb.MountsRequest(snapshotter=s, key=key), metadata=md))
            upper = upper_dir(resp.mounts)
            for i in range(files):
                with open(os.path.join(upper, f"f{i}"), "wb") as f:
                    f.write(b"x" * 100)
            self.timed(samples, "Commit", lambda: self.stub.Commit(
                pb.CommitSnapshotRequest(snapshotter=s, name=chain, key=key, labels={REF_LABEL: chain}),
                metadata=md))
            self.timed(samples, "Stat", lambda: self.stub.Stat(
                pb.StatSnapshotRequest(snapshotter=s, key=chain), metadata=md))
            parent = chain
        for _ in range(lists):
            n = self.timed(samples, "List", lambda: sum(len(r.info) for r in self.stub.List(
                pb.ListSnapshotsRequest(snapshotter=s), metadata=md)))
            assert n == layers, f"List gave {n} snapshots, expected {layers}"
        for chain in reversed(chains):
            self.timed(samples, "Remove", lambda: self.stub.Remove(
                pb.RemoveSnapshotRequest(snapshotter=s, key=chain), metadata=md))


OVERLAY_PROXY_SRC = Path(__file__).resolve().parent / "overlayproxy" / "main.go"
GOCODE = Path("/usr/share/gocode")


def build_overlay_proxy() -> Path:
    """bench/overlayproxy built once per source and Go version (GOPATH mode, offline,
    like tests/containerd_testsuite)."""
    go = subprocess.run(["go", "version"], capture_output=True, text=True, check=True).stdout
    key = hashlib.sha256(OVERLAY_PROXY_SRC.read_bytes() + go.encode()).hexdigest()[:12]
    build = OUT / "overlayproxy"
    binary = build / f"overlayproxy-{key}"
    if binary.exists():
        return binary
    pkg = build / "gopath" / "src" / "overlayproxy"
    pkg.mkdir(parents=True, exist_ok=True)
    (pkg / "main.go").write_bytes(OVERLAY_PROXY_SRC.read_bytes())
    env = {**os.environ, "GO111MODULE": "off", "GOPATH": f"{build / 'gopath'}:{GOCODE}",
           "GOCACHE": str(build / "gocache"), "GOFLAGS": ""}
    print("building bench/overlayproxy (once)", file=sys.stderr)
    subprocess.run(["go", "build", "-o", str(binary), "."], cwd=pkg, env=env, check=True)
    return binary


def handler_seconds(metrics_port: int) -> dict[str, tuple[float, float]]:
    """(count, sum of seconds) per method from the snapshotter's own RPC histogram: the
    time inside our handlers, without containerd, the socket and grpcio's dispatch."""
    import urllib.request

    text = urllib.request.urlopen(f"http://127.0.0.1:{metrics_port}/metrics", timeout=10).read().decode()
    out: dict[str, list[float]] = defaultdict(lambda: [0.0, 0.0])
    for line in text.splitlines():
        for suffix, i in (("_count{", 0), ("_sum{", 1)):
            if line.startswith("cvmfs_snapshotter_rpc_seconds" + suffix):
                method = line.split('method="', 1)[1].split('"', 1)[0]
                out[method][i] += float(line.rsplit(" ", 1)[1])
    return {m: (c, t) for m, (c, t) in out.items()}


def cpu_seconds(pid: int | None) -> float:
    """user + system CPU of a live process (all its threads)."""
    if pid is None:
        return float("nan")
    fields = Path(f"/proc/{pid}/stat").read_text().rsplit(")", 1)[1].split()
    return (int(fields[11]) + int(fields[12])) / os.sysconf("SC_CLK_TCK")


SYSCALLS = ("fdatasync", "fsync", "mkdir", "mkdirat", "rename", "renameat", "symlink", "symlinkat", "unlinkat",
            "openat", "getdents64", "newfstatat", "pwrite64", "futex", "total")


def start_strace(base: Path, pids: dict[str, int | None]) -> dict[str, tuple[subprocess.Popen, Path]]:
    tracers = {}
    for name, pid in pids.items():
        if pid is not None:
            out = base / f"strace-{name}.txt"
            tracers[name] = (subprocess.Popen(["strace", "-c", "-f", "-o", str(out), "-p", str(pid)],
                                              stderr=subprocess.DEVNULL), out)
    time.sleep(2)  # attached to every thread before the rounds start
    return tracers


def stop_strace(tracers: dict[str, tuple[subprocess.Popen, Path]]) -> dict[str, dict[str, int]]:
    """{backend: {syscall: calls}} from strace -c's table."""
    import signal

    counts: dict[str, dict[str, int]] = {}
    for name, (proc, out) in tracers.items():
        proc.send_signal(signal.SIGINT)
        proc.wait(60)
        calls: dict[str, int] = {}
        for line in out.read_text().splitlines():
            f = line.split()
            if len(f) >= 5 and f[0][0].isdigit() and f[3].isdigit():
                calls[f[-1]] = int(f[3])
        counts[name] = calls
    return counts


def report_syscalls(counts: dict[str, dict[str, int]], layers: int) -> None:
    """Per layer: its Prepare, Mounts, Commit, Stat, Remove and its share of the Lists."""
    print(f"\nsyscalls per layer ({layers} layers; strace -c -f of each backend over the timed rounds):")
    print(f"{'syscall':12}" + "".join(f"{name:>15}" for name in counts))
    for sc in SYSCALLS:
        if any(sc in c for c in counts.values()):
            print(f"{sc:12}" + "".join(f"{c.get(sc, 0) / layers:15.1f}" for c in counts.values()))


def overlay_backend_count(cd: Containerd) -> int:
    snaps = cd.root / "io.containerd.snapshotter.v1.overlayfs" / "snapshots"
    return len(list(snaps.iterdir())) if snaps.exists() else 0


def report(samples: dict[str, Samples], round_totals: dict[str, list[float]]) -> None:
    sides = list(samples)
    head = " | ".join(f"{side + ' p50':>14} {'p99':>8}" for side in sides)
    print(f"\n{'method':8} {'n':>5} | {head}   (ms)")
    for m in METHODS:
        cells = " | ".join(f"{fmt_ms(percentile(samples[side][m], 50)):>14} {fmt_ms(percentile(samples[side][m], 99))}"
                           for side in sides)
        print(f"{m:8} {len(samples['cvmfs'][m]):5} | {cells}")
    totals = {side: sum(sum(v) for v in samples[side].values()) for side in sides}
    print("total RPC time: " + ", ".join(f"{side} {t:.2f}s" for side, t in totals.items()))
    print("per method, total s: " + "; ".join(
        f"{m} " + " ".join(f"{side} {sum(samples[side][m]):.2f}" for side in sides) for m in METHODS))
    print(f"\nmachine: {machine()}")
    pairs = [("cvmfs", "overlayfs", "cvmfs-snapshotter / built-in overlayfs (target <= 1.0x)")]
    if "null-proxy" in samples:
        pairs = [("null-proxy", "overlayfs", "null Python proxy / overlayfs (the proxy hop alone)"),
                 ("cvmfs", "null-proxy", "cvmfs-snapshotter / null Python proxy (our own work)")] + pairs
    if "overlay-proxy" in samples:
        pairs += [("overlay-proxy", "overlayfs", "overlayfs as a Go proxy plugin / built-in overlayfs (the hop)"),
                  ("cvmfs", "overlay-proxy", "cvmfs-snapshotter / overlayfs as a Go proxy plugin (target <= 0.8x)")]
    for a, b, title in pairs:
        print(f"ratios {title}:")
        for m in METHODS:
            print(f"  {m:8} p50 {ratio(percentile(samples[a][m], 50), percentile(samples[b][m], 50)):>6}"
                  f"   p99 {ratio(percentile(samples[a][m], 99), percentile(samples[b][m], 99)):>6}")
        print(f"  {'all':8} total {ratio(totals[a], totals[b])}")
    best = {side: min(t) for side, t in round_totals.items()}
    print(f"best round of {len(round_totals['cvmfs'])} (all RPCs of one round): "
          + ", ".join(f"{side} {t:.2f}s" for side, t in best.items()))
    for a, b in (("null-proxy", "overlay-proxy"), ("cvmfs", "overlay-proxy")):
        if a in best and b in best:
            print(f"ratio best round {a} / {b}: {ratio(best[a], best[b])}")


def main(argv: list[str] | None = None) -> int:
    ap = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    ap.add_argument("--layers", type=int, default=200)
    ap.add_argument("--rounds", type=int, default=3, help="rounds per side, alternating")
    ap.add_argument("--files", type=int, default=10, help="small files written per layer (not timed)")
    ap.add_argument("--lists", type=int, default=10, help="List calls per round")
    ap.add_argument("--no-null", action="store_true", help="skip the null Python proxy (the hop floor)")
    ap.add_argument("--no-overlay-proxy", action="store_true",
                    help="skip containerd's overlayfs snapshotter served as a Go proxy plugin")
    ap.add_argument("--log-level", default="info", help="the snapshotter's --log-level")
    ap.add_argument("--syscalls", action="store_true",
                    help="count each proxy backend's syscalls (strace -c -f) over the timed rounds")
    ap.add_argument("--keep", action="store_true")
    args = ap.parse_args(argv)
    require_root()
    compiled_bytecode()

    with workdir("bench-rpc-", args.keep) as base:
        repo = base / "repo"  # a mounted repository that has none of these layers: lookups miss
        repo.mkdir()
        metrics_port = free_port()
        sn = SnapshotterProcess(base / "sn", repositories=[repo], extra_args=[
            "--log-level", args.log_level, "--metrics-address", f"127.0.0.1:{metrics_port}"])
        sn.start()
        daemons: list = [sn]
        null = goproxy = None
        try:
            cds = {"overlayfs": Containerd(base / "cd-o", base / "no-proxy.sock", log_level="warn")}
            if not args.no_overlay_proxy:
                goproxy = subprocess.Popen([str(build_overlay_proxy()), "-root", str(base / "op-root"),
                                            "-address", str(base / "op.sock")])
                wait_until(lambda: unix_socket_answers(base / "op.sock"), 30, "overlay proxy", goproxy)
                cds["overlay-proxy"] = Containerd(base / "cd-p", base / "op.sock", log_level="warn")
            if not args.no_null:
                null = subprocess.Popen([sys.executable, str(Path(__file__).with_name("nullsnapshotter.py")),
                                         str(base / "null.sock"), str(base / "null-scratch")])
                wait_until(lambda: unix_socket_answers(base / "null.sock"), 30, "null proxy", null)
                cds["null-proxy"] = Containerd(base / "cd-n", base / "null.sock", log_level="warn")
            cds["cvmfs"] = Containerd(base / "cd-c", sn.address, log_level="warn")
            for cd in cds.values():
                daemons.append(cd.start())
            clients = {name: Client(cd.address, "overlayfs" if name == "overlayfs" else "cvmfs-snapshotter")
                       for name, cd in cds.items()}
            samples: dict[str, Samples] = {k: defaultdict(list) for k in clients}
            round_totals: dict[str, list[float]] = {k: [] for k in clients}
            # A short warm-up round each (connections, containerd's lazy proxy dial), not counted.
            for client in clients.values():
                client.round(defaultdict(list), 2, 0, 1)
            pids = {"overlay-proxy": goproxy.pid if goproxy else None, "null-proxy": null.pid if null else None,
                    "cvmfs": sn.pid}
            tracers = start_strace(base, pids) if args.syscalls else {}
            for r in range(args.rounds):
                for name, client in clients.items():
                    start = time.monotonic()
                    before = sum(sum(v) for v in samples[name].values())
                    client.round(samples[name], args.layers, args.files, args.lists)
                    round_totals[name].append(sum(sum(v) for v in samples[name].values()) - before)
                    print(f"round {r + 1} {name}: {time.monotonic() - start:.1f}s", file=sys.stderr)
            syscalls = stop_strace(tracers)
            left = {"overlayfs": overlay_backend_count(cds["overlayfs"]), "cvmfs": len(sn.list_snapshots())}
            if any(left.values()):
                print(f"warning: snapshots left in the backends after GC: {left}", file=sys.stderr)
            for c in clients.values():
                c.close()
            handlers = handler_seconds(metrics_port)
            # CPU of each proxy backend over the whole run (warm-up and GC's removals included)
            backend_cpu = {"overlay-proxy": cpu_seconds(goproxy.pid if goproxy else None),
                           "null-proxy": cpu_seconds(null.pid if null else None), "cvmfs": cpu_seconds(sn.pid)}
        finally:
            for d in reversed(daemons):
                d.stop()
            terminate(null)
            terminate(goproxy)
    report(samples, round_totals)
    if args.syscalls:
        report_syscalls(syscalls, args.layers * args.rounds)
    print("CPU seconds of each proxy backend process over the run: "
          + ", ".join(f"{k} {v:.2f}" for k, v in backend_cpu.items() if v == v))
    print("inside cvmfs-snapshotter's handlers (its rpc_seconds histogram, warm-up included), mean ms: "
          + ", ".join(f"{m} {1000 * t / c:.3f} ({c:.0f})" for m, (c, t) in sorted(handlers.items()) if c))
    return 0


if __name__ == "__main__":
    sys.exit(main())

#!/usr/bin/env python3
"""Peak memory of `cvmfs-publisher convert-image` while it ingests a big layer.

    sudo .venv/bin/python bench/publisher_memory_bench.py                 # 500 MB layer, ~1 min (+ build)
    sudo .venv/bin/python bench/publisher_memory_bench.py --size-mb 2048  # the issue's 2 GB layer
    sudo .venv/bin/python bench/publisher_memory_bench.py --no-parallel

Images are generated from a fixed seed (bench/publib.py) and pushed once into a loopback
docker-registry whose storage is cached under bench/out/ingest-*/ (shared with
ingest_bench.py). Each run converts into a fresh repository on a fresh loop-mounted ext4
(publib.scratch_fs).

Measured: the peak RSS of the convert-image process itself (ru_maxrss from wait4(2) on it,
so nothing else counts), and VmRSS polled every 20 ms while it runs (to see when the peak
happens). Sides:
  one layer        an image of one --size-mb layer, default --jobs
  N layers -jN     an image of --layers layers of --size-mb / N each, --jobs N (parallel
                   ingests, each with its own read-ahead buffers); skip with --no-parallel
Baseline in the same run: the RSS of a Python process that has imported everything
convert-image imports (the interpreter + modules floor).

Prints peak RSS and the ratio to the baseline LAST (target: peak <= 150 MB while
ingesting a 2 GB layer). Nothing is asserted.
"""
from __future__ import annotations

import argparse
import subprocess
import sys
import time
from pathlib import Path

sys.path.insert(0, str(Path(__file__).resolve().parents[1]))

from bench.benchlib import OUT, compiled_bytecode, machine  # noqa: E402
from bench.publib import CachedRegistry, RssPoller, generated_image, median, publisher_cmd, remove, scratch_fs  # noqa: E402

MiB = 1 << 20
BASELINE = """
import resource, sys
import publisher.cli, publisher.sync.convert, publisher.write.image, publisher.unpack.ingest, publisher.unpack.unpack
import publisher.write.chains, publisher.write.podman_store
for line in open("/proc/self/status"):
    if line.startswith("VmRSS:"):
        print(int(line.split()[1]))
"""


def run_side(host: str, name: str, fs: Path, jobs: int) -> dict:
    """Run convert-image in a fresh child of a fresh Python, so RUSAGE_CHILDREN of that
    wrapper is exactly the convert process."""
    root, state = fs / "repo", fs / "state.db"
    remove(root)
    state.unlink(missing_ok=True)
    wrapper = (
        "import resource, subprocess, sys, time\n"
        "t = time.perf_counter()\n"
        "subprocess.run(sys.argv[1:], check=True, stdout=subprocess.DEVNULL)\n"
        "print(time.perf_counter() - t, resource.getrusage(resource.RUSAGE_CHILDREN).ru_maxrss)\n")
    cmd = publisher_cmd("convert-image", f"{host}/{name}:v1", "--repository-root", str(root), "--state-db",
                        str(state), "--jobs", str(jobs), "--log-level", "warning")
    proc = subprocess.Popen([sys.executable, "-c", wrapper, *cmd], stdout=subprocess.PIPE, text=True)
    t0 = time.perf_counter()
    poller: RssPoller | None = None
    peak_at, last = 0.0, 0
    try:
        while proc.poll() is None:
            if poller is None:  # watch the grandchild: the convert process
                try:
                    kids = Path(f"/proc/{proc.pid}/task/{proc.pid}/children").read_text().split()
                except OSError:
                    kids = []
                if kids:
                    poller = RssPoller(int(kids[0])).__enter__()
            elif poller.peak_kib > last:
                last, peak_at = poller.peak_kib, time.perf_counter() - t0
            time.sleep(0.02)
    finally:
        if poller is not None:
            poller.__exit__()
    out = proc.stdout.read() if proc.stdout else ""
    if proc.returncode != 0:
        raise RuntimeError("convert-image failed")
    seconds, maxrss = out.split()
    remove(root)
    state.unlink(missing_ok=True)
    return {"seconds": float(seconds), "maxrss_kib": int(maxrss),
            "polled_kib": poller.peak_kib if poller else 0, "peak_at": peak_at}


def main() -> int:
    ap = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    ap.add_argument("--size-mb", type=int, default=500, help="file data of the big layer (default 500; issue: 2048)")
    ap.add_argument("--layers", type=int, default=4, help="layers of the parallel side (default 4)")
    ap.add_argument("--jobs", type=int, default=4, help="--jobs of the one-layer side (publisher default 4)")
    ap.add_argument("--repeat", type=int, default=2)
    ap.add_argument("--seed", type=int, default=1)
    ap.add_argument("--no-parallel", action="store_true")
    ap.add_argument("--scratch-dir", type=Path, help="write here instead of a fresh loop-mounted ext4")
    args = ap.parse_args()
    compiled_bytecode()

    cache = OUT / f"ingest-s{args.seed}"
    base = int(subprocess.run([sys.executable, "-c", BASELINE], check=True, capture_output=True,
                              text=True).stdout.split()[-1])
    results: dict[str, list[dict]] = {}
    with CachedRegistry(cache) as reg, scratch_fs(4 + 2.5 * args.size_mb / 1024, args.scratch_dir) as fs:
        one = generated_image(cache, f"bench/ingest-one-{args.size_mb}m", [args.size_mb * MiB], args.seed)
        reg.push_layout(cache / "layout", one.name.replace("/", "-"), one.name, one.tag)
        sides = {"one layer": (one, args.jobs)}
        if not args.no_parallel:
            n = args.layers
            multi = generated_image(cache, f"bench/ingest-{n}x{args.size_mb // n}m",
                                    [args.size_mb // n * MiB] * n, args.seed + 1)
            reg.push_layout(cache / "layout", multi.name.replace("/", "-"), multi.name, multi.tag)
            sides[f"{n} layers -j{n}"] = (multi, n)
        for r in range(args.repeat):
            for label, (img, jobs) in sides.items():
                res = run_side(reg.host, img.name, fs, jobs)
                results.setdefault(label, []).append(res)
                print(f"  round {r + 1} {label:14} {res['seconds']:6.1f}s  maxrss {res['maxrss_kib'] / 1024:6.1f} MiB"
                      f"  polled peak {res['polled_kib'] / 1024:6.1f} MiB at {res['peak_at']:.1f}s",
                      file=sys.stderr, flush=True)

    print(f"\nmachine: {machine()}")
    print(f"baseline: Python with convert-image's modules imported: {base / 1024:.1f} MiB RSS")
    print(f"{'side':16} {'image':>28} {'seconds':>8} {'peak RSS MiB':>13} {'MB':>6} {'vs baseline':>11}")
    worst = 0
    for label, rs in results.items():
        img = sides[label][0]
        peak = max(r["maxrss_kib"] for r in rs)
        worst = max(worst, peak)
        desc = f"{len(img.layers)}x{img.layers[0].size / 1e6:.0f} MB gzip, {img.files} files"
        print(f"{label:16} {desc:>28} {median([r['seconds'] for r in rs]):8.1f} {peak / 1024:13.1f} "
              f"{peak * 1024 / 1e6:6.1f} {peak / base:10.2f}x")
    print(f"\npeak RSS of convert-image ingesting a {one.blob_bytes / 1e6:.0f} MB gzip layer "
          f"({one.data_bytes / 1e6:.0f} MB of files): {max(r['maxrss_kib'] for r in results['one layer']) * 1024 / 1e6:.1f} MB"
          f"  (target <= 150 MB)")
    print(f"worst side: {worst * 1024 / 1e6:.1f} MB = {worst / base:.2f}x the import-only baseline")
    return 0


if __name__ == "__main__":
    sys.exit(main())

#!/usr/bin/env python3
"""Layer unpack speed: publisher.unpack vs `tar -xzf` of the same blob, in the same run.

    python bench/unpack_bench.py                 # ~200 MB of generated files (fixed seed)
    python bench/unpack_bench.py --size-mb 50 --repeat 5
    python bench/unpack_bench.py --blob layer.tar.gz

Both sides end with sync(2) so the page cache flush is paid by both. Both write to a fresh
loop-mounted ext4 (bench/publib.py scratch_fs; --dir to write elsewhere). The publisher's
whole ingest path (download, layer dir) is measured by ingest_bench.py. Prints the time
ratio ours/tar (median of --repeat runs) and our peak RSS (measured in a child process, so
blob generation does not count). Nothing is asserted: numbers depend on the machine.
"""
from __future__ import annotations

import argparse
import gzip
import hashlib
import io
import json
import os
import random
import shutil
import statistics
import subprocess
import sys
import tarfile
import tempfile
import time
from pathlib import Path

REPO = Path(__file__).resolve().parent.parent
WORDS = ("layer container image overlay whiteout chain digest manifest registry publish "
         "snapshot mount tarball gzip repository stratum catalog kernel inode xattr").split()


def generate(path: Path, size_mb: int, seed: int) -> tuple[int, int]:
    """A gzip layer of mixed files: many small, some medium, a few large; half random
    bytes, half compressible text. Returns (files, uncompressed bytes of file data)."""
    rng = random.Random(seed)
    text = " ".join(rng.choice(WORDS) for _ in range(400_000)).encode()
    target = size_mb << 20
    total = files = 0
    with path.open("wb") as raw, gzip.GzipFile(fileobj=raw, mode="wb", compresslevel=6, mtime=0) as gz, \
            tarfile.open(fileobj=gz, mode="w|", format=tarfile.PAX_FORMAT) as tf:
        dirs = [""]
        while total < target:
            if files % 40 == 0:
                parent = rng.choice(dirs)
                d = f"{parent}/d{len(dirs)}".lstrip("/")
                ti = tarfile.TarInfo(d)
                ti.type, ti.mode, ti.mtime = tarfile.DIRTYPE, 0o755, 1_700_000_000
                tf.addfile(ti)
                dirs.append(d)
            roll = rng.random()
            size = (rng.randint(0, 8 << 10) if roll < 0.70 else
                    rng.randint(8 << 10, 256 << 10) if roll < 0.97 else
                    rng.randint(256 << 10, 8 << 20))
            if rng.random() < 0.5:
                data = rng.randbytes(size)
            else:
                start = rng.randint(0, len(text) - size - 1) if size < len(text) else 0
                data = text[start:start + size]
            ti = tarfile.TarInfo(f"{rng.choice(dirs)}/f{files}".lstrip("/"))
            ti.size, ti.mode, ti.mtime = len(data), rng.choice((0o644, 0o755, 0o600)), 1_700_000_000
            ti.uid = ti.gid = rng.choice((0, 0, 1000))
            tf.addfile(ti, io.BytesIO(data))
            files += 1
            total += len(data)
    return files, total


def run_ours(blob: Path, dest: Path) -> None:
    """Child-process side: unpack, sync, report time and peak RSS as JSON."""
    sys.path.insert(0, str(REPO))
    from publisher.unpack.unpack import unpack_layer
    digest = "sha256:" + _sha256(blob)
    start = time.perf_counter()
    with blob.open("rb") as f:
        result = unpack_layer(f, dest, digest=digest)
    os.sync()
    seconds = time.perf_counter() - start
    # VmHWM, not ru_maxrss: that would include this bench's own RSS at fork (Linux keeps it
    # across exec), i.e. the blob generator's buffers
    hwm = next(int(l.split()[1]) for l in Path("/proc/self/status").read_text().splitlines()
               if l.startswith("VmHWM:"))
    print(json.dumps({"seconds": seconds, "maxrss_kb": hwm,
                      "entries": result.entries, "diff_size": result.diff_size}))


def _sha256(path: Path) -> str:
    h = hashlib.sha256()
    with path.open("rb") as f:
        while chunk := f.read(1 << 20):
            h.update(chunk)
    return h.hexdigest()


def time_ours(blob: Path, dest: Path) -> dict:
    out = subprocess.run([sys.executable, __file__, "--run-ours", str(blob), str(dest)],
                         check=True, capture_output=True, text=True).stdout
    return json.loads(out.strip().splitlines()[-1])


def time_tar(blob: Path, dest: Path) -> float:
    dest.mkdir()
    start = time.perf_counter()
    subprocess.run(["tar", "-xzf", str(blob), "-C", str(dest)], check=True)
    os.sync()
    return time.perf_counter() - start


def main() -> int:
    ap = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    ap.add_argument("--size-mb", type=int, default=200, help="file data to generate (default 200)")
    ap.add_argument("--seed", type=int, default=1)
    ap.add_argument("--blob", type=Path, help="use this gzip layer instead of generating one")
    ap.add_argument("--repeat", type=int, default=3)
    ap.add_argument("--dir", type=Path, default=None,
                    help="scratch dir (default: a fresh loop-mounted ext4, bench/publib.py)")
    ap.add_argument("--run-ours", nargs=2, metavar=("BLOB", "DEST"), help=argparse.SUPPRESS)
    args = ap.parse_args()
    if args.run_ours:
        run_ours(Path(args.run_ours[0]), Path(args.run_ours[1]))
        return 0

    sys.path.insert(0, str(REPO))
    from bench.publib import scratch_fs  # a fresh ext4: see publib.scratch_fs for why

    with scratch_fs(2 + 3 * args.size_mb / 1024, args.dir) as fs:
        return _main(args, Path(tempfile.mkdtemp(prefix="unpack-bench-", dir=fs)))


def _main(args: argparse.Namespace, scratch: Path) -> int:
    try:
        blob = args.blob
        if blob is None:
            blob = scratch / "layer.tar.gz"
            t0 = time.perf_counter()
            files, data = generate(blob, args.size_mb, args.seed)
            print(f"generated {files} files, {data / 2**20:.0f} MiB of data, "
                  f"blob {blob.stat().st_size / 2**20:.0f} MiB in {time.perf_counter() - t0:.1f}s")
        ours: list[float] = []
        tars: list[float] = []
        rss = 0
        for i in range(args.repeat):
            for side in (("ours", "tar") if i % 2 == 0 else ("tar", "ours")):
                dest = scratch / f"{side}-{i}"
                if side == "ours":
                    r = time_ours(blob, dest)
                    ours.append(r["seconds"])
                    rss = max(rss, r["maxrss_kb"])
                else:
                    tars.append(time_tar(blob, dest))
                shutil.rmtree(dest)
                os.sync()
        o, t = statistics.median(ours), statistics.median(tars)
        print(f"ours: {o:.2f}s  tar -xzf + sync: {t:.2f}s  ratio ours/tar: {o / t:.2f}  "
              f"(medians of {args.repeat})")
        print(f"ours peak RSS: {rss / 1024:.0f} MiB")
    finally:
        shutil.rmtree(scratch, ignore_errors=True)
    return 0


if __name__ == "__main__":
    sys.exit(main())

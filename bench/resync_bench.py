#!/usr/bin/env python3
"""No-change re-sync of a 100-image wishlist vs the first sync, in the same run.

    sudo .venv/bin/python bench/resync_bench.py                  # ~1-2 min (first run also builds ~30 s)
    sudo .venv/bin/python bench/resync_bench.py --images 300 --repeat 1

A loopback docker-registry (storage cached under bench/out/resync-*/) holds --images
distinct images `bench/resync-NNN:v1`: a shared busybox base layer plus a layer of their
own (--files files, --kb KiB of data in all, seeded per image), pushed once with the
project's registry client. Each round converts the wishlist of all of them into a fresh
repository + state on a fresh loop-mounted ext4 (publib.scratch_fs; --scratch-dir DIR
to write elsewhere) with `cvmfs-publisher convert --no-thin-image` (the whole process timed),
then runs --resyncs no-change re-syncs of the same wishlist. The registry access log is
cleared before each re-sync and counted after it: blob GETs and manifest GETs must be 0
(HEADs are how a re-sync sees that nothing moved; they are printed too).

After them, one process runs --resyncs more re-syncs through the CLI's main() (after one
to warm up): what a re-sync costs without starting Python and importing the publisher,
as every round of `cvmfs-publisher loop` runs.

Prints seconds of all and the ratio re-sync / first sync LAST (target: <= 2%, 0 blob
GETs, 0 manifest GETs). Nothing is asserted.
"""
from __future__ import annotations

import argparse
import io
import json
import os
import random
import sys
import tarfile
import time
from pathlib import Path

sys.path.insert(0, str(Path(__file__).resolve().parents[1]))

from bench.benchlib import OUT, compiled_bytecode, machine  # noqa: E402
from bench.publib import (CachedRegistry, fresh_dir, median, publisher_cmd, remove, run_timed,  # noqa: E402
                          scratch_fs, wishlist_yaml)
from cvmfs_common.registry.client import RegistryClient  # noqa: E402
from tests.fixtures.images import busybox_entries, host_arch  # noqa: E402
from tests.fixtures.layers import MTIME, Layer  # noqa: E402
from tests.fixtures.oci_layout import CREATED, MT_CONFIG, MT_LAYER_GZIP, MT_MANIFEST, canonical_json  # noqa: E402


def own_layer(i: int, files: int, kib: int, seed: int) -> Layer:
    rng = random.Random(seed * 100_000 + i)
    buf = io.BytesIO()
    sizes = [rng.randint(1, 2 * kib * 1024 // files) for _ in range(files)]
    with tarfile.open(fileobj=buf, mode="w", format=tarfile.PAX_FORMAT) as tf:
        for d in ("opt", f"opt/app{i:03d}"):
            ti = tarfile.TarInfo(d)
            ti.type, ti.mode, ti.mtime = tarfile.DIRTYPE, 0o755, MTIME
            tf.addfile(ti)
        for n, size in enumerate(sizes):
            data = rng.randbytes(size // 2) + bytes(f"image {i} file {n} ", "ascii") * (size // 32)
            ti = tarfile.TarInfo(f"opt/app{i:03d}/f{n:04d}")
            ti.size, ti.mode, ti.mtime = len(data), 0o644, MTIME
            tf.addfile(ti, io.BytesIO(data))
    return Layer(buf.getvalue())


def build_and_push(reg: CachedRegistry, images: int, files: int, kib: int, seed: int) -> list[str]:
    names = [f"bench/resync-{i:03d}:v1" for i in range(images)]
    todo = [i for i, n in enumerate(names) if n not in reg.pushed()]
    if todo:
        t0 = time.perf_counter()
        base = Layer.from_entries(busybox_entries())
        client = RegistryClient(insecure_registries=[reg.host])
        try:
            for i in todo:
                repo = f"{reg.host}/bench/resync-{i:03d}"
                layers = [base, own_layer(i, files, kib, seed)]
                for l in layers:
                    client.push_blob(repo, l.blob)
                cfg = canonical_json({
                    "created": CREATED, "architecture": host_arch(), "os": "linux",
                    "config": {"Cmd": ["/bin/sh"], "Labels": {"bench.image": str(i)}},
                    "rootfs": {"type": "layers", "diff_ids": [l.diff_id for l in layers]},
                    "history": [{"created": CREATED, "created_by": f"layer {k}"} for k in range(2)]})
                cfg_digest = client.push_blob(repo, cfg)
                manifest = canonical_json({
                    "schemaVersion": 2, "mediaType": MT_MANIFEST,
                    "config": {"mediaType": MT_CONFIG, "digest": cfg_digest, "size": len(cfg)},
                    "layers": [{"mediaType": MT_LAYER_GZIP, "digest": l.digest, "size": len(l.blob)}
                               for l in layers]})
                client.put_manifest(f"{repo}:v1", manifest, MT_MANIFEST)
        finally:
            client.close()
        reg.mark_pushed([names[i] for i in todo])
        print(f"  built and pushed {len(todo)} images in {time.perf_counter() - t0:.1f}s", file=sys.stderr)
    return names


def main() -> int:
    ap = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    ap.add_argument("--images", type=int, default=100)
    ap.add_argument("--files", type=int, default=40, help="files in each image's own layer (default 40)")
    ap.add_argument("--kb", type=int, default=1024, help="KiB of data in each image's own layer (default 1024)")
    ap.add_argument("--repeat", type=int, default=2, help="first syncs (each into a fresh repository)")
    ap.add_argument("--resyncs", type=int, default=3, help="no-change re-syncs after each first sync")
    ap.add_argument("--jobs", type=int, default=4, help="--jobs of the publisher (its default: 4)")
    ap.add_argument("--seed", type=int, default=1)
    ap.add_argument("--scratch-dir", type=Path, help="write here instead of a fresh loop-mounted ext4")
    ap.add_argument("--child-inprocess", nargs=argparse.REMAINDER, help=argparse.SUPPRESS)
    args = ap.parse_args()
    if args.child_inprocess:
        return child_inprocess(int(args.child_inprocess[0]), args.child_inprocess[1:])
    compiled_bytecode()

    cache = OUT / f"resync-{args.images}i-{args.files}f-{args.kb}k-s{args.seed}"
    cache.mkdir(parents=True, exist_ok=True)
    firsts, resyncs, inproc = [], [], []
    gets: list[tuple[int, int, int]] = []  # (blob GETs, manifest GETs, HEADs) per re-sync
    size_gib = 2 + 3 * args.images * (args.kb + 1024) / (1 << 20)
    with CachedRegistry(cache) as reg, scratch_fs(size_gib, args.scratch_dir) as fs:
        work = fs / "resync-work"
        names = build_and_push(reg, args.images, args.files, args.kb, args.seed)
        wishlist = fresh_dir(work) / "wishlist.yaml"
        wishlist.write_text(wishlist_yaml([f"{reg.host}/{n}" for n in names]))

        def counted(run, runs: int = 1) -> tuple[int, int, int]:
            """Registry requests during `run` (`runs` re-syncs): blob GETs, manifest GETs,
            HEADs per re-sync."""
            reg.registry.clear_log()
            run()
            time.sleep(0.2)  # let the registry flush its access log
            heads = sum(1 for e in reg.registry.access_log() if e.method == "HEAD")
            gets.append((reg.registry.blob_get_count(), reg.registry.manifest_get_count(), heads // runs))
            return gets[-1]

        try:
            for r in range(args.repeat):
                root, state = work / "repo", work / "state.db"
                remove(root)
                state.unlink(missing_ok=True)
                conv_args = ["convert", str(wishlist), "--repository-root", str(root), "--state-db", str(state),
                             "--no-thin-image", "--jobs", str(args.jobs), "--log-level", "warning"]
                first = run_timed(publisher_cmd(*conv_args))
                firsts.append(first.seconds)
                print(f"round {r + 1}: first sync {first.seconds:.2f}s (cpu {first.cpu:.2f}s): {_summary(first.out)}")
                for _ in range(args.resyncs):
                    box: list = []
                    g = counted(lambda: box.append(run_timed(publisher_cmd(*conv_args))))
                    again = box[0]
                    resyncs.append(again.seconds)
                    print(f"  re-sync {again.seconds:.3f}s (cpu {again.cpu:.2f}s): {_summary(again.out)}; "
                          f"registry: {g[0]} blob GETs, {g[1]} manifest GETs, {g[2]} HEADs")
                # the same, in one process (no interpreter start, no imports): a `loop` round
                box = []
                g = counted(lambda: box.append(run_timed(
                    [sys.executable, __file__, "--child-inprocess", str(args.resyncs), *conv_args])),
                    args.resyncs + 1)
                times = json.loads(box[0].out.strip().splitlines()[-1])
                inproc += times
                print("  in-process re-syncs (after one to warm up): "
                      + " ".join(f"{t:.3f}s" for t in times)
                      + f"; registry: {g[0]} blob GETs, {g[1]} manifest GETs, {g[2]} HEADs per re-sync")
        finally:
            remove(work)

    f, s, i = median(firsts), median(resyncs), median(inproc)
    print()
    print(f"machine: {machine()}; load average at the end: " + " ".join(f"{x:.2f}" for x in os.getloadavg()))
    print(f"{args.images} images (busybox base + own layer of {args.files} files / {args.kb} KiB data), "
          f"--jobs {args.jobs}; medians of {len(firsts)} first syncs, {len(resyncs)} re-syncs, "
          f"{len(inproc)} in-process re-syncs")
    print(f"first sync (cvmfs-publisher convert):      {f:8.3f} s")
    print(f"no-change re-sync (cvmfs-publisher convert): {s:6.3f} s")
    print(f"no-change re-sync in-process (loop round): {i:8.3f} s")
    print(f"blob GETs during re-syncs:     {max(g[0] for g in gets)} (max)")
    print(f"manifest GETs during re-syncs: {max(g[1] for g in gets)} (max)")
    print(f"HEADs per re-sync:             {max(g[2] for g in gets)} (max)")
    print(f"re-sync / first sync:            {100 * s / f:.2f}%  (target <= 2%)")
    print(f"in-process re-sync / first sync: {100 * i / f:.2f}%")
    return 0


def _summary(out: str) -> str:
    lines = [l for l in out.strip().splitlines() if " images: " in l]
    return lines[0] if lines else out.strip()[-200:]


def child_inprocess(n: int, argv: list[str]) -> int:
    """`--child-inprocess N CONVERT-ARGS...`: cli.main once to warm up (imports, caches),
    then N times timed; prints the N times as JSON."""
    import contextlib
    import io

    from publisher.cli import main as cli_main

    times = []
    for k in range(n + 1):
        t0 = time.perf_counter()
        with contextlib.redirect_stdout(io.StringIO()):
            rc = cli_main(argv)
        if rc != 0:
            raise SystemExit(f"convert failed ({rc})")
        if k:
            times.append(time.perf_counter() - t0)
    print(json.dumps(times))
    return 0


if __name__ == "__main__":
    sys.exit(main())

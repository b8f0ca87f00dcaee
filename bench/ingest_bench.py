#!/usr/bin/env python3
"""Publisher layer ingest through the real path vs `tar -xzf` + `sync`, in the same run.

    sudo .venv/bin/python bench/ingest_bench.py                   # ~2-3 min (first run builds ~1 min)
    sudo .venv/bin/python bench/ingest_bench.py --size-mb 800     # a >= 500 MB gzip layer (issue 10)
    sudo .venv/bin/python bench/ingest_bench.py --no-parallel --repeat 5

Images are generated from a fixed seed (bench/publib.py: ~20 files per MB, 80% small
files, half random bytes, half text, gzip -6), pushed once into a loopback docker-registry
whose storage is cached under bench/out/ingest-*/. Every side writes into an empty
directory on the same file system and ends with sync(2), so each pays for its page cache
being written back; the registry's blob files are in the page cache for all sides.

One layer (--size-mb of file data):
  tar            `tar -xzf BLOB -C DIR; sync` on the registry's blob file (issue 10's baseline)
  curl | tar     `curl URL | tar -xzf - -C DIR; sync`: the baseline with the same download
  ingest         the publisher's ingest in a child process (imports not timed): the registry
                 client streams the blob over HTTP into the hardened unpacker (blob digest
                 and diffID verified while streaming, whiteouts, limits), layers.json +
                 origin.json, syncfs, rename into .layers/<xx>/<hex>; then sync
  convert-image  the whole `cvmfs-publisher convert-image` process: the ingest above plus
                 process start, state, the chain dir (a hard link per file), .flat, the
                 link, podmanStore, .metadata; then sync (for information)
Four layers (--layers, --layer-mb each):
  serial tar     the 4 blobs with `tar -xzf` one after the other, then sync
  ingest -j1/-j2 the ingests of the 4 layers through a thread pool of 1 / --jobs workers,
                 as convert's parallel pass runs them; then sync
  convert-image  `cvmfs-publisher convert-image --jobs J` of the 4-layer image (information)

--writeback-ab: also the `ingest` side without the early writeback (publisher/unpack/writeback.py:
syncfs in a thread every 64 MiB while unpacking), so before and after share the rounds.

--inflate zlib,isal,zlib-ng: the `ingest` and `unpack (file)` sides (and the 4-layer
`ingest -jN`) once per gzip inflater, forced with $CVMFS_PUBLISHER_INFLATE (publisher/
streams.py), so the libraries are compared in the same rounds; the default runs whichever
the publisher picks (the fastest installed).

Sides alternate in rotating order over --repeat rounds; medians are printed, with CPU
seconds (user + sys of the side's processes). Ratios LAST (target: ingest / tar <= 0.5x;
4 layers with --jobs 2 faster than serial tar). Nothing is asserted.
"""
from __future__ import annotations

import argparse
import json
import os
import shlex
import sys
import time
from pathlib import Path

sys.path.insert(0, str(Path(__file__).resolve().parents[1]))

from bench.benchlib import OUT, compiled_bytecode, machine  # noqa: E402
from bench.publib import (CachedImage, CachedRegistry, Timed, generated_image, median,  # noqa: E402
                          own_peak_rss_kib, publisher_cmd, remove, run_timed, scratch_fs)

MiB = 1 << 20
NO_WRITEBACK_ENV = "BENCH_NO_EARLY_WRITEBACK"   # set by --writeback-ab for its "before" side


def _maybe_without_writeback() -> None:
    if os.environ.get(NO_WRITEBACK_ENV):
        from publisher.unpack import writeback
        writeback.STEP = 1 << 62   # never reached: the layer stays dirty until the final syncfs


# ------------------------------------------------------------------ child: the ingest path
def child_ingest(args: list[str]) -> int:
    """`--child-ingest HOST NAME ROOT JOBS META_JSON`: ingest the image's layers as convert
    does (LayerIngester through a pool of JOBS), then sync; print seconds and peak RSS."""
    host, name, root, jobs, meta = args
    from concurrent.futures import ThreadPoolExecutor

    from cvmfs_common.repo.paths import RepositoryLayout
    from cvmfs_common.oci.reference import parse_reference
    from cvmfs_common.registry.client import RegistryClient
    from publisher.unpack.ingest import LayerIngester, LayerSpec
    from tests.fixtures.oci_layout import MT_LAYER_GZIP

    layers = json.loads(meta)
    _maybe_without_writeback()
    ref = parse_reference(f"{host}/{name}:v1")
    specs = [LayerSpec(i, l["digest"], l["size"], MT_LAYER_GZIP, l["diff_id"]) for i, l in enumerate(layers)]
    t0 = time.perf_counter()
    with RegistryClient(insecure_registries=[host]) as client:
        ingester = LayerIngester(RepositoryLayout(Path(root)), client)
        with ThreadPoolExecutor(max_workers=int(jobs)) as pool:
            done = list(pool.map(lambda s: ingester.ingest(ref, s, config_digest="sha256:" + "0" * 64,
                                                           require_self_contained=s.index > 0), specs))
    os.sync()
    seconds = time.perf_counter() - t0
    assert all(d is not None for d in done), "a layer omitted its parent directories"
    print(json.dumps({"seconds": seconds,
                      "maxrss_kib": own_peak_rss_kib()}))
    return 0


def child_unpack(args: list[str]) -> int:
    """`--child-unpack BLOB DEST DIGEST DIFF_ID`: the unpacker alone on a local blob file
    (no download, no layer dir around it), then sync."""
    blob, dest, digest, diff_id = args
    from publisher.unpack.unpack import unpack_layer

    _maybe_without_writeback()
    t0 = time.perf_counter()
    with open(blob, "rb") as f:
        unpack_layer(f, dest, digest=digest, diff_id=diff_id)
    os.sync()
    print(json.dumps({"seconds": time.perf_counter() - t0,
                      "maxrss_kib": own_peak_rss_kib()}))
    return 0


def inflate_cpu(blob: Path, inflaters: list[str], repeat: int) -> dict[str, float]:
    """CPU seconds to inflate the blob (in memory, 1 MiB chunks as the unpacker reads it),
    best of `repeat`, per inflater: the libraries alone, without the disk's noise."""
    from publisher.unpack.streams import inflate_module

    data = blob.read_bytes()
    best: dict[str, float] = {}
    for _ in range(repeat):
        for name in inflaters:
            d = inflate_module(name).decompressobj(wbits=31)
            t0 = time.process_time()
            for off in range(0, len(data), MiB):
                chunk = data[off:off + MiB]
                while chunk:
                    d.decompress(chunk, MiB)
                    chunk = d.unconsumed_tail
            best[name] = min(best.get(name, 1e9), time.process_time() - t0)
    return best


def inflate_env(inflater: str | None, writeback: bool = True) -> dict[str, str] | None:
    """The environment forcing the publisher's gzip inflater (None: its own choice), and
    turning the early writeback off."""
    if inflater is None and writeback:
        return None
    from publisher.unpack.streams import INFLATE_ENV
    env = {**os.environ, **({INFLATE_ENV: inflater} if inflater else {})}
    if not writeback:
        env[NO_WRITEBACK_ENV] = "1"
    return env


def time_child_ingest(reg: CachedRegistry, img: CachedImage, root: Path, jobs: int,
                      inflater: str | None = None, writeback: bool = True) -> Timed:
    meta = json.dumps([{"digest": l.digest, "size": l.size, "diff_id": l.diff_id} for l in img.layers])
    t = run_timed([sys.executable, __file__, "--child-ingest", reg.host, img.name, str(root), str(jobs), meta],
                  env=inflate_env(inflater, writeback))
    r = json.loads(t.out.strip().splitlines()[-1])
    return Timed(r["seconds"], t.user, t.sys, r["maxrss_kib"])


# ------------------------------------------------------------------ sides
class Sides:
    def __init__(self, reg: CachedRegistry, scratch: Path) -> None:
        self.reg, self.scratch = reg, scratch

    def _dir(self, name: str) -> Path:
        d = self.scratch / name
        remove(d)
        d.mkdir(parents=True)
        return d

    def tar(self, img: CachedImage) -> Timed:
        cmds = []
        for i, l in enumerate(img.layers):
            d = self._dir(f"tar-{i}")
            cmds.append(f"tar -xzf {shlex.quote(str(self.reg.blob_file(l.digest)))} -C {shlex.quote(str(d))}")
        t = run_timed(["bash", "-c", " && ".join(cmds) + " && sync"])
        for i in range(len(img.layers)):
            remove(self.scratch / f"tar-{i}")
        return t

    def curl_tar(self, img: CachedImage) -> Timed:
        cmds = []
        for i, l in enumerate(img.layers):
            d = self._dir(f"curl-{i}")
            url = f"http://{self.reg.host}/v2/{img.name}/blobs/{l.digest}"
            cmds.append(f"curl -sSf {shlex.quote(url)} | tar -xzf - -C {shlex.quote(str(d))}")
        t = run_timed(["bash", "-c", "set -o pipefail; " + " && ".join(cmds) + " && sync"])
        for i in range(len(img.layers)):
            remove(self.scratch / f"curl-{i}")
        return t

    def unpack_file(self, img: CachedImage, inflater: str | None = None) -> Timed:
        (l,) = img.layers
        d = self._dir("unpack")
        try:
            t = run_timed([sys.executable, __file__, "--child-unpack", str(self.reg.blob_file(l.digest)),
                           str(d / "layerfs"), l.digest, l.diff_id], env=inflate_env(inflater))
            r = json.loads(t.out.strip().splitlines()[-1])
            return Timed(r["seconds"], t.user, t.sys, r["maxrss_kib"])
        finally:
            remove(d)

    def ingest(self, img: CachedImage, jobs: int, inflater: str | None = None, writeback: bool = True) -> Timed:
        root = self._dir("repo")
        try:
            return time_child_ingest(self.reg, img, root, jobs, inflater, writeback)
        finally:
            remove(root)

    def convert_image(self, img: CachedImage, jobs: int) -> Timed:
        root = self._dir("repo")
        state = self.scratch / "state.db"
        state.unlink(missing_ok=True)
        cmd = publisher_cmd("convert-image", f"{self.reg.host}/{img.name}:v1", "--repository-root", str(root),
                            "--state-db", str(state), "--jobs", str(jobs), "--log-level", "warning")
        try:
            return run_timed(["bash", "-c", " ".join(map(shlex.quote, cmd)) + " && sync"])
        finally:
            remove(root)
            state.unlink(missing_ok=True)


def rounds(sides: dict[str, callable], repeat: int) -> dict[str, list[Timed]]:
    out: dict[str, list[Timed]] = {k: [] for k in sides}
    names = list(sides)
    for r in range(repeat):
        order = names[r % len(names):] + names[:r % len(names)]
        for name in order:
            t = sides[name]()
            out[name].append(t)
            print(f"  round {r + 1} {name:16} {t.seconds:7.2f}s  cpu {t.cpu:6.2f}s", file=sys.stderr, flush=True)
    return out


def table(title: str, results: dict[str, list[Timed]], base: str) -> dict[str, float]:
    print(f"\n{title}")
    print(f"  {'side':16} {'median s':>9} {'cpu s':>7} {'vs ' + base:>10}  runs")
    b = median([t.seconds for t in results[base]])
    meds = {}
    for name, ts in results.items():
        m = median([t.seconds for t in ts])
        meds[name] = m
        print(f"  {name:16} {m:9.2f} {median([t.cpu for t in ts]):7.2f} {m / b:9.2f}x  "
              + " ".join(f"{t.seconds:.2f}" for t in ts))
    return meds


def main() -> int:
    ap = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    ap.add_argument("--size-mb", type=int, default=200, help="file data in the single layer (default 200)")
    ap.add_argument("--layers", type=int, default=4, help="layers of the parallel image (default 4)")
    ap.add_argument("--layer-mb", type=int, default=50, help="file data per layer of the parallel image (default 50)")
    ap.add_argument("--jobs", type=int, default=2, help="parallel ingests for the multi-layer image (default 2)")
    ap.add_argument("--repeat", type=int, default=3)
    ap.add_argument("--seed", type=int, default=1)
    ap.add_argument("--no-single", action="store_true", help="skip the one-layer part")
    ap.add_argument("--no-parallel", action="store_true", help="skip the multi-layer part")
    ap.add_argument("--no-convert", action="store_true", help="skip the convert-image sides")
    ap.add_argument("--inflate", metavar="A,B,...",
                    help="run the ingest/unpack sides once per gzip inflater (zlib, isal, zlib-ng)")
    ap.add_argument("--writeback-ab", action="store_true",
                    help="also run the ingest side without the early writeback (before/after)")
    ap.add_argument("--scratch-dir", type=Path, help="write here instead of a fresh loop-mounted ext4")
    ap.add_argument("--child-ingest", nargs=5, help=argparse.SUPPRESS)
    ap.add_argument("--child-unpack", nargs=4, help=argparse.SUPPRESS)
    args = ap.parse_args()
    if args.child_ingest:
        return child_ingest(args.child_ingest)
    if args.child_unpack:
        return child_unpack(args.child_unpack)
    compiled_bytecode()
    inflaters: list[str | None] = args.inflate.split(",") if args.inflate else [None]
    from publisher.unpack.streams import inflate_module
    for inf in inflaters:
        print(f"inflater {inf or 'default'}: {inflate_module(inf).__name__}", file=sys.stderr)

    cache = OUT / f"ingest-s{args.seed}"
    single = multi = None
    biggest = max(0 if args.no_single else args.size_mb, 0 if args.no_parallel else args.layers * args.layer_mb)
    with CachedRegistry(cache) as reg, scratch_fs(4 + 3 * biggest / 1024, args.scratch_dir) as fs:
        scratch = fs / "ingest-work"
        remove(scratch)
        scratch.mkdir(parents=True)
        if not args.no_single:
            single = generated_image(cache, f"bench/ingest-one-{args.size_mb}m", [args.size_mb * MiB], args.seed)
            reg.push_layout(cache / "layout", single.name.replace("/", "-"), single.name, single.tag)
        if not args.no_parallel:
            multi = generated_image(cache, f"bench/ingest-{args.layers}x{args.layer_mb}m",
                                    [args.layer_mb * MiB] * args.layers, args.seed + 1)
            reg.push_layout(cache / "layout", multi.name.replace("/", "-"), multi.name, multi.tag)
        for img in (single, multi):  # every side reads the blobs from the page cache
            for l in img.layers if img else ():
                with reg.blob_file(l.digest).open("rb") as f:
                    while f.read(8 * MiB):
                        pass
        sides = Sides(reg, scratch)
        res1 = res4 = None
        cpu = None
        if args.inflate and single is not None:
            cpu = inflate_cpu(reg.blob_file(single.layers[0].digest), inflaters, args.repeat)
        try:
            if single is not None:
                print(f"one layer: {single.files} files, {single.data_bytes / 1e6:.0f} MB of data, "
                      f"gzip blob {single.blob_bytes / 1e6:.0f} MB", file=sys.stderr)
                s1 = {"tar": lambda: sides.tar(single), "curl | tar": lambda: sides.curl_tar(single)}
                for inf in inflaters:
                    sfx = f" [{inf}]" if inf else ""
                    s1["unpack (file)" + sfx] = lambda inf=inf: sides.unpack_file(single, inf)
                    s1["ingest" + sfx] = lambda inf=inf: sides.ingest(single, 1, inf)
                    if args.writeback_ab:
                        s1["ingest" + sfx + " no-wb"] = lambda inf=inf: sides.ingest(single, 1, inf, False)
                if not args.no_convert:
                    s1["convert-image"] = lambda: sides.convert_image(single, 1)
                res1 = rounds(s1, args.repeat)
            if multi is not None:
                print(f"{args.layers} layers: {multi.files} files, {multi.data_bytes / 1e6:.0f} MB of data, "
                      f"gzip blobs {multi.blob_bytes / 1e6:.0f} MB", file=sys.stderr)
                s4 = {"serial tar": lambda: sides.tar(multi)}
                for inf in inflaters:
                    sfx = f" [{inf}]" if inf else ""
                    s4["ingest -j1" + sfx] = lambda inf=inf: sides.ingest(multi, 1, inf)
                    s4[f"ingest -j{args.jobs}" + sfx] = lambda inf=inf: sides.ingest(multi, args.jobs, inf)
                if not args.no_convert:
                    s4[f"convert-image -j{args.jobs}"] = lambda: sides.convert_image(multi, args.jobs)
                res4 = rounds(s4, args.repeat)
        finally:
            remove(scratch)

    print(f"\nmachine: {machine()}; load average at the end: "
          + " ".join(f"{x:.2f}" for x in os.getloadavg()))
    m1 = m4 = None
    if res1 is not None and single is not None:
        m1 = table(f"one layer: {single.files} files, {single.data_bytes / 1e6:.0f} MB data, "
                   f"{single.blob_bytes / 1e6:.0f} MB gzip blob (medians of {args.repeat})", res1, "tar")
        peak = max(t.maxrss_kib for k, ts in res1.items() if k.startswith("ingest") for t in ts)
        print(f"  ingest peak RSS (child process): {peak / 1024:.0f} MiB")
    if res4 is not None and multi is not None:
        m4 = table(f"{args.layers} layers: {multi.files} files, {multi.data_bytes / 1e6:.0f} MB data, "
                   f"{multi.blob_bytes / 1e6:.0f} MB gzip blobs (medians of {args.repeat})", res4, "serial tar")
    if cpu:
        print(f"\ninflate alone, one {single.blob_bytes / 1e6:.0f} MB blob in memory (CPU s, best of {args.repeat}): "
              + ", ".join(f"{k} {v:.2f} s ({cpu['zlib'] / v if 'zlib' in cpu else 1:.2f}x zlib's speed)"
                          for k, v in cpu.items()))
    print("\nratios (median wall time):")
    for inf in inflaters:
        sfx = f" [{inf}]" if inf else ""
        if m1:
            print(f"  ingest{sfx} / (tar -xzf + sync), one {single.blob_bytes / 1e6:.0f} MB layer: "
                  f"{m1['ingest' + sfx] / m1['tar']:.2f}x  (target <= 0.5x)")
            if args.writeback_ab:
                print(f"  ingest{sfx} without early writeback / (tar -xzf + sync):  "
                      f"{m1['ingest' + sfx + ' no-wb'] / m1['tar']:.2f}x")
            print(f"  ingest{sfx} / (curl | tar -xzf + sync):                  "
                  f"{m1['ingest' + sfx] / m1['curl | tar']:.2f}x")
            print(f"  unpack (file){sfx} / (tar -xzf + sync):                  "
                  f"{m1['unpack (file)' + sfx] / m1['tar']:.2f}x")
        if m4:
            j = f"ingest -j{args.jobs}" + sfx
            print(f"  {args.layers} layers, {j} / serial tar: {m4[j] / m4['serial tar']:.2f}x  (target < 1.0x)")
            print(f"  {args.layers} layers, {j} / ingest -j1{sfx}: {m4[j] / m4['ingest -j1' + sfx]:.2f}x")
    if m1 and "convert-image" in m1:
        print(f"  convert-image / (tar -xzf + sync):                  {m1['convert-image'] / m1['tar']:.2f}x")
    return 0


if __name__ == "__main__":
    sys.exit(main())

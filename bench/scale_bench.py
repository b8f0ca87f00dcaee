#!/usr/bin/env python3
"""How the publisher's cost grows with the repository: a wishlist of many small images.

    sudo .venv/bin/python bench/scale_bench.py                       # 200, 1000, 2000 images
    sudo .venv/bin/python bench/scale_bench.py --sizes 200,1000      # what fits

A loopback docker-registry (storage cached under bench/out/scale-*/) holds the images
`bench/scale-NNNN:v1`, pushed once with the project's registry client: the fixtures'
busybox layer (shared by all), one of --bases generated base layers (shared by every
--bases-th image) and a small layer of each image's own (--files files). For every size N
(--sizes), into a fresh repository + state on a fresh loop-mounted ext4 (publib.scratch_fs),
each step a whole `cvmfs-publisher` process, timed:

  first sync        convert of the wishlist of the first N images
  re-sync           the same again, nothing changed (median of --resyncs)
  re-sync 1%        after pushing a new own layer under v1 for 1% of the N images
  drop 10%          convert of a wishlist without 10% of the images (they are no longer
                    named), then `gc --older-than 0s` (timed apart: "gc")
  check             `check` of the repository that is left

For each: seconds, seconds per image (per N; gc: per dropped image) and the state
database's size. Prints the per-image cost at the largest size over the smallest LAST
(target: <= 1.2x, flat), the no-change re-sync at 2 000 images (target <= 30 s).
Nothing is asserted.
"""
from __future__ import annotations

import argparse
import io
import json
import os
import random
import re
import sys
import tarfile
import time
from pathlib import Path

sys.path.insert(0, str(Path(__file__).resolve().parents[1]))

from bench.benchlib import OUT, compiled_bytecode, machine  # noqa: E402
from bench.publib import (CachedRegistry, median, publisher_cmd, remove, run_timed,  # noqa: E402
                          scratch_fs, wishlist_yaml)
from cvmfs_common.registry.client import RegistryClient  # noqa: E402
from tests.fixtures.images import busybox_entries, host_arch  # noqa: E402
from tests.fixtures.layers import MTIME, Layer  # noqa: E402
from tests.fixtures.oci_layout import CREATED, MT_CONFIG, MT_LAYER_GZIP, MT_MANIFEST, canonical_json  # noqa: E402


def small_layer(prefix: str, files: int, seed: int, max_bytes: int = 4096) -> Layer:
    rng = random.Random(seed)
    buf = io.BytesIO()
    with tarfile.open(fileobj=buf, mode="w", format=tarfile.PAX_FORMAT) as tf:
        for d in ("opt", f"opt/{prefix}"):
            ti = tarfile.TarInfo(d)
            ti.type, ti.mode, ti.mtime = tarfile.DIRTYPE, 0o755, MTIME
            tf.addfile(ti)
        for n in range(files):
            size = rng.randint(1, max_bytes)
            data = rng.randbytes(size // 2) + b"x" * (size - size // 2)
            ti = tarfile.TarInfo(f"opt/{prefix}/f{n:04d}")
            ti.size, ti.mode, ti.mtime = len(data), 0o644, MTIME
            tf.addfile(ti, io.BytesIO(data))
    return Layer(buf.getvalue())


class Images:
    """The images in the cached registry, and the pushes that change some of them."""

    def __init__(self, reg: CachedRegistry, bases: int, files: int, seed: int) -> None:
        self.reg, self.bases, self.files, self.seed = reg, bases, files, seed
        self.busybox = Layer.from_entries(busybox_entries())
        self._base_layers: dict[int, Layer] = {}
        self._generation = reg.dir / "generation"  # bumped by every change, so each is new

    def name(self, i: int) -> str:
        return f"bench/scale-{i:04d}:v1"

    def base(self, b: int) -> Layer:
        if b not in self._base_layers:
            self._base_layers[b] = small_layer(f"base{b:02d}", 50, self.seed * 1000 + b, 16384)
        return self._base_layers[b]

    def push(self, client: RegistryClient, i: int, generation: int = 0) -> None:
        repo = f"{self.reg.host}/bench/scale-{i:04d}"
        own = small_layer(f"app{i:04d}", self.files, (self.seed * 10_000 + i) * 1000 + generation)
        layers = [self.busybox, self.base(i % self.bases), own]
        for l in layers:
            client.push_blob(repo, l.blob)
        cfg = canonical_json({
            "created": CREATED, "architecture": host_arch(), "os": "linux",
            "config": {"Cmd": ["/bin/sh"], "Labels": {"bench.image": str(i), "bench.generation": str(generation)}},
            "rootfs": {"type": "layers", "diff_ids": [l.diff_id for l in layers]},
            "history": [{"created": CREATED, "created_by": f"layer {k}"} for k in range(len(layers))]})
        cfg_digest = client.push_blob(repo, cfg)
        manifest = canonical_json({
            "schemaVersion": 2, "mediaType": MT_MANIFEST,
            "config": {"mediaType": MT_CONFIG, "digest": cfg_digest, "size": len(cfg)},
            "layers": [{"mediaType": MT_LAYER_GZIP, "digest": l.digest, "size": len(l.blob)} for l in layers]})
        client.put_manifest(f"{repo}:v1", manifest, MT_MANIFEST)

    def ensure(self, n: int) -> list[str]:
        names = [self.name(i) for i in range(n)]
        pushed = self.reg.pushed()
        todo = [i for i, name in enumerate(names) if name not in pushed]
        if todo:
            t0 = time.perf_counter()
            with RegistryClient(insecure_registries=[self.reg.host]) as client:
                for k, i in enumerate(todo):
                    self.push(client, i)
                    if k % 200 == 199:
                        self.reg.mark_pushed([self.name(j) for j in todo[k - 199:k + 1]])
                        print(f"  pushed {k + 1}/{len(todo)}", file=sys.stderr, flush=True)
            self.reg.mark_pushed([self.name(j) for j in todo[len(todo) // 200 * 200:]])
            print(f"  built and pushed {len(todo)} images in {time.perf_counter() - t0:.1f}s", file=sys.stderr)
        return names

    def change(self, indices: list[int]) -> None:
        gen = int(self._generation.read_text()) + 1 if self._generation.exists() else 1
        self._generation.write_text(str(gen))
        with RegistryClient(insecure_registries=[self.reg.host]) as client:
            for i in indices:
                self.push(client, i, gen)


def db_size(state: Path) -> int:
    return sum(p.stat().st_size for p in (state, Path(f"{state}-wal")) if p.exists())


def summary_line(out: str) -> str:
    lines = [l.strip() for l in out.strip().splitlines() if re.search(r" images: |^gc|^check", l.strip())]
    return lines[0][:160] if lines else out.strip()[-160:]


def one_size(n: int, images: Images, work: Path, args: argparse.Namespace) -> dict[str, dict]:
    names = images.ensure(n)
    root, state = work / "repo", work / "state.db"
    remove(work)
    work.mkdir(parents=True)
    wl_all, wl_kept = work / "all.yaml", work / "kept.yaml"
    wl_all.write_text(wishlist_yaml([f"{images.reg.host}/{x}" for x in names]))
    dropped = set(range(0, n, 10))  # 10%
    wl_kept.write_text(wishlist_yaml([f"{images.reg.host}/{x}" for i, x in enumerate(names) if i not in dropped]))
    common = ["--repository-root", str(root), "--state-db", str(state), "--log-level", "warning"]
    conv = ["--no-thin-image", "--jobs", str(args.jobs)]
    res: dict[str, dict] = {}

    def step(key: str, cmd: list[str], per: int) -> None:
        t = run_timed(publisher_cmd(*cmd))
        res.setdefault(key, {"runs": [], "per": per, "cpus": []})["runs"].append(t.seconds)
        res[key]["cpus"].append(t.cpu)
        res[key]["db"] = db_size(state)
        print(f"  {n:5} {key:14} {t.seconds:8.2f}s  cpu {t.cpu:7.2f}s  {1000 * t.seconds / per:7.2f} ms/image  "
              f"db {db_size(state) / 1e6:6.2f} MB  {summary_line(t.out)}", file=sys.stderr, flush=True)

    step("first sync", ["convert", str(wl_all), *common, *conv], n)
    for _ in range(args.resyncs):
        step("re-sync", ["convert", str(wl_all), *common, *conv], n)
    changed = list(range(5, n, 100))  # 1%
    images.change(changed)
    step("re-sync 1%", ["convert", str(wl_all), *common, *conv], n)
    step("drop 10%", ["convert", str(wl_kept), *common, *conv], n)
    step("gc", ["gc", "--older-than", "0s", *common], len(dropped))
    step("check", ["check", *common], n - len(dropped))
    remove(work)
    return res


def store_batch(sizes: list[int], dir: Path, image) -> None:
    """All N images added to an empty store with one ``add_images`` (what convert does per run)."""
    import shutil

    from cvmfs_common.repo.paths import RepositoryLayout
    from publisher.write.podman_store import PodmanStore

    print("\npodman store alone, all N added at once (add_images: what convert does per run)")
    print(f"{'images':>7} {'ms per image':>13} {'CPU ms per image':>17}")
    for n in sizes:
        root = dir / f"store-{n}"
        shutil.rmtree(root, ignore_errors=True)
        layout = RepositoryLayout(root)
        imgs = [image(layout, i) for i in range(n)]
        t0, c0 = time.perf_counter(), time.process_time()
        PodmanStore(layout).add_images(imgs)
        wall, cpu = time.perf_counter() - t0, time.process_time() - c0
        assert len(PodmanStore(layout).images()) == n
        shutil.rmtree(root, ignore_errors=True)
        print(f"{n:7} {1000 * wall / n:13.2f} {1000 * cpu / n:17.2f}", flush=True)


def store_ab(sizes: list[int], dir: Path) -> None:
    """The podman store alone, in this process, on images whose layers are empty dirs:
    add_image of N images one after the other (what a first sync does), then removing
    10% of them one by one (gc before the batch removal) vs in one `remove_images`."""
    import hashlib
    import shutil

    from cvmfs_common.repo.paths import RepositoryLayout
    from publisher.write.podman_store import PodmanImage, PodmanLayer, PodmanStore

    def digest(data: bytes) -> str:
        return "sha256:" + hashlib.sha256(data).hexdigest()

    def image(layout: RepositoryLayout, i: int, bases: int = 20) -> PodmanImage:
        layers = []
        for seed in ("busybox", f"base{i % bases}", f"own{i}"):
            diff_id, blob = digest(f"diff {seed}".encode()), digest(f"blob {seed}".encode())
            layout.layerfs(blob).mkdir(parents=True, exist_ok=True)
            layers.append(PodmanLayer(diff_id, blob, 100, 200, layout.layerfs(blob)))
        config = json.dumps({"created": "2023-11-14T22:13:20Z", "i": i,
                             "rootfs": {"type": "layers", "diff_ids": [l.diff_id for l in layers]}}).encode()
        manifest = json.dumps({"schemaVersion": 2, "config": {"digest": digest(config)},
                               "layers": [{"digest": l.compressed_digest} for l in layers]}).encode()
        return PodmanImage(digest(config), config, digest(manifest), manifest,
                           [f"127.0.0.1:5000/bench/scale-{i:04d}:v1"], layers)

    store_batch(sizes, dir, image)
    print("\npodman store alone (ms per image: add = first sync's share; remove 10%: per removed image)")
    print(f"{'images':>7} {'add':>8} {'add CPU, last 50':>17} {'remove 1 by 1':>14} {'remove at once':>15}")
    for n in sizes:
        row = []
        for batch in (False, True):
            root = dir / f"store-{n}"
            shutil.rmtree(root, ignore_errors=True)
            layout = RepositoryLayout(root)
            store = PodmanStore(layout)
            imgs = [image(layout, i) for i in range(n)]
            t0 = time.perf_counter()
            for img in imgs[:-50]:
                store.add_image(img)
            c1 = time.process_time()
            for img in imgs[-50:]:  # the last ones: what one more image costs in a store this big
                store.add_image(img)
            add, last = time.perf_counter() - t0, (time.process_time() - c1) / 50
            drop = [img.config_digest for k, img in enumerate(imgs) if k % 10 == 0]
            t0 = time.perf_counter()
            if batch:
                store.remove_images(drop)
            else:
                for c in drop:
                    store.remove_image(c)
            row += [add, time.perf_counter() - t0, last]
            assert len(store.images()) == n - len(drop)
            shutil.rmtree(root, ignore_errors=True)
        print(f"{n:7} {1000 * min(row[0], row[3]) / n:8.2f} {1000 * min(row[2], row[5]):17.2f} "
              f"{1000 * row[1] / (n // 10):14.2f} {1000 * row[4] / (n // 10):15.2f}", flush=True)


def main() -> int:
    ap = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    ap.add_argument("--sizes", default="200,1000,2000", help="wishlist sizes (default 200,1000,2000)")
    ap.add_argument("--bases", type=int, default=20, help="shared base layers (default 20)")
    ap.add_argument("--files", type=int, default=8, help="files in each image's own layer (default 8)")
    ap.add_argument("--resyncs", type=int, default=3, help="no-change re-syncs per size (median)")
    ap.add_argument("--jobs", type=int, default=4, help="--jobs of the publisher (its default: 4)")
    ap.add_argument("--seed", type=int, default=1)
    ap.add_argument("--scratch-dir", type=Path, help="write here instead of a fresh loop-mounted ext4")
    ap.add_argument("--store-only", action="store_true",
                    help="only the podman store's add/remove at each size, in-process (seconds, not minutes)")
    args = ap.parse_args()
    compiled_bytecode()
    sizes = [int(x) for x in args.sizes.split(",")]
    if args.store_only:
        with scratch_fs(2, args.scratch_dir, name="scale_bench-store") as fs:
            store_ab(sizes, fs)
        return 0
    cache = OUT / f"scale-{args.bases}b-{args.files}f-s{args.seed}"
    cache.mkdir(parents=True, exist_ok=True)
    results: dict[int, dict[str, dict]] = {}
    with CachedRegistry(cache) as reg, scratch_fs(2 + max(sizes) / 400, args.scratch_dir) as fs:
        images = Images(reg, args.bases, args.files, args.seed)
        images.ensure(max(sizes))
        for n in sizes:
            results[n] = one_size(n, images, fs / "scale-work", args)

    keys = ["first sync", "re-sync", "re-sync 1%", "drop 10%", "gc", "check"]
    print(f"\nmachine: {machine()}; load average at the end: " + " ".join(f"{x:.2f}" for x in os.getloadavg()))
    print(f"images: busybox + 1 of {args.bases} shared bases + an own layer of {args.files} files; "
          f"--jobs {args.jobs}; gc per dropped image, check per image left")
    print(f"{'step':14}" + "".join(f" {n:>6} img: s   ms/img  CPU ms/img  db MB" for n in sizes))
    for k in keys:
        row = f"{k:14}"
        for n in sizes:
            r = results[n][k]
            s = median(r["runs"])
            row += f" {s:13.2f} {1000 * s / r['per']:8.2f} {1000 * median(r['cpus']) / r['per']:11.2f} {r['db'] / 1e6:6.2f}"
        print(row)
    print(json.dumps({str(n): {k: {"seconds": median(v["runs"]), "per": v["per"], "db": v["db"]}
                               for k, v in r.items()} for n, r in results.items()}))
    lo, hi = min(sizes), max(sizes)
    print(f"\nper-image cost, {hi} / {lo} images (target <= 1.2x): wall, CPU")
    for k in keys:
        a, b = results[lo][k], results[hi][k]
        print(f"  {k:14} {(median(b['runs']) / b['per']) / (median(a['runs']) / a['per']):.2f}x  "
              f"{(median(b['cpus']) / b['per']) / (median(a['cpus']) / a['per']):.2f}x")
    rs = median(results[hi]["re-sync"]["runs"])
    print(f"no-change re-sync of {hi} images: {rs:.2f} s (target at 2000: <= 30 s)"
          + ("" if hi == 2000 else f"; linear extrapolation to 2000: {rs * 2000 / hi:.1f} s"))
    return 0


if __name__ == "__main__":
    sys.exit(main())

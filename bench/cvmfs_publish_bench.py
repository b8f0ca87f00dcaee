#!/usr/bin/env python3
"""Publishing into a real CernVM-FS 2.12 stratum 0: ours, DUCC and the floor, side by side.

    sudo CVMFS_TEST_SHARED_DIR=/work/shared .venv/bin/python bench/cvmfs_publish_bench.py
    sudo ... bench/cvmfs_publish_bench.py --images 200          # unpacked.cern.ch-like scale
    sudo ... bench/cvmfs_publish_bench.py --no-ducc             # ours and the floor only

One stratum 0 (tests/cvmfs/stratum0.py: the tier's Debian 12 container with CernVM-FS 2.12 and
DUCC from `$CVMFS_TEST_SHARED_DIR/ducc`), one loopback registry (storage cached under
bench/out/cvmfs-publish/), one repository per side. The images: --images images sharing one
--base-layers-layer base of --base-mb MB (generated, publib.write_layer) plus one layer of
--own-kb kB each, as site images share bases; image number N (one more) is the "new tag".

Rounds, each side in turn (ours: `cvmfs-publisher convert --backend cvmfs`; DUCC:
`cvmfs_ducc convert -i`):

  first       the wishlist of --images images into an empty repository
  no change   the same wishlist again
  new tag     the wishlist plus one image on the known base
  gc half     (--gc, ours only) a wishlist of half of them, then `cvmfs-publisher gc`
  floor       every distinct layer of the round untarred in ONE transaction, one publish
              (for the first and the new-tag rounds): what no publisher can beat

Prints wall seconds and revisions per round and side, the ratios ours/DUCC and ours/floor
(same run), and where our time went: the seconds per `cvmfs_server` command (from the
backend's debug log). Nothing is asserted.
"""
from __future__ import annotations

import argparse
import json
import re
import sys
from collections import defaultdict
from dataclasses import dataclass, field
from pathlib import Path

sys.path.insert(0, str(Path(__file__).resolve().parents[1]))

from bench.benchlib import OUT, machine, require_root  # noqa: E402
from bench.publib import CachedRegistry, LayerBlob, add_image, write_layer  # noqa: E402
from tests.fixtures.oci_layout import OciLayout  # noqa: E402
from tests.fixtures.rootfs import start_container  # noqa: E402
from tests.fixtures.workdirs import new_workdir, remove_workdir  # noqa: E402
from tests.cvmfs.stratum0 import Repository, Stratum0, bookworm_spec, find_distribution  # noqa: E402

DUCC_TARBALL = "cvmfs_ducc-ae7450e-linux-amd64.tar.xz"
CACHE = OUT / "cvmfs-publish"


# -------------------------------------------------------------------------- images
@dataclass
class BenchImages:
    layout: Path
    base: list[LayerBlob]
    own: list[LayerBlob]          # one per image, the last one is the new tag's

    def tag(self, i: int) -> str:
        return f"img-{i:04d}"

    @staticmethod
    def name(i: int) -> str:
        return f"bench/cvmfs-{i:04d}"


def make_images(images: int, base_layers: int, base_mb: float, own_kb: float) -> BenchImages:
    """The OCI layout with the base and images+1 own layers, cached by its parameters."""
    key = f"b{base_layers}x{base_mb:g}mb-own{own_kb:g}kb"
    cache = CACHE / key
    meta = cache / "layers.json"
    known = json.loads(meta.read_text()) if meta.is_file() else {"base": [], "own": []}
    layout = OciLayout(cache / "layout")
    base = [LayerBlob(**b) for b in known["base"]]
    own = [LayerBlob(**b) for b in known["own"]]
    changed = False
    for i in range(len(base), base_layers):
        tmp = cache / "layer.tmp"
        lb = write_layer(tmp, int(base_mb * 1e6 / base_layers), 7000 + i, f"base-{i}")
        tmp.replace(layout.blob_path(lb.digest))
        base.append(lb)
        changed = True
    for i in range(len(own), images + 1):
        tmp = cache / "layer.tmp"
        lb = write_layer(tmp, int(own_kb * 1e3), 9000 + i, f"own-{i:04d}", files_per_mb=100)
        tmp.replace(layout.blob_path(lb.digest))
        own.append(lb)
        changed = True
    bi = BenchImages(cache / "layout", base, own)
    if changed:
        for i in range(images + 1):
            add_image(layout, [*base, own[i]], bi.tag(i), label=str(i))
        meta.write_text(json.dumps({"base": [b.__dict__ for b in base], "own": [o.__dict__ for o in own]}))
    return bi


# -------------------------------------------------------------------------- sides
@dataclass
class Row:
    seconds: float
    revisions: int


@dataclass
class Side:
    name: str
    repo: Repository
    rows: dict[str, Row] = field(default_factory=dict)
    calls: dict[str, dict[str, list[float]]] = field(default_factory=dict)  # round -> command -> seconds


def wishlist(path: Path, refs: list[str], repo: str) -> str:
    lines = ["version: 1", "user: bench", f"cvmfs_repo: '{repo}'",
             "output_format: 'http://127.0.0.1:1/unused/$(image)'", "input:", *[f"  - '{r}'" for r in refs]]
    path.write_text("\n".join(lines) + "\n")
    return "/w/" + path.name


CALL = re.compile(r"cvmfs_server (\S+?)(?: [^:\n]*)?: took ([0-9.]+) s")


def run_ours(s0: Stratum0, side: Side, round_name: str, wl: str) -> None:
    log = f"/w/ours-{round_name}.log"
    cmd = (f"cd / && cvmfs-publisher convert {wl} --backend cvmfs --repository-root {side.repo.root} "
           f"--state-db /w/state/ours.db --log-level debug >{log} 2>&1")
    _timed(s0, side, round_name, cmd, log)
    calls: dict[str, list[float]] = defaultdict(list)
    for m in CALL.finditer((s0.host_w / Path(log).name).read_text(errors="replace")):
        calls[m.group(1)].append(float(m.group(2)))
    side.calls[round_name] = dict(calls)


def run_ours_gc(s0: Stratum0, side: Side, wl: str) -> None:
    """Drop half of the images: a convert of the shorter wishlist, then the publisher's gc."""
    log = "/w/ours-gc.log"
    cmd = (f"cd / && cvmfs-publisher convert {wl} --backend cvmfs --repository-root {side.repo.root} "
           f"--state-db /w/state/ours.db >{log} 2>&1 && sleep 1 && cvmfs-publisher gc --older-than 1s "
           f"--backend cvmfs --repository-root {side.repo.root} --state-db /w/state/ours.db >>{log} 2>&1")
    _timed(s0, side, "gc half", cmd, log)


def run_ducc(s0: Stratum0, side: Side, round_name: str, wl: str) -> None:
    log = f"/w/ducc-{round_name}.log"
    _timed(s0, side, round_name, f"cd /w/ducc-work && cvmfs_ducc convert -i {wl} >{log} 2>&1", log)


def _timed(s0: Stratum0, side: Side, round_name: str, cmd: str, log: str) -> None:
    rev0 = side.repo.revision()
    # timed inside the container: `podman exec` itself costs ~0.3 s, more under load
    r = s0.c.exec(f"t0=$(date +%s%N); ( {cmd} ); rc=$?; echo $(( $(date +%s%N) - t0 )) >/w/elapsed-ns; exit $rc",
                  check=False, timeout=7200)
    seconds = int((s0.host_w / "elapsed-ns").read_text()) / 1e9
    if r.returncode != 0:
        tail = (s0.host_w / Path(log).name).read_text(errors="replace")[-4000:]
        raise SystemExit(f"{side.name} {round_name} failed ({r.returncode}):\n{tail}")
    side.rows[round_name] = Row(seconds, side.repo.revision() - rev0)
    print(f"  {side.name:5} {round_name:10} {seconds:8.1f} s  {side.rows[round_name].revisions:4d} revisions",
          file=sys.stderr, flush=True)


def run_floor(s0: Stratum0, side: Side, round_name: str, blobs: list[LayerBlob]) -> None:
    """Every layer of `blobs` untarred into a dir of its own in one transaction, one publish."""
    names = " ".join(b.digest.split(":")[1] for b in blobs)
    log = f"/w/floor-{round_name}.log"
    cmd = (f"cd / && {{ set -e; cvmfs_server transaction {side.repo.name}\n"
           f"for h in {names}; do mkdir -p {side.repo.root}/{round_name}/$h; "
           f"tar -xzf /w/blobs/$h -C {side.repo.root}/{round_name}/$h; done\n"
           f"cvmfs_server publish {side.repo.name}; }} >{log} 2>&1")
    _timed(s0, side, round_name, cmd, log)


# -------------------------------------------------------------------------- report
def tree_files(imgs: BenchImages, n: int) -> tuple[int, int]:
    """Files in the round's layers, and in its chains and flat dirs (what the floor does not write)."""
    base = [b.files for b in imgs.base]
    layers = sum(base) + sum(o.files for o in imgs.own[:n])
    chains = sum(sum(base[:k + 1]) for k in range(len(base)))
    tops = sum(sum(base) + o.files for o in imgs.own[:n])
    return layers, chains + 2 * tops


def report(rounds: list[str], ours: Side, ducc: Side | None, floor: Side, n: int, imgs: BenchImages) -> None:
    layers, trees = tree_files(imgs, n)
    print(f"\n{n} images, {machine()}")
    print(f"first round: {layers} files in the layers (the floor publishes these), {trees} more in the "
          f"chains and flat dirs")
    head = f"{'round':10} | {'ours s':>8} {'revs':>5} | {'DUCC s':>8} {'revs':>5} | {'floor s':>8} | ours/DUCC | ours/floor"
    print(head)
    print("-" * len(head))
    for r in rounds:
        o = ours.rows.get(r)
        d = ducc.rows.get(r) if ducc else None
        f = floor.rows.get(r)
        cells = [f"{r:10}", f"{o.seconds:8.1f} {o.revisions:5d}" if o else f"{'':8} {'':5}",
                 f"{d.seconds:8.1f} {d.revisions:5d}" if d else f"{'-':>8} {'':5}",
                 f"{f.seconds:8.1f}" if f else f"{'-':>8}",
                 f"{o.seconds / d.seconds:8.2f}x" if o and d else f"{'-':>9}",
                 f"{o.seconds / f.seconds:9.2f}x" if o and f else f"{'-':>10}"]
        print(" | ".join(cells))
    print("\nours: cvmfs_server calls per round (count, seconds)")
    for r, calls in ours.calls.items():
        total = sum(sum(v) for v in calls.values())
        parts = ", ".join(f"{c} {len(v)}x {sum(v):.1f}s" for c, v in sorted(calls.items()))
        print(f"  {r:10} {parts}  (sum {total:.1f} s of {ours.rows[r].seconds:.1f} s)")


def main() -> None:
    ap = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    ap.add_argument("--images", type=int, default=20)
    ap.add_argument("--base-layers", type=int, default=8)
    ap.add_argument("--base-mb", type=float, default=80)
    ap.add_argument("--own-kb", type=float, default=200)
    ap.add_argument("--no-ducc", action="store_true", help="ours and the floor only")
    ap.add_argument("--keep", action="store_true", help="keep the container's work dir (logs in w/)")
    ap.add_argument("--gc", action="store_true", help="then drop half the images: convert + gc (ours only: "
                    "DUCC's garbage-collection takes no wishlist)")
    args = ap.parse_args()
    require_root()
    n = args.images
    print(f"images: {n} + 1, base {args.base_layers} layers / {args.base_mb:g} MB, own {args.own_kb:g} kB",
          file=sys.stderr)
    imgs = make_images(n, args.base_layers, args.base_mb, args.own_kb)
    dist = find_distribution()
    ducc_tar = dist.path.parent / "ducc" / DUCC_TARBALL
    if not args.no_ducc and not ducc_tar.is_file():
        raise SystemExit(f"no DUCC at {ducc_tar} (or run with --no-ducc)")
    base = new_workdir("cvmfs-b-")
    c = None
    try:
        with CachedRegistry(CACHE / "registry") as reg:
            for i in range(n + 1):
                reg.push_layout(imgs.layout, imgs.tag(i), imgs.name(i), "v1")
            # --init: DUCC's cvmfs_server calls orphan ~1 process each; under `sleep` as PID 1
            # their zombies fill the container's pids limit (2048) within one round
            c = start_container(bookworm_spec(dist), base, "s0-", init=True)
            s0 = Stratum0(c).boot()
            w = s0.host_w
            (w / "blobs").mkdir()
            (w / "state").mkdir()
            (w / "ducc-work").mkdir()
            for b in [*imgs.base, *imgs.own[:n + 1]]:
                h = b.digest.split(":")[1]
                (w / "blobs" / h).hardlink_to(imgs.layout / "blobs" / "sha256" / h)
            if not args.no_ducc:
                (w / DUCC_TARBALL).write_bytes(ducc_tar.read_bytes())
                s0.sh(f"tar -xJf /w/{DUCC_TARBALL} -C /usr/local/bin && cvmfs_ducc --help >/dev/null")
            ours = Side("ours", s0.mkfs("ours.bench.test"))
            ducc = None if args.no_ducc else Side("DUCC", s0.mkfs("ducc.bench.test"))
            floor = Side("floor", s0.mkfs("floor.bench.test"))
            refs = [f"http://{reg.host}/{imgs.name(i)}:v1" for i in range(n + 1)]
            sides = [ours] + ([ducc] if ducc else [])
            for side in sides:  # the wishlists, one per side and size
                tag = side.name.lower()
                wishlist(w / f"{tag}-n.yaml", refs[:n], side.repo.name)
                wishlist(w / f"{tag}-n1.yaml", refs[:n + 1], side.repo.name)
                wishlist(w / f"{tag}-half.yaml", refs[:(n + 1) // 2], side.repo.name)

            def one_round(round_name: str, wl_suffix: str, floor_blobs: list[LayerBlob] | None = None) -> None:
                run_ours(s0, ours, round_name, f"/w/ours-{wl_suffix}.yaml")
                if floor_blobs:
                    run_floor(s0, floor, round_name, floor_blobs)
                if ducc is not None:
                    run_ducc(s0, ducc, round_name, f"/w/ducc-{wl_suffix}.yaml")
                procs = s0.sh("ps -e -o stat= | grep -c '^Z' || true", check=False).stdout.strip()
                print(f"  (zombies in the container after the {round_name} round: {procs})", file=sys.stderr)

            one_round("first", "n", [*imgs.base, *imgs.own[:n]])
            one_round("no-change", "n")
            one_round("new-tag", "n1", [imgs.own[n]])
            rounds = ["first", "no-change", "new-tag"]
            if args.gc:
                run_ours_gc(s0, ours, "/w/ours-half.yaml")
                rounds.append("gc half")
            report(rounds, ours, ducc, floor, n, imgs)
            for side in sides:
                out = side.repo.check()
                print(f"cvmfs_server check {side.repo.name}: "
                      f"{'clean' if 'error' not in out.lower() else out[-500:]}")
    finally:
        if c is not None:
            c.stop()  # (stop_container would remove its work dir too)
        if args.keep:
            print(f"kept {base}", file=sys.stderr)
        else:
            remove_workdir(base)


if __name__ == "__main__":
    main()

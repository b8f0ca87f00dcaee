#!/usr/bin/env python3
"""Publishing into a real CernVM-FS 2.12 stratum 0: ours, DUCC and the floor, side by side.

    sudo CVMFS_TEST_SHARED_DIR=/work/shared .venv/bin/python bench/cvmfs_publish_bench.py
    sudo ... bench/cvmfs_publish_bench.py --images 20,200 --gc  # cost per image at two sizes, one run
    sudo ... bench/cvmfs_publish_bench.py --no-ducc             # ours and the floor only

One stratum 0 (tests/cvmfs/stratum0.py: the tier's Debian 12 container with CernVM-FS 2.12 and
DUCC from `$CVMFS_TEST_SHARED_DIR/ducc`), one loopback registry (storage cached under
bench/out/cvmfs-publish/), one repository per side. The images: --images images sharing one
--base-layers-layer base of --base-mb MB (generated, publib.write_layer) plus one layer of
--own-kb kB each, as site images share bases; image number N (one more) is the "new tag".
Several sizes (`--images 20,200`) run one after the other in the same container, each
into repositories of its own; DUCC only at sizes up to --ducc-max-images (its first round
of 20 images takes 2-30 min here, of 200 hours).

Rounds, each side in turn (ours: `cvmfs-publisher convert --backend cvmfs`; DUCC:
`cvmfs_ducc convert -i`):

  first       the wishlist of --images images into an empty repository
  no change   the same wishlist again
  new tag     the wishlist plus one image on the known base
  gc half     (--gc) drop the second half of the N+1 images. Ours: a convert of the shorter
              wishlist, then `cvmfs-publisher gc --older-than 0s`. DUCC (its convert never
              removes an image, and its `garbage-collection REPO` removes the .flat dirs no
              public link points at and the .layers no .metadata/**/manifest.json names, with
              `cvmfs_server ingest --delete`, 50 paths per revision): what an operator does,
              one transaction removing the dropped tags' public links and .metadata dirs, then
              `cvmfs_ducc garbage-collection REPO`. Every side counts the dirs left and the
              catalog entries removed (`list-catalogs -e`). At EVERY size (DUCC's own first
              round of 200 takes hours) DUCC's gc also runs on a repository of the same layout
              that ours filled with the same N+1 images ("DUCC gc"): same content, same drop.
  floor       every distinct layer of the round untarred in ONE transaction, one publish
              (for the first and the new-tag rounds): what no publisher can beat

Prints wall seconds and revisions per round and side, the ratios ours/DUCC and ours/floor
(same run), where our time went (the seconds per `cvmfs_server` command, from the backend's
debug log) and, with several sizes, the cost per image (per dropped image for gc) of each
size against the smallest's. Nothing is asserted.
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
    left: str = ""  # what gc left (flat, layer and chain dirs)
    removed: int = 0  # catalog entries gc removed


def wishlist(path: Path, refs: list[str], repo: str) -> str:
    lines = ["version: 1", "user: bench", f"cvmfs_repo: '{repo}'",
             "output_format: 'http://127.0.0.1:1/unused/$(image)'", "input:", *[f"  - '{r}'" for r in refs]]
    path.write_text("\n".join(lines) + "\n")
    return "/w/" + path.name


CALL = re.compile(r"cvmfs_server (\S+?)(?: [^:\n]*)?: took ([0-9.]+) s")


def _ours(side: Side, command: str, state_db: str, log: str, redirect: str = ">") -> str:
    """The shell command running ``cvmfs-publisher COMMAND`` on the side's repository."""
    return (f"cvmfs-publisher {command} --backend cvmfs --repository-root {side.repo.root} --state-db {state_db} "
            f"--log-level debug {redirect}{log} 2>&1")


def run_ours(s0: Stratum0, side: Side, round_name: str, wl: str, state_db: str) -> None:
    log = f"/w/{side.repo.name}-{round_name}.log"
    _timed(s0, side, round_name, "cd / && " + _ours(side, f"convert {wl}", state_db, log), log)
    _calls(s0, side, round_name, log)


def _calls(s0: Stratum0, side: Side, round_name: str, log: str) -> None:
    """The seconds of each cvmfs_server call the round's debug log records."""
    calls: dict[str, list[float]] = defaultdict(list)
    for m in CALL.finditer((s0.host_w / Path(log).name).read_text(errors="replace")):
        calls[m.group(1)].append(float(m.group(2)))
    side.calls[round_name] = dict(calls)


def run_ours_gc(s0: Stratum0, side: Side, wl: str, state_db: str) -> None:
    """Drop half of the images: a convert of the shorter wishlist, then the publisher's gc
    (`--older-than 0s`: no grace period, as DUCC's gc has none by default)."""
    log = f"/w/{side.repo.name}-gc.log"
    cmd = (f"cd / && {_ours(side, f'convert {wl}', state_db, log)} && "
           f"{_ours(side, 'gc --older-than 0s', state_db, log, '>>')}")
    _timed_gc(s0, side, cmd, log)
    _calls(s0, side, "gc half", log)


def run_ducc_gc(s0: Stratum0, side: Side, dropped: list[str]) -> None:
    """Drop images as a DUCC operator does: its convert never removes one, so one transaction
    removes their public links (<registry>/<repo>:<tag>) and `.metadata/<registry>/<repo>:<tag>`
    dirs (`rm` without -f: a path that is not there fails the round), then DUCC's gc removes
    the .flat dirs no link points at and the layers no manifest names."""
    repo = side.repo
    paths = " ".join(f"'{repo.root}/{d}' '{repo.root}/.metadata/{d}'" for d in dropped)
    log = f"/w/{repo.name}-gc.log"
    cmd = (f"cd / && {{ set -e; cvmfs_server transaction {repo.name}\n"
           f"for p in {paths}; do rm -r \"$p\"; done\n"
           f"cvmfs_server publish {repo.name}\n"
           f"cd /w/ducc-work && cvmfs_ducc garbage-collection {repo.name}; }} >{log} 2>&1")
    _timed_gc(s0, side, cmd, log)


def _timed_gc(s0: Stratum0, side: Side, cmd: str, log: str) -> None:
    """The gc round, and the catalog entries it removed."""
    before = catalog_entries(side.repo)
    _timed(s0, side, "gc half", cmd, log)
    side.removed = before - catalog_entries(side.repo)


def dropped(refs: list[str], n: int) -> list[str]:
    """The images every side's gc drops (the second half of the N+1), as public links and
    .metadata name them: <registry>/<repo>:<tag>."""
    return [r.split("://", 1)[1] for r in refs[(n + 1) // 2:n + 1]]


def run_ducc_gc_on_ours(s0: Stratum0, refs: list[str], run: "SizeRun") -> None:
    """DUCC's gc where its own first round takes hours: DUCC's garbage-collection on a repository
    of the same layout (links, .metadata/**/manifest.json, .flat, .layers, .chains) that ours
    published with the same N+1 images, dropping the same half as the other sides."""
    n = run.n
    side = run.ducc_gc_on_ours = Side("DUCC gc on ours' repository", s0.mkfs(f"duccgc{n}.bench.test"))
    wl = wishlist(s0.host_w / f"{side.repo.name}-n1.yaml", refs[:n + 1], side.repo.name)
    run_ours(s0, side, "fill", wl, f"/w/state/duccgc{n}.db")
    run_ducc_gc(s0, side, dropped(refs, n))
    side.left = left_after_gc(s0, side.repo)


def catalog_entries(repo: Repository) -> int:
    """Entries in all of the repository's catalogs (`list-catalogs -e`: no walk of the tree)."""
    out = repo.server("list-catalogs", "-e", "-x", repo.name).stdout
    return sum(int(m.group(1)) for m in re.finditer(r"^\s*(\d+)\s", out, re.M))


def left_after_gc(s0: Stratum0, repo: Repository) -> str:
    """What the repository still holds: flat dirs, layer dirs, chain dirs (catalog level)."""
    out = s0.sh(f"cd {repo.root} && for d in .flat .layers .chains; do "
                f"echo \"$d $(find $d -mindepth 2 -maxdepth 2 -type d 2>/dev/null | wc -l)\"; done").stdout
    return ", ".join(line for line in out.splitlines() if line)


def run_ducc(s0: Stratum0, side: Side, round_name: str, wl: str) -> None:
    log = f"/w/{side.repo.name}-{round_name}.log"
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
    print(f"  {side.repo.name:22} {round_name:10} {seconds:8.1f} s  {side.rows[round_name].revisions:4d} revisions",
          file=sys.stderr, flush=True)


def run_floor(s0: Stratum0, side: Side, round_name: str, blobs: list[LayerBlob]) -> None:
    """Every layer of `blobs` untarred into a dir of its own in one transaction, one publish."""
    names = " ".join(b.digest.split(":")[1] for b in blobs)
    log = f"/w/{side.repo.name}-{round_name}.log"
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


def report(rounds: list[str], ours: Side, ducc: Side | None, floor: Side, n: int, imgs: BenchImages,
           ducc_gc: Side | None = None) -> None:
    layers, trees = tree_files(imgs, n)
    print(f"\n{n} images, {machine()}, load average {' '.join(open('/proc/loadavg').read().split()[:3])}")
    print(f"first round: {layers} files in the layers (the floor publishes these), {trees} more in the "
          f"chains and flat dirs")
    head = f"{'round':10} | {'ours s':>8} {'revs':>5} | {'DUCC s':>8} {'revs':>5} | {'floor s':>8} | ours/DUCC | ours/floor"
    print(head)
    print("-" * len(head), flush=True)
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
    for side in (ours, ducc, ducc_gc):
        if side is not None and side.left:
            print(f"{side.name} after gc: {side.left}; {side.removed} catalog entries removed in "
                  f"{side.rows['gc half'].seconds:.1f} s ({1e3 * side.rows['gc half'].seconds / max(side.removed, 1):.3f} ms "
                  f"per entry), {side.rows['gc half'].revisions} revisions")
    o = ours.rows.get("gc half")
    for peer in (ducc, ducc_gc):
        d = peer.rows.get("gc half") if peer is not None else None
        if o and d and peer is not None:
            print(f"gc half, ours / {peer.name}: {o.seconds / d.seconds:.2f}x the time; per entry removed "
                  f"{(o.seconds / max(ours.removed, 1)) / (d.seconds / max(peer.removed, 1)):.2f}x")
    sys.stdout.flush()


def per_image(r: str, n: int) -> int:
    """What a round's seconds are divided by: its images (gc: the dropped ones)."""
    return {"first": n, "no-change": n, "new-tag": 1, "gc half": (n + 1) - (n + 1) // 2}[r]


def report_scaling(sizes: list[int], runs: "dict[int, SizeRun]", rounds: list[str]) -> None:
    """Seconds per image at each size, and each size's against the smallest's (same run)."""
    small = sizes[0]
    print(f"\nseconds per image (gc: per dropped image; new tag: the round), against {small} images")
    for name in ("ours", "floor", "DUCC", "DUCC gc"):
        for r in rounds:
            cells = []
            for n in sizes:
                side = runs[n].side(name)
                row = side.rows.get(r) if side else None
                if row is None:
                    cells.append(f"{n}: -")
                    continue
                cost = row.seconds / per_image(r, n)
                base_side = runs[small].side(name)
                base = base_side.rows.get(r) if base_side else None
                ratio = f" ({cost / (base.seconds / per_image(r, small)):.2f}x)" if base and n != small else ""
                cells.append(f"{n}: {cost:7.3f} s, {row.revisions} rev{ratio}")
            if any(not c.endswith(": -") for c in cells):
                print(f"  {name:7} {r:10} " + " | ".join(cells))
    sys.stdout.flush()


@dataclass
class SizeRun:
    n: int
    ours: Side
    floor: Side
    ducc: Side | None
    rounds: list[str] = field(default_factory=list)
    ducc_gc_on_ours: Side | None = None  # DUCC's gc on a repository ours filled (run_ducc_gc_on_ours)

    def side(self, name: str) -> Side | None:
        return {"ours": self.ours, "floor": self.floor, "DUCC": self.ducc, "DUCC gc": self.ducc_gc_on_ours}[name]


def start_size(s0: Stratum0, refs: list[str], n: int, with_ducc: bool) -> SizeRun:
    """Repositories and wishlists of one size, one repository per side."""
    w = s0.host_w
    run = SizeRun(n, Side("ours", s0.mkfs(f"ours{n}.bench.test")), Side("floor", s0.mkfs(f"floor{n}.bench.test")),
                  Side("DUCC", s0.mkfs(f"ducc{n}.bench.test")) if with_ducc else None)
    half = (n + 1) // 2
    for side in [run.ours] + ([run.ducc] if run.ducc else []):
        wishlist(w / f"{side.repo.name}-n.yaml", refs[:n], side.repo.name)
        wishlist(w / f"{side.repo.name}-n1.yaml", refs[:n + 1], side.repo.name)
        wishlist(w / f"{side.repo.name}-half.yaml", refs[:half], side.repo.name)
    return run


def run_ours_and_floor(s0: Stratum0, imgs: BenchImages, run: SizeRun, gc: bool) -> None:
    n = run.n
    state_db = f"/w/state/ours{n}.db"
    rounds = [("first", "n", [*imgs.base, *imgs.own[:n]]), ("no-change", "n", None), ("new-tag", "n1", [imgs.own[n]])]
    for round_name, wl_suffix, floor_blobs in rounds:
        run_ours(s0, run.ours, round_name, f"/w/{run.ours.repo.name}-{wl_suffix}.yaml", state_db)
        if floor_blobs:
            run_floor(s0, run.floor, round_name, floor_blobs)
    run.rounds = [r for r, _, _ in rounds]
    if gc:
        run_ours_gc(s0, run.ours, f"/w/{run.ours.repo.name}-half.yaml", state_db)
        run.ours.left = left_after_gc(s0, run.ours.repo)
        run.rounds.append("gc half")


def run_ducc_rounds(s0: Stratum0, refs: list[str], run: SizeRun, gc: bool) -> None:
    """DUCC's rounds at one size, after ours (its first round alone can take half an hour
    here: the other sides' figures are in before it starts)."""
    assert run.ducc is not None
    n = run.n
    for round_name, wl_suffix in (("first", "n"), ("no-change", "n"), ("new-tag", "n1")):
        run_ducc(s0, run.ducc, round_name, f"/w/{run.ducc.repo.name}-{wl_suffix}.yaml")
        procs = s0.sh("ps -e -o stat= | grep -c '^Z' || true", check=False).stdout.strip()
        print(f"  (zombies in the container after DUCC's {round_name} round: {procs})", file=sys.stderr)
    if gc:
        run_ducc_gc(s0, run.ducc, dropped(refs, n))
        run.ducc.left = left_after_gc(s0, run.ducc.repo)


def check_clean(run: SizeRun) -> None:
    for side in [run.ours, run.ducc, run.ducc_gc_on_ours]:
        if side is None:
            continue
        out = side.repo.check()
        print(f"cvmfs_server check {side.repo.name}: {'clean' if 'error' not in out.lower() else out[-500:]}",
              flush=True)


def main() -> None:
    ap = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    ap.add_argument("--images", default="20", help="images per round; several sizes comma-separated (20,200)")
    ap.add_argument("--base-layers", type=int, default=8)
    ap.add_argument("--base-mb", type=float, default=80)
    ap.add_argument("--own-kb", type=float, default=200)
    ap.add_argument("--no-ducc", action="store_true", help="ours and the floor only")
    ap.add_argument("--ducc-max-images", type=int, default=20, help="DUCC only at sizes up to this")
    ap.add_argument("--keep", action="store_true", help="keep the container's work dir (logs in w/)")
    ap.add_argument("--gc", action="store_true", help="then drop half the images: ours convert + gc, DUCC "
                    "links and .metadata removed + its garbage-collection")
    args = ap.parse_args()
    require_root()
    sizes = sorted({int(x) for x in args.images.split(",")})
    top = sizes[-1]
    print(f"images: {','.join(map(str, sizes))} + 1, base {args.base_layers} layers / {args.base_mb:g} MB, "
          f"own {args.own_kb:g} kB", file=sys.stderr)
    imgs = make_images(top, args.base_layers, args.base_mb, args.own_kb)
    dist = find_distribution()
    ducc_tar = dist.path.parent / "ducc" / DUCC_TARBALL
    with_ducc = not args.no_ducc  # its rounds at sizes up to --ducc-max-images, its gc at every size
    if with_ducc and not ducc_tar.is_file():
        raise SystemExit(f"no DUCC at {ducc_tar} (or run with --no-ducc)")
    base = new_workdir("cvmfs-b-")
    c = None
    try:
        with CachedRegistry(CACHE / "registry") as reg:
            for i in range(top + 1):
                reg.push_layout(imgs.layout, imgs.tag(i), imgs.name(i), "v1")
            # --init: DUCC's cvmfs_server calls orphan ~1 process each; under `sleep` as PID 1
            # their zombies fill the container's pids limit (2048) within one round
            c = start_container(bookworm_spec(dist), base, "s0-", init=True)
            s0 = Stratum0(c).boot()
            w = s0.host_w
            (w / "blobs").mkdir()
            (w / "state").mkdir()
            (w / "ducc-work").mkdir()
            for b in [*imgs.base, *imgs.own[:top + 1]]:
                h = b.digest.split(":")[1]
                (w / "blobs" / h).hardlink_to(imgs.layout / "blobs" / "sha256" / h)
            if with_ducc:
                (w / DUCC_TARBALL).write_bytes(ducc_tar.read_bytes())
                s0.sh(f"tar -xJf /w/{DUCC_TARBALL} -C /usr/local/bin && cvmfs_ducc --help >/dev/null")
            refs = [f"http://{reg.host}/{imgs.name(i)}:v1" for i in range(top + 1)]
            runs = {n: start_size(s0, refs, n, with_ducc and n <= args.ducc_max_images) for n in sizes}
            for n in sizes:  # ours and the floor at every size, then DUCC
                print(f"-- {n} images: ours, the floor", file=sys.stderr)
                run_ours_and_floor(s0, imgs, runs[n], args.gc)
                if args.gc and with_ducc:
                    print(f"-- {n} images: DUCC's gc on a repository ours filled", file=sys.stderr)
                    run_ducc_gc_on_ours(s0, refs, runs[n])
                report(runs[n].rounds, runs[n].ours, None, runs[n].floor, n, imgs, runs[n].ducc_gc_on_ours)
            if len(sizes) > 1:
                report_scaling(sizes, runs, runs[sizes[0]].rounds)
            for n in sizes:
                if runs[n].ducc is not None:
                    print(f"-- {n} images: DUCC", file=sys.stderr)
                    run_ducc_rounds(s0, refs, runs[n], args.gc)
                    report(runs[n].rounds, runs[n].ours, runs[n].ducc, runs[n].floor, n, imgs, runs[n].ducc_gc_on_ours)
            for n in sizes:
                check_clean(runs[n])
    finally:
        if c is not None:
            c.stop()  # (stop_container would remove its work dir too)
        if args.keep:
            print(f"kept {base}", file=sys.stderr)
        else:
            remove_workdir(base)


if __name__ == "__main__":
    main()

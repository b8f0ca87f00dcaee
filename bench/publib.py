"""Helpers shared by the publisher benches: generated gzip layers (fixed seed), images
written into an OCI layout and pushed once into a registry storage cached under
bench/out/, timed child processes, peak RSS.

Import after `sys.path.insert(0, REPO)`; every bench script does that first."""
from __future__ import annotations

import hashlib
import io
import json
import os
import random
import resource
import shutil
import subprocess
import sys
import tarfile
import threading
import time
from contextlib import contextmanager
from dataclasses import asdict, dataclass
from pathlib import Path
from typing import Iterator, Sequence

from bench.benchlib import OUT, REPO
from tests.fixtures.images import host_arch
from tests.fixtures.layers import MTIME
from tests.fixtures.oci_layout import (
    CREATED, MT_CONFIG, MT_LAYER_GZIP, MT_MANIFEST, OciLayout, Platform, canonical_json,
)
from tests.fixtures.registry import Registry

WORDS = ("layer container image overlay whiteout chain digest manifest registry publish "
         "snapshot mount tarball gzip repository stratum catalog kernel inode xattr").split()
FILES_PER_DIR = 200
PUBLISHER = REPO / ".venv" / "bin" / "cvmfs-publisher"


# -------------------------------------------------------------------------- layers
@dataclass
class LayerBlob:
    digest: str        # sha256:... of the gzip blob
    diff_id: str       # sha256:... of the tar
    size: int          # blob bytes
    tar_size: int
    files: int
    data_bytes: int


class _Hashing:
    def __init__(self, out) -> None:
        self.out, self.sha, self.size = out, hashlib.sha256(), 0

    def write(self, data) -> int:
        self.sha.update(data)
        self.size += len(data)
        return self.out.write(data)

    def flush(self) -> None:
        self.out.flush()


def write_layer(path: Path, data_bytes: int, seed: int, prefix: str, files_per_mb: float = 20) -> LayerBlob:
    """A gzip layer (gzip -6, as `docker build` writes them) of `data_bytes` in files the
    way images hold them: ~20 files per MB (like a distribution image), 80% of them small
    (up to 16 KiB), the rest sharing what is left, a few large; half random bytes, half
    compressible text; 200 files per directory, all below `prefix/`."""
    rng = random.Random(seed)
    text = " ".join(rng.choice(WORDS) for _ in range(600_000)).encode()
    files = max(int(data_bytes / (1 << 20) * files_per_mb), 1)
    small = int(files * 0.8)
    sizes = [rng.randint(0, 16 << 10) for _ in range(small)]
    rest = max(data_bytes - sum(sizes), 0)
    weights = [rng.random() ** 3 for _ in range(files - small)]
    scale = rest / sum(weights) if weights else 0
    sizes += [int(w * scale) for w in weights]
    rng.shuffle(sizes)
    path.parent.mkdir(parents=True, exist_ok=True)
    # gzip(1) in its own process: compressing overlaps with generating (2 cores)
    with path.open("wb") as out:
        gz = subprocess.Popen(["gzip", "-6", "-n", "-c"], stdin=subprocess.PIPE, stdout=out)
        assert gz.stdin is not None
        diff = _Hashing(gz.stdin)
        with tarfile.open(fileobj=diff, mode="w|", format=tarfile.PAX_FORMAT, bufsize=1 << 20) as tf:
            def add_dir(name: str) -> None:
                ti = tarfile.TarInfo(name)
                ti.type, ti.mode, ti.mtime = tarfile.DIRTYPE, 0o755, MTIME
                tf.addfile(ti)
            add_dir(prefix)
            for n, size in enumerate(sizes):
                d = f"{prefix}/d{n // FILES_PER_DIR:04d}"
                if n % FILES_PER_DIR == 0:
                    add_dir(d)
                if rng.random() < 0.5:
                    data = rng.randbytes(size)
                else:
                    start = rng.randint(0, len(text) - size - 1) if size < len(text) - 1 else 0
                    data = text[start:start + size]
                ti = tarfile.TarInfo(f"{d}/f{n:06d}")
                ti.size, ti.mode, ti.mtime = len(data), rng.choice((0o644, 0o644, 0o755)), MTIME
                ti.uid = ti.gid = rng.choice((0, 0, 1000))
                tf.addfile(ti, io.BytesIO(data))
        gz.stdin.close()
        if gz.wait() != 0:
            raise RuntimeError("gzip failed")
    return LayerBlob(sha256_file(path), "sha256:" + diff.sha.hexdigest(), path.stat().st_size,
                     diff.size, files, sum(sizes))


def sha256_file(path: Path) -> str:
    h = hashlib.sha256()
    with path.open("rb") as f:
        while chunk := f.read(1 << 20):
            h.update(chunk)
    return "sha256:" + h.hexdigest()


# -------------------------------------------------------------------------- images
@dataclass
class CachedImage:
    name: str                  # repository, e.g. "bench/ingest-one"
    tag: str
    layers: list[LayerBlob]

    @property
    def blob_bytes(self) -> int:
        return sum(l.size for l in self.layers)

    @property
    def data_bytes(self) -> int:
        return sum(l.data_bytes for l in self.layers)

    @property
    def files(self) -> int:
        return sum(l.files for l in self.layers)


def add_image(layout: OciLayout, layers: Sequence[LayerBlob], tag: str, label: str = "") -> None:
    """Config + manifest for layers already in the layout's blobs; tag it."""
    platform = Platform("linux", host_arch())
    cfg = {
        "created": CREATED, **platform.as_json(),
        "config": {"Cmd": ["/bin/sh"], **({"Labels": {"bench": label}} if label else {})},
        "rootfs": {"type": "layers", "diff_ids": [l.diff_id for l in layers]},
        "history": [{"created": CREATED, "created_by": f"bench layer {i}"} for i in range(len(layers))],
    }
    cfg_desc = layout.write_blob(canonical_json(cfg), MT_CONFIG)
    manifest = {"schemaVersion": 2, "mediaType": MT_MANIFEST, "config": cfg_desc.as_json(),
                "layers": [{"mediaType": MT_LAYER_GZIP, "digest": l.digest, "size": l.size} for l in layers]}
    layout.tag(tag, layout.write_blob(canonical_json(manifest), MT_MANIFEST, platform))


def generated_image(cache: Path, name: str, layer_bytes: Sequence[int], seed: int) -> CachedImage:
    """An image of generated layers in the OCI layout `cache/layout`, cached: the layers'
    descriptions are kept in `cache/<tag>.json`, written last."""
    tag = "v1"
    meta = cache / f"{name.replace('/', '_')}.json"
    if meta.is_file():
        d = json.loads(meta.read_text())
        return CachedImage(d["name"], d["tag"], [LayerBlob(**l) for l in d["layers"]])
    layout = OciLayout(cache / "layout")
    layers = []
    for i, nbytes in enumerate(layer_bytes):
        t0 = time.perf_counter()
        tmp = cache / f"layer-{i}.tmp"
        lb = write_layer(tmp, nbytes, seed * 1000 + i, f"{name.split('/')[-1]}-{i}")
        os.replace(tmp, layout.blob_path(lb.digest))
        layers.append(lb)
        print(f"  generated layer {i}: {lb.files} files, {lb.data_bytes / 1e6:.0f} MB of data, "
              f"blob {lb.size / 1e6:.0f} MB in {time.perf_counter() - t0:.1f}s", file=sys.stderr)
    add_image(layout, layers, name.replace("/", "-"))
    img = CachedImage(name, tag, layers)
    meta.write_text(json.dumps({"name": name, "tag": tag, "layers": [asdict(l) for l in layers]}))
    return img


class CachedRegistry:
    """A docker-registry whose storage lives in `dir` (kept between runs); images pushed
    into it are remembered in `dir/pushed`."""

    def __init__(self, dir: Path) -> None:
        self.dir = dir
        self.registry = Registry(dir / "registry")
        self._pushed = dir / "pushed"

    def __enter__(self) -> "CachedRegistry":
        self.registry.start()
        return self

    def __exit__(self, *exc: object) -> None:
        self.registry.stop()

    @property
    def host(self) -> str:
        return self.registry.host

    def pushed(self) -> set[str]:
        return set(self._pushed.read_text().split()) if self._pushed.exists() else set()

    def mark_pushed(self, names: Sequence[str]) -> None:
        with self._pushed.open("a") as f:
            f.write("".join(f"{n}\n" for n in names))

    def push_layout(self, layout_dir: Path, src_tag: str, name: str, tag: str) -> None:
        """skopeo copy from the OCI layout, once."""
        key = f"{name}:{tag}"
        if key in self.pushed():
            return
        t0 = time.perf_counter()
        subprocess.run(["skopeo", "copy", "--quiet", "--dest-tls-verify=false",
                        f"oci:{layout_dir}:{src_tag}", f"docker://{self.host}/{key}"],
                       check=True, capture_output=True, text=True)
        print(f"  pushed {key} in {time.perf_counter() - t0:.1f}s", file=sys.stderr)
        self.mark_pushed([key])

    def blob_file(self, digest: str) -> Path:
        return self.registry.blob_data_path(digest)


# -------------------------------------------------------------------------- measuring
@dataclass
class Timed:
    seconds: float
    user: float
    sys: float
    maxrss_kib: int = 0       # of this child alone (measured through a wrapper)
    out: str = ""

    @property
    def cpu(self) -> float:
        return self.user + self.sys


def run_timed(cmd: Sequence[str] | str, *, shell: bool = False, env: dict | None = None,
              check: bool = True) -> Timed:
    """Wall and CPU time (user + sys of the child and its children) of one command."""
    r0 = resource.getrusage(resource.RUSAGE_CHILDREN)
    t0 = time.perf_counter()
    res = subprocess.run(cmd, shell=shell, env=env, capture_output=True, text=True)
    seconds = time.perf_counter() - t0
    r1 = resource.getrusage(resource.RUSAGE_CHILDREN)
    if check and res.returncode != 0:
        raise RuntimeError(f"{cmd} failed ({res.returncode}):\n{res.stdout[-3000:]}\n{res.stderr[-3000:]}")
    return Timed(seconds, r1.ru_utime - r0.ru_utime, r1.ru_stime - r0.ru_stime, 0, res.stdout + res.stderr)


class RssPoller:
    """Polls VmRSS of a process (and its children's, summed) every `interval` seconds."""

    def __init__(self, pid: int, interval: float = 0.02) -> None:
        self.pid, self.interval, self.peak_kib, self.samples = pid, interval, 0, 0
        self._stop = threading.Event()
        self._thread = threading.Thread(target=self._run, daemon=True)

    def __enter__(self) -> "RssPoller":
        self._thread.start()
        return self

    def __exit__(self, *exc: object) -> None:
        self._stop.set()
        self._thread.join()

    def _run(self) -> None:
        while not self._stop.is_set():
            try:
                status = Path(f"/proc/{self.pid}/status").read_text()
            except OSError:
                return
            for line in status.splitlines():
                if line.startswith("VmRSS:"):
                    self.peak_kib = max(self.peak_kib, int(line.split()[1]))
                    self.samples += 1
            self._stop.wait(self.interval)


@contextmanager
def scratch_fs(size_gib: float, use_dir: Path | None = None, name: str | None = None) -> Iterator[Path]:
    """Where the benches write: a fresh ext4 (with a journal, as a release manager's disk
    has) in an image file under bench/out, loop-mounted for this run only.

    Why not the machine's own file system: this VM's root is ext4 WITHOUT a journal, where
    the inode allocator skips inodes deleted in the last 60-360 s (`recently_deleted()`,
    which perf shows at >50% of `tar -xzf`'s time after a few rounds), so creating a file
    gets slower with every tree a bench removed, and whichever side runs after a removal
    loses: run-to-run swings of 4x. `use_dir` (--scratch-dir) writes there instead."""
    if use_dir is not None:
        use_dir.mkdir(parents=True, exist_ok=True)
        yield use_dir
        return
    OUT.mkdir(parents=True, exist_ok=True)
    name = f"scratch-fs-{name or Path(sys.argv[0]).stem}"  # one per bench (script): two may run at once
    image, mnt = OUT / f"{name}.img", OUT / name
    subprocess.run(["umount", str(mnt)], capture_output=True)  # left over by an interrupted run
    image.unlink(missing_ok=True)
    with image.open("wb") as f:  # allocated up front: the first side must not pay for it
        os.posix_fallocate(f.fileno(), 0, int(size_gib * (1 << 30)))
    subprocess.run(["mkfs.ext4", "-q", "-F", "-E", "lazy_itable_init=0,lazy_journal_init=0", str(image)],
                   check=True, capture_output=True)
    mnt.mkdir(exist_ok=True)
    res = subprocess.run(["mount", "-o", "loop", str(image), str(mnt)], capture_output=True, text=True)
    if res.returncode != 0:
        image.unlink(missing_ok=True)
        raise RuntimeError(f"cannot loop-mount a scratch ext4 ({res.stderr.strip()}); use --scratch-dir DIR")
    try:
        yield mnt
    finally:
        subprocess.run(["umount", str(mnt)], capture_output=True)
        image.unlink(missing_ok=True)


def own_peak_rss_kib() -> int:
    """VmHWM of this process. Not ru_maxrss: Linux carries the parent's RSS at fork into
    the child's ru_maxrss across exec, so a child of a big bench process would report
    the parent's size."""
    for line in Path("/proc/self/status").read_text().splitlines():
        if line.startswith("VmHWM:"):
            return int(line.split()[1])
    return resource.getrusage(resource.RUSAGE_SELF).ru_maxrss


def fresh_dir(path: Path) -> Path:
    if path.exists():
        shutil.rmtree(path)
    path.mkdir(parents=True)
    return path


def remove(path: Path) -> None:
    """Remove a tree and write back the removal, so the next side starts from a quiet disk."""
    shutil.rmtree(path, ignore_errors=True)
    os.sync()


def median(values: Sequence[float]) -> float:
    import statistics
    return statistics.median(values)


def wishlist_yaml(refs: Sequence[str], repo_name: str = "bench.cern.ch") -> str:
    lines = ["version: 1", "user: bench", f"cvmfs_repo: '{repo_name}'",
             "output_format: 'http://127.0.0.1:1/unused/$(image)'", "input:"]
    lines += [f"  - '{r}'" for r in refs]
    return "\n".join(lines) + "\n"


def publisher_cmd(*args: str) -> list[str]:
    return [str(PUBLISHER), *args]


__all__ = ["OUT", "REPO", "LayerBlob", "CachedImage", "CachedRegistry", "Timed", "RssPoller",
           "write_layer", "generated_image", "add_image", "run_timed", "fresh_dir", "remove",
           "median", "wishlist_yaml", "publisher_cmd", "sha256_file", "scratch_fs", "own_peak_rss_kib"]

"""A big test image built locally from a fixed seed (coldstart_bench.py caches it under
bench/out/): the fixtures' static-busybox root as the first layer, then N layers of
generated files (half random bytes, half compressible text), written straight into an
OCI image layout without holding a layer in memory."""
from __future__ import annotations

import gzip
import hashlib
import io
import json
import os
import random
import shutil
import tarfile
from dataclasses import dataclass, fields
from pathlib import Path
from typing import BinaryIO

from tests.fixtures.images import busybox_entries, host_arch
from tests.fixtures.layers import MTIME, Layer
from tests.fixtures.oci_layout import (
    CREATED, MT_CONFIG, MT_LAYER_GZIP, MT_MANIFEST, ImageConfig, OciLayout, Platform, canonical_json,
)

WORDS = ("layer container image overlay whiteout chain digest manifest registry publish "
         "snapshot mount tarball gzip repository stratum catalog kernel inode xattr").split()
FILES_PER_DIR = 200


@dataclass(frozen=True)
class Spec:
    """What to build; the cache directory is named after it."""
    size_gib: float = 1.0
    files: int = 20_000
    layers: int = 5  # generated layers, on top of the busybox layer
    seed: int = 1

    @property
    def name(self) -> str:
        return f"img-{self.size_gib:g}g-{self.files}f-{self.layers}l-s{self.seed}"


@dataclass
class BigImage:
    """What publish_layers and the benches need to know of the built image."""
    name: str
    tag: str
    layers: list[str]      # compressed blob digests, bottom first
    diff_ids: list[str]
    unpacked_bytes: int
    files: int             # tar entries: files and directories
    blob_bytes: int
    host: str = ""

    @property
    def ref(self) -> str:
        return f"{self.host}/{self.name}:{self.tag}"

    def chain_ids(self) -> list[str]:
        out: list[str] = []
        for d in self.diff_ids:
            out.append(d if not out else "sha256:" + hashlib.sha256(f"{out[-1]} {d}".encode()).hexdigest())
        return out

    def to_json(self) -> str:
        return json.dumps({k: v for k, v in self.__dict__.items() if k != "host"}, indent=1)

    @classmethod
    def from_json(cls, text: str) -> "BigImage":
        known = {f.name for f in fields(cls)}
        return cls(**{k: v for k, v in json.loads(text).items() if k in known})


class _HashingWriter:
    """Counts and hashes what passes through to `out` (for the diffID and the blob digest)."""

    def __init__(self, out: BinaryIO) -> None:
        self.out, self.sha, self.size = out, hashlib.sha256(), 0

    def write(self, data: bytes) -> int:
        self.sha.update(data)
        self.size += len(data)
        return self.out.write(data)

    def flush(self) -> None:
        self.out.flush()


def _generated_layer(path: Path, rng: random.Random, text: bytes, index: int, files: int,
                     data_bytes: int) -> tuple[str, str, int]:
    """Write one gzip layer of `files` files holding `data_bytes` in all: 80% small files
    (up to 16 KiB), the rest sharing what is left. Returns (digest, diffID, tar size)."""
    small = int(files * 0.8)
    small_sizes = [rng.randint(0, 16 << 10) for _ in range(small)]
    rest = max(data_bytes - sum(small_sizes), 0)
    big = files - small
    weights = [rng.random() ** 3 for _ in range(big)]  # skewed: a few large files
    scale = rest / sum(weights) if weights else 0
    sizes = small_sizes + [int(w * scale) for w in weights]
    rng.shuffle(sizes)
    with path.open("wb") as raw:
        blob = _HashingWriter(raw)
        with gzip.GzipFile(fileobj=blob, mode="wb", compresslevel=6, mtime=0) as gz:
            diff = _HashingWriter(gz)
            with tarfile.open(fileobj=diff, mode="w|", format=tarfile.PAX_FORMAT, bufsize=1 << 20) as tf:
                top = tarfile.TarInfo(f"data{index}")
                top.type, top.mode, top.mtime = tarfile.DIRTYPE, 0o755, MTIME
                tf.addfile(top)
                for n, size in enumerate(sizes):
                    d = f"data{index}/d{n // FILES_PER_DIR:04d}"
                    if n % FILES_PER_DIR == 0:
                        ti = tarfile.TarInfo(d)
                        ti.type, ti.mode, ti.mtime = tarfile.DIRTYPE, 0o755, MTIME
                        tf.addfile(ti)
                    if rng.random() < 0.5:
                        data = rng.randbytes(size)
                    else:
                        start = rng.randint(0, len(text) - size - 1) if size < len(text) - 1 else 0
                        data = text[start:start + size]
                    ti = tarfile.TarInfo(f"{d}/f{n:06d}")
                    ti.size, ti.mode, ti.mtime = len(data), 0o644, MTIME
                    tf.addfile(ti, io.BytesIO(data))
        diff_digest = "sha256:" + diff.sha.hexdigest()
        tar_size = diff.size
    return "sha256:" + blob.sha.hexdigest(), diff_digest, tar_size


def build_layout(root: Path, spec: Spec, tag: str = "v1") -> BigImage:
    """The OCI layout under `root` (replaced), with the image tagged `tag`."""
    if root.exists():
        shutil.rmtree(root)
    layout = OciLayout(root)
    rng = random.Random(spec.seed)
    text = " ".join(rng.choice(WORDS) for _ in range(600_000)).encode()
    base = Layer.from_entries(busybox_entries())
    base_desc = layout.write_blob(base.blob, MT_LAYER_GZIP)
    digests, diff_ids, sizes = [base_desc.digest], [base.diff_id], [len(base.blob)]
    unpacked = len(base.tar)
    per_layer_files = max(spec.files // spec.layers, 1)
    per_layer_bytes = int(spec.size_gib * (1 << 30)) // spec.layers
    for i in range(spec.layers):
        tmp = root / f"layer-{i}.tmp"
        digest, diff_id, tar_size = _generated_layer(tmp, rng, text, i, per_layer_files, per_layer_bytes)
        size = tmp.stat().st_size
        os.rename(tmp, layout.blob_path(digest))
        digests.append(digest)
        diff_ids.append(diff_id)
        sizes.append(size)
        unpacked += tar_size
    platform = Platform("linux", host_arch())
    config = ImageConfig(cmd=["/bin/true"], platform=platform)
    cfg = {
        "created": CREATED, **platform.as_json(),
        "config": {"Cmd": config.cmd, "Env": config.env, "WorkingDir": config.working_dir},
        "rootfs": {"type": "layers", "diff_ids": diff_ids},
        "history": [{"created": CREATED, "created_by": f"bench layer {i}"} for i in range(len(diff_ids))],
    }
    cfg_desc = layout.write_blob(canonical_json(cfg), MT_CONFIG)
    manifest = {"schemaVersion": 2, "mediaType": MT_MANIFEST, "config": cfg_desc.as_json(),
                "layers": [{"mediaType": MT_LAYER_GZIP, "digest": d, "size": s} for d, s in zip(digests, sizes)]}
    layout.tag(tag, layout.write_blob(canonical_json(manifest), MT_MANIFEST, platform))
    files = len(busybox_entries()) + spec.layers * (per_layer_files + 1 + -(-per_layer_files // FILES_PER_DIR))
    return BigImage("bench/big", tag, digests, diff_ids, unpacked, files, sum(sizes))

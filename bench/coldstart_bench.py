#!/usr/bin/env python3
"""Cold start of an image whose layers are all in the repository:
`cvmfs-snapshotter pull` + `ctr run` vs plain `ctr image pull` + `ctr run` with overlayfs,
and vs a warm run of the already-unpacked image. The pull command runs three times per
round: through the snapshotter daemon's control socket (the default) with the tag's
manifest and config in the repository's `.metadata/` as the publisher leaves them (one HEAD
at the registry), the same without them (`cvmfs-nometa`: manifest and config GETs), and
in-process (`--local`, which resolves at the registry).

    sudo .venv/bin/python bench/coldstart_bench.py                 # 1 GiB, 20 000 files, 5+1 layers
    sudo .venv/bin/python bench/coldstart_bench.py --size-gb 0.1   # quick: 100 MiB, 2 000 files

The image (fixed seed: the fixtures' static busybox as the bottom layer, then --layers
generated layers), a registry storage holding it and a repository holding its unpacked
layers (tests/e2e/repo_writer.publish_layers, i.e. the publisher's unpacker) are built
once and cached under bench/out/. Every cold run gets a containerd with an empty root of
its own (and, on our side, a snapshotter with an empty root); only the timed commands
are timed, not starting the daemons. --drop-caches drops the page cache before each cold
run (the whole machine's: other work slows down for a moment).
A third side (skip with --no-cri) is Kubernetes' path: a CRI PullImage through
containerd's CRI plugin (its unpacker asks our snapshotter for every layer) from an
already-connected client, as the kubelet is, then `ctr run` in CRI's namespace.
Prints the ratios LAST (targets: >= 20x faster than the overlayfs pull; <= 1.5x a warm run).
Nothing is asserted.
"""
from __future__ import annotations

import argparse
import os
import resource
import statistics
import subprocess
import sys
import time
import uuid
from dataclasses import dataclass
from pathlib import Path

sys.path.insert(0, str(Path(__file__).resolve().parents[1]))

import grpc  # noqa: E402

from bench.benchlib import OUT, compiled_bytecode, drop_caches, machine, require_root, run, workdir  # noqa: E402
from bench.bigimage import BigImage, Spec, build_layout  # noqa: E402
from cvmfs_common.repo.paths import RepositoryLayout  # noqa: E402
from tests.e2e.repo_writer import publish_layers  # noqa: E402
from cvmfs_api.cri.runtime.v1 import api_pb2, api_pb2_grpc  # noqa: E402
from tests.fixtures.containerd import Containerd, CriOptions  # noqa: E402
from tests.fixtures.registry import Registry  # noqa: E402
from tests.fixtures.snapshotter import SnapshotterProcess, snapshotter_command  # noqa: E402

CMD = "/bin/true"


@dataclass
class Inputs:
    image: BigImage
    registry: Registry
    repository: Path


def prepare_inputs(spec: Spec, out: Path) -> Inputs:
    """Build (or reuse) the image, push it to a registry with a cached storage, and
    unpack its layers into a cached repository."""
    out.mkdir(parents=True, exist_ok=True)
    meta = out / "image.json"
    if meta.exists():
        image = BigImage.from_json(meta.read_text())
    else:
        t0 = time.monotonic()
        print(f"building {spec.name} (once; cached in {out})", file=sys.stderr)
        image = build_layout(out / "layout", spec)
        meta.write_text(image.to_json())
        print(f"  built in {time.monotonic() - t0:.0f}s", file=sys.stderr)
    registry = Registry(out / "registry").start()
    image.host = registry.host
    pushed = out / "registry" / ".pushed"
    if not pushed.exists():
        run(["skopeo", "copy", "--quiet", "--dest-tls-verify=false",
             f"oci:{out / 'layout'}:{image.tag}", f"docker://{image.ref}"])
        pushed.touch()
    repo = out / "repo"
    done = out / "repo.complete"
    if not done.exists():
        t0 = time.monotonic()
        print("unpacking the layers into the repository (once)", file=sys.stderr)
        if repo.exists():
            run(["rm", "-rf", str(repo)])
        repo.mkdir()
        publish_layers(registry.host, image, RepositoryLayout(repo), range(len(image.layers)))
        done.touch()
        print(f"  unpacked in {time.monotonic() - t0:.0f}s", file=sys.stderr)
    return Inputs(image, registry, repo)


def timed(fn) -> float:
    start = time.perf_counter()
    fn()
    return time.perf_counter() - start


def ctr_run(cd: Containerd, ref: str, snapshotter: str, namespace: str = "default") -> None:
    cd.ctr("run", "--rm", "--snapshotter", snapshotter, ref, f"b-{uuid.uuid4().hex[:10]}", CMD,
           namespace=namespace, timeout=1800)


def process_cpu(pid: int) -> float:
    """utime + stime of a running process, in seconds."""
    fields = Path(f"/proc/{pid}/stat").read_text().rsplit(")", 1)[1].split()
    return (int(fields[11]) + int(fields[12])) / os.sysconf("SC_CLK_TCK")


WARM_DAEMON = True


def published_metadata(inputs: Inputs) -> Path:
    """The tag's `.metadata/<registry>/<repo>:<tag>/` as the publisher writes it (manifest.json,
    config.json): the registry's port, part of that path, changes every run."""
    from cvmfs_common.registry.client import RegistryClient

    client = RegistryClient(insecure_registries=[inputs.registry.host])
    try:
        image = client.resolve(inputs.image.ref)
        config, _ = client.fetch_config(image)
    finally:
        client.close()
    lay = RepositoryLayout(inputs.repository)
    manifest = lay.manifest_json(*image.reference.link_components)
    manifest.parent.mkdir(parents=True, exist_ok=True)
    (manifest.parent / "config.json").write_bytes(config)
    manifest.write_bytes(image.manifest_bytes)
    return lay.metadata_root


def cvmfs_side(base: Path, inputs: Inputs, drop: bool, mode: str = "daemon", metadata: bool = True) -> dict[str, float]:
    """`cvmfs-snapshotter pull` + `ctr run`; `mode` daemon: the command hands the pull to the
    snapshotter daemon's control socket (the default), local: the pull runs in the command.
    The daemon imports its pull code at its first pull; a node's daemon has pulled before,
    so (unless --cold-daemon) one pull of an invalid name, not timed, goes first.
    `metadata`: the repository holds the tag's manifest and config, as the publisher leaves
    it, and the daemon's pull takes them from there after one HEAD; without, it resolves
    the tag at the registry (manifest and config GETs)."""
    meta = published_metadata(inputs) if metadata else None
    sn = SnapshotterProcess(base / "sn", repositories=[inputs.repository],
                            extra_args=["--log-level", "warning"]).start()
    cd = Containerd(base / "cd", sn.address, log_level="warn").start()
    ref = inputs.image.ref
    try:
        if mode == "daemon" and WARM_DAEMON:
            warm = subprocess.run([*snapshotter_command(), "pull", "--containerd-address", str(cd.address),
                                   "--daemon", "--control-socket", f"{sn.address}.ctl", "WARM/UP"],
                                  capture_output=True, text=True)
            if warm.returncode != 2:  # refused as a bad name by the daemon, having imported its pull code
                raise RuntimeError(f"warm-up pull: {warm.returncode} {warm.stderr}")
        if drop:
            drop_caches()
        inputs.registry.clear_log()
        pull = [*snapshotter_command(), "pull", "--containerd-address", str(cd.address), "--plain-http",
                f"--{mode}", "--control-socket", f"{sn.address}.ctl", ref]
        out: list[str] = []
        r0 = resource.getrusage(resource.RUSAGE_CHILDREN)
        d0 = process_cpu(sn.pid)
        t_pull = timed(lambda: out.append(run(pull, timeout=1800).stderr))
        r1 = resource.getrusage(resource.RUSAGE_CHILDREN)
        daemon_cpu = process_cpu(sn.pid) - d0  # the pull's work in the daemon (clock ticks: 10 ms)
        cpu = r1.ru_utime + r1.ru_stime - r0.ru_utime - r0.ru_stime  # the pull process's own CPU
        t_run = timed(lambda: ctr_run(cd, ref, "cvmfs-snapshotter"))
        t_warm = timed(lambda: ctr_run(cd, ref, "cvmfs-snapshotter"))
        n = len(inputs.image.layers)
        if f"{n} layers from the repository, 0 downloaded" not in out[0]:
            print(f"warning: not every layer came from the repository:\n{out[0]}", file=sys.stderr)
        blob_gets = inputs.registry.blob_get_count()
        return {"pull": t_pull, "run": t_run, "cold": t_pull + t_run, "warm": t_warm, "blob_gets": blob_gets,
                "manifest_gets": inputs.registry.manifest_get_count(), "pull_cpu": cpu, "daemon_cpu": daemon_cpu}
    finally:
        cd.cleanup_tasks()
        cd.stop()
        sn.stop()
        if meta is not None:
            run(["rm", "-rf", str(meta)])


def cri_side(base: Path, inputs: Inputs, drop: bool) -> dict[str, float]:
    """Kubernetes' path: CRI PullImage (containerd's own unpacker asks our snapshotter for
    each layer; no `cvmfs-snapshotter pull` process), from a client that is already
    connected as the kubelet is, then `ctr run` in CRI's namespace."""
    sn = SnapshotterProcess(base / "sn", repositories=[inputs.repository],
                            extra_args=["--log-level", "warning"]).start()
    cri = CriOptions(plain_http_registries=[inputs.registry.host])
    cd = Containerd(base / "cd", sn.address, cri=cri, log_level="warn").start()
    ref = inputs.image.ref
    channel = grpc.insecure_channel(f"unix:{cd.address}")
    try:
        stub = api_pb2_grpc.ImageServiceStub(channel)
        grpc.channel_ready_future(channel).result(timeout=30)
        if drop:
            drop_caches()
        inputs.registry.clear_log()
        request = api_pb2.PullImageRequest(image=api_pb2.ImageSpec(image=ref))
        t_pull = timed(lambda: stub.PullImage(request, timeout=1800))
        t_run = timed(lambda: ctr_run(cd, ref, "cvmfs-snapshotter", "k8s.io"))
        t_warm = timed(lambda: ctr_run(cd, ref, "cvmfs-snapshotter", "k8s.io"))
        blob_gets = inputs.registry.blob_get_count()
        return {"pull": t_pull, "run": t_run, "cold": t_pull + t_run, "warm": t_warm, "blob_gets": blob_gets}
    finally:
        channel.close()
        cd.cleanup_tasks()
        cd.stop()
        sn.stop()


def overlay_side(base: Path, inputs: Inputs, drop: bool) -> dict[str, float]:
    cd = Containerd(base / "cdo", base / "no-proxy.sock", log_level="warn").start()
    ref = inputs.image.ref
    try:
        if drop:
            drop_caches()
        inputs.registry.clear_log()
        t_pull = timed(lambda: cd.ctr("image", "pull", "--plain-http", "--snapshotter", "overlayfs", ref,
                                      timeout=3600))
        t_run = timed(lambda: ctr_run(cd, ref, "overlayfs"))
        t_warm = timed(lambda: ctr_run(cd, ref, "overlayfs"))
        blob_gets = inputs.registry.blob_get_count()
        return {"pull": t_pull, "run": t_run, "cold": t_pull + t_run, "warm": t_warm, "blob_gets": blob_gets}
    finally:
        cd.cleanup_tasks()
        cd.stop()


def main(argv: list[str] | None = None) -> int:
    ap = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    ap.add_argument("--size-gb", type=float, default=1.0, help="unpacked size of the generated layers (GiB)")
    ap.add_argument("--files", type=int, help="files in the generated layers (default 20 000 per GiB)")
    ap.add_argument("--layers", type=int, default=5, help="generated layers (plus the busybox layer)")
    ap.add_argument("--seed", type=int, default=1)
    ap.add_argument("--runs", type=int, default=1, help="cold runs per side (alternating)")
    ap.add_argument("--drop-caches", action="store_true", help="drop the page cache before each cold run")
    ap.add_argument("--no-cri", action="store_true", help="skip the CRI PullImage side (Kubernetes' path)")
    ap.add_argument("--keep", action="store_true", help="keep the containerd/snapshotter work dirs")
    ap.add_argument("--cold-daemon", action="store_true",
                    help="no untimed first pull through the daemon (it then imports its pull code in the timed one)")
    args = ap.parse_args(argv)
    global WARM_DAEMON
    WARM_DAEMON = not args.cold_daemon
    require_root()
    compiled_bytecode()
    files = args.files if args.files is not None else max(int(20_000 * args.size_gb), 100)
    spec = Spec(args.size_gb, files, args.layers, args.seed)
    inputs = prepare_inputs(spec, OUT / spec.name)
    img = inputs.image
    print(f"image {img.ref}: {len(img.layers)} layers, {img.unpacked_bytes / 2**30:.2f} GiB unpacked, "
          f"{img.files} entries, {img.blob_bytes / 2**30:.2f} GiB compressed")
    sides = {"cvmfs": cvmfs_side, "cvmfs-nometa": lambda *a: cvmfs_side(*a, metadata=False),
             "cvmfs-local": lambda *a: cvmfs_side(*a, mode="local"), "overlayfs": overlay_side}
    if not args.no_cri:
        sides["cvmfs-cri"] = cri_side
    results: dict[str, list[dict[str, float]]] = {side: [] for side in sides}
    try:
        for i in range(args.runs):
            order = list(sides) if i % 2 == 0 else list(reversed(sides))
            for side in order:
                with workdir(f"bench-cs-{side[:2]}-", args.keep) as base:
                    r = sides[side](base, inputs, args.drop_caches)
                results[side].append(r)
                print(f"run {i + 1} {side:11}: pull {r['pull']:7.2f}s  run {r['run']:6.2f}s  "
                      f"warm run {r['warm']:5.2f}s  blob GETs {r['blob_gets']:.0f}", file=sys.stderr)
    finally:
        inputs.registry.stop()

    def med(side: str, key: str) -> float:
        return statistics.median(r[key] for r in results[side])

    labels = {"cvmfs": "cvmfs pull", "cvmfs-nometa": "no .metadata", "cvmfs-local": "pull --local",
              "overlayfs": "overlayfs", "cvmfs-cri": "cvmfs via CRI"}
    print(f"\n{'':22} " + " ".join(f"{labels[s]:>14}" for s in sides) + f"   (seconds, median of {args.runs})")
    for key, label in (("pull", "pull"), ("run", "first ctr run"), ("cold", "cold start (pull+run)"),
                       ("warm", "warm ctr run"), ("blob_gets", "registry blob GETs")):
        print(f"{label:22} " + " ".join(f"{med(s, key):14.2f}" for s in sides))
    print(f"{'registry manifest GETs':22} " + " ".join(
        f"{med(s, 'manifest_gets'):14.2f}" if "manifest_gets" in results[s][0] else f"{'-':>14}" for s in sides))
    print(f"pull command CPU (user+sys): {med('cvmfs', 'pull_cpu'):.3f} s through the daemon (+ "
          f"{med('cvmfs', 'daemon_cpu'):.2f} s in the daemon), {med('cvmfs-local', 'pull_cpu'):.3f} s in-process "
          f"(medians; load-independent, unlike wall)")
    print(f"\nmachine: {machine()}; load average at the end: "
          + " ".join(f"{x:.2f}" for x in __import__('os').getloadavg()))
    print(f"image: {img.unpacked_bytes / 2**30:.2f} GiB unpacked, {img.files} entries, {len(img.layers)} layers")
    warm = med("overlayfs", "warm")
    print(f"cold start speedup, overlayfs pull+run / cvmfs-snapshotter pull+run: "
          f"{med('overlayfs', 'cold') / med('cvmfs', 'cold'):.1f}x (target >= 20x)")
    print(f"cvmfs-snapshotter pull --local+run / warm run (in-process pull):      "
          f"{med('cvmfs-local', 'cold') / warm:.2f}x")
    print(f"cvmfs-snapshotter pull+run / warm run of the unpacked image:          "
          f"{med('cvmfs', 'cold') / warm:.2f}x (target <= 1.5x)")
    print(f"the same, the tag's manifest and config not in the repository:        "
          f"{med('cvmfs-nometa', 'cold') / warm:.2f}x")
    if "cvmfs-cri" in sides:
        print(f"CRI PullImage+run (no pull process) / warm run of the unpacked image: "
              f"{med('cvmfs-cri', 'cold') / warm:.2f}x; speedup vs overlayfs "
              f"{med('overlayfs', 'cold') / med('cvmfs-cri', 'cold'):.1f}x")
    return 0


if __name__ == "__main__":
    sys.exit(main())

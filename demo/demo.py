"""The demo: images built locally (one of ~270 MB), served by a loopback registry, published
into a local repository, then started by containerd (cvmfs-snapshotter pull + ctr run: no
layer download) against containerd's own overlayfs pull, by podman (from podmanStore: no
pull) and by apptainer (the flat link, when installed). Prints what happened and a table.

    bash demo/run.sh [--keep] [--workdir DIR]
"""

from __future__ import annotations

import argparse
import os
import shutil
import subprocess
import sys
import tempfile
import time
from dataclasses import dataclass
from pathlib import Path

HERE = Path(__file__).resolve().parent
TOP = HERE.parent
sys.path.insert(0, str(TOP))

from bench.bigimage import BigImage, Spec, build_layout  # noqa: E402 - after the path set-up
from tests.fixtures.containerd import Containerd  # noqa: E402
from tests.fixtures.images import Pusher, build_and_push_standard  # noqa: E402
from tests.fixtures.registry import Registry  # noqa: E402
from tests.fixtures.snapshotter import SnapshotterProcess  # noqa: E402
from tests.fixtures.workdirs import remove_workdir  # noqa: E402

BIN = Path(sys.executable).parent


def say(text: str) -> None:
    print(f"\n\033[1m==> {text}\033[0m", flush=True)


def run(*cmd: str | Path, **kw) -> subprocess.CompletedProcess:
    res = subprocess.run([str(c) for c in cmd], capture_output=True, text=True, **kw)
    if res.returncode != 0:
        raise SystemExit(f"failed: {' '.join(map(str, cmd))}\n{res.stdout}\n{res.stderr}")
    return res


def timed(fn):
    t0 = time.monotonic()
    result = fn()
    return result, time.monotonic() - t0


def main() -> int:
    ap = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    ap.add_argument("--keep", action="store_true", help="leave everything in the work dir, processes stopped")
    ap.add_argument("--workdir", type=Path, help="default: a new dir under /var/tmp")
    args = ap.parse_args()
    if os.geteuid() != 0:
        raise SystemExit("the demo needs root (containerd, overlay mounts)")
    work = args.workdir or Path(tempfile.mkdtemp(prefix="cvmfs-demo-", dir="/var/tmp"))
    work.mkdir(parents=True, exist_ok=True)
    procs: list = []
    try:
        return demo(work, procs)
    finally:
        for p in reversed(procs):
            if isinstance(p, Containerd):
                p.cleanup_tasks()
            p.stop()
        if args.keep:
            print(f"\nkept: {work}")
        else:
            remove_workdir(work)


BIG = Spec(size_gib=0.25, files=2500, layers=4, seed=1)  # ~270 MB unpacked, 5 layers


def demo(work: Path, procs: list) -> int:
    say("1. a registry on 127.0.0.1 with images built here (no internet)")
    reg = Registry(work / "registry").start()
    procs.append(reg)
    images = build_and_push_standard(reg.host, work / "images", prefix="demo")
    small = images.multilayer
    (big, big_layout), secs = timed(lambda: build_big(work / "big-layout", reg.host))
    big_sizes = {d: (big_layout / "blobs/sha256" / d[7:]).stat().st_size for d in big.layers}
    print(f"registry {reg.url}")
    print(f"  {small.ref}: {len(small.layers)} small layers (whiteouts, an opaque dir, hard links, ...)")
    print(f"  {big.ref}: {len(big.layers)} layers, {human(sum(big_sizes.values()))} compressed, "
          f"{human(big.unpacked_bytes)} unpacked (generated in {secs:.1f}s)")
    print(f"  {images.apptainer.ref}: ENV, ENTRYPOINT, CMD, WorkingDir and labels for apptainer")

    say("2. cvmfs-publisher convert: unpack every layer once into the repository")
    repo = work / "repo"
    wishlist = work / "wishlist.yaml"
    wishlist.write_text(
        "version: 1\nuser: demo\ncvmfs_repo: demo.local\n"
        f"output_format: 'http://{reg.host}/thin/$(image)'\ninput:\n"
        f"  - '{small.ref}'\n  - '{reg.host}/demo/tagged:*'\n  - '{images.apptainer.ref}'\n  - '{big.ref}'\n"
    )
    res, secs = timed(lambda: run(BIN / "cvmfs-publisher", "convert", wishlist, "--repository-root", repo,
                                  "--state-db", work / "state.db"))
    print(res.stdout.strip()[-1500:])
    print(f"published in {secs:.1f}s into {repo}:")
    for entry in sorted(p for p in repo.iterdir()):
        print(f"   {entry.name}")
    link = repo / reg.host / "demo" / "multilayer:v1"
    print(f"   {link.relative_to(repo)} -> {os.readlink(link)}  (a directory with /.singularity.d)")
    for m in sorted((repo / ".multiarch").iterdir()):
        if m.is_symlink():
            print(f"   .multiarch/{m.name} -> {os.readlink(m)}")
        elif not m.name.startswith("."):
            print(f"   .multiarch/{m.name}/{reg.host}/demo/multilayer:v1 -> "
                  f"{os.readlink(m / reg.host / 'demo/multilayer:v1')}")

    say("3. containerd + cvmfs-snapshotter: pull with no layer download, then ctr run")
    sn = SnapshotterProcess(work / "sn", repositories=[repo]).start()
    procs.append(sn)
    cd = Containerd(work / "cd", sn.address, log_level="info").start()
    procs.append(cd)
    run(BIN / "cvmfs-snapshotter", "pull", "--containerd-address", cd.address, "--plain-http", small.ref)
    out = cd.run(small.ref, "/bin/sh", "-c", "cat /data/keep.txt; ls /opaque; test ! -e /data/delete-me.txt "
                 "&& echo 'deleted file stays deleted'")
    print(f"{small.ref}: {' / '.join(out.stdout.splitlines())}")
    reg.clear_log()
    res, pull_secs = timed(lambda: run(BIN / "cvmfs-snapshotter", "pull", "--containerd-address", cd.address,
                                       "--plain-http", big.ref))
    print(res.stderr.strip())
    out, run_secs = timed(lambda: cd.run(big.ref, *BIG_COMMAND))
    print(f"{big.ref}: {out.stdout.strip()}")
    ours = Side("cvmfs-snapshotter", *downloads(reg, big_sizes), pull_secs + run_secs)

    say("4. the same with containerd's own overlayfs snapshotter (downloads + unpacks everything)")
    cd2 = Containerd(work / "cd2", sn.address, log_level="info").start()
    procs.append(cd2)
    reg.clear_log()
    _, plain_pull = timed(lambda: cd2.pull(big.ref, snapshotter="overlayfs"))
    out, plain_run = timed(lambda: cd2.run(big.ref, *BIG_COMMAND, snapshotter="overlayfs"))
    print(f"{big.ref}: {out.stdout.strip()}")
    plain = Side("plain overlayfs", *downloads(reg, big_sizes), plain_pull + plain_run)

    say("5. podman run straight from the repository's podmanStore (no pull, registry stopped)")
    reg.stop()
    podman_demo(work, repo, small.ref)

    say("6. apptainer exec of the flat link (what grid jobs run)")
    apptainer_demo(repo / reg.host / "demo" / "apptainer:v1")

    say(f"summary: starting {big.ref} ({len(big.layers)} layers, {human(big.unpacked_bytes)} unpacked)")
    print(summary_table(ours, plain, len(big.layers)))
    return 0


BIG_COMMAND = ("/bin/sh", "-c", "echo \"$(ls /data0 | wc -l) dirs in /data0\"")


@dataclass
class Side:
    name: str
    layers: int
    bytes: int
    seconds: float


def build_big(layout_dir: Path, host: str) -> tuple[BigImage, Path]:
    big = build_layout(layout_dir, BIG)
    big.host = host
    Pusher(host).copy(layout_dir, "v1", big.name, big.tag, fmt="oci")
    return big, layout_dir


def downloads(reg: Registry, sizes: dict[str, int]) -> tuple[int, int]:
    """(layer blobs fetched, their bytes), from the registry's access log."""
    got = [d for d in sizes if reg.blob_get_count(d)]
    return len(got), sum(sizes[d] for d in got)


def human(n: float) -> str:
    for unit in ("B", "kB", "MB", "GB"):
        if n < 1000 or unit == "GB":
            return f"{n:.0f} {unit}" if unit == "B" else f"{n:.1f} {unit}"
        n /= 1000
    return f"{n:.1f} GB"


def summary_table(ours: Side, plain: Side, layers: int) -> str:
    rows = [("", "layers downloaded", "bytes downloaded", "pull+run")]
    for s in (ours, plain):
        rows.append((s.name, f"{s.layers} of {layers}", human(s.bytes), f"{s.seconds:.2f} s"))
    ratio = plain.seconds / ours.seconds if ours.seconds > 0 else float("inf")
    rows.append(("ratio", "", "", f"{ratio:.1f}x faster"))
    widths = [max(len(r[i]) for r in rows) for i in range(4)]
    return "\n".join("  ".join(c.ljust(w) if i == 0 else c.rjust(w) for i, (c, w) in enumerate(zip(r, widths)))
                     .rstrip() for r in rows)


def apptainer_demo(link: Path) -> None:
    print(f"{link.name} -> {os.readlink(link)}; its /.singularity.d/env/10-docker2singularity.sh:")
    print("   " + "\n   ".join((link / ".singularity.d/env/10-docker2singularity.sh").read_text().splitlines()[2:6]))
    exe = shutil.which("apptainer")
    if exe is None:
        print("apptainer not installed: `apptainer exec` skipped (Debian sid/trixie: apt-get install apptainer)")
        return
    out = subprocess.run([exe, "exec", "--cleanenv", str(link), "/bin/sh", "-c", 'echo "FOO=$FOO PATH=$PATH"'],
                         capture_output=True, text=True)
    print(f"apptainer exec {link.name}: {(out.stdout or out.stderr).strip()}")
    out = subprocess.run([exe, "run", "--cleanenv", str(link), "given arg"], capture_output=True, text=True)
    print(f"apptainer run {link.name} 'given arg': {' / '.join((out.stdout or out.stderr).split(chr(10)))}")


def podman_demo(work: Path, repo: Path, ref: str) -> None:
    if shutil.which("podman") is None:
        print("podman not installed: skipped")
        return
    pod = work / "podman"
    (pod / "tmp").mkdir(parents=True, exist_ok=True)
    conf = pod / "storage.conf"
    conf.write_text(
        "[storage]\ndriver = \"overlay\"\n"
        f"graphroot = \"{pod / 'graph'}\"\nrunroot = \"{pod / 'run'}\"\n"
        "[storage.options]\n"
        f"additionalimagestores = [\"{repo / 'podmanStore'}\"]\n"
    )
    cconf = pod / "containers.conf"
    cconf.write_text(
        "[containers]\ndefault_ulimits = [\"nofile=1024:1024\", \"nproc=1024:1024\"]\n"
        "[engine]\ncgroup_manager = \"cgroupfs\"\nevents_logger = \"file\"\n"
        f"tmp_dir = \"{pod / 'tmp'}\"\n"
    )
    env = dict(os.environ, CONTAINERS_STORAGE_CONF=str(conf), CONTAINERS_CONF=str(cconf), TMPDIR=str(pod / "tmp"))
    images = run("podman", "images", "--format", "{{.Repository}}:{{.Tag}}", env=env).stdout.split()
    print("podman images:", ", ".join(images))
    t0 = time.monotonic()
    out = run("podman", "run", "--rm", "--pull", "never", "--net", "none", ref, "cat", "/data/keep.txt",
              env=env).stdout
    print(f"podman run: {out.strip()!r} in {time.monotonic() - t0:.2f}s")
    run("podman", "rm", "-a", "-f", env=env)


if __name__ == "__main__":
    sys.exit(main())

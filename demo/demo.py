"""The demo: images built locally, served by a loopback registry, published into a local
repository, then started by containerd (cvmfs-snapshotter pull + ctr run: no layer
download) and by podman (from podmanStore: no pull). Prints what happened.

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
from pathlib import Path

HERE = Path(__file__).resolve().parent
TOP = HERE.parent
sys.path.insert(0, str(TOP))

from tests.fixtures.containerd import Containerd  # noqa: E402 - after the path set-up
from tests.fixtures.images import build_and_push_standard  # noqa: E402
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


def demo(work: Path, procs: list) -> int:
    say("1. a registry on 127.0.0.1 with multi-layer images built here (no internet)")
    reg = Registry(work / "registry").start()
    procs.append(reg)
    images = build_and_push_standard(reg.host, work / "images", prefix="demo")
    img = images.multilayer
    print(f"registry {reg.url}; image {img.ref}: {len(img.layers)} layers "
          "(whiteouts, an opaque dir, hard links, a layer omitting its parent dirs)")

    say("2. cvmfs-publisher convert: unpack every layer once into the repository")
    repo = work / "repo"
    wishlist = work / "wishlist.yaml"
    wishlist.write_text(
        "version: 1\nuser: demo\ncvmfs_repo: demo.local\n"
        f"output_format: 'http://{reg.host}/thin/$(image)'\ninput:\n"
        f"  - '{images.multilayer.ref}'\n  - '{reg.host}/demo/tagged:*'\n"
    )
    res, secs = timed(lambda: run(BIN / "cvmfs-publisher", "convert", wishlist, "--repository-root", repo,
                                  "--state-db", work / "state.db"))
    print(res.stdout.strip()[-1500:])
    print(f"published in {secs:.1f}s into {repo}:")
    for entry in sorted(p for p in repo.iterdir()):
        print(f"   {entry.name}")
    link = repo / reg.host / "demo" / "multilayer:v1"
    print(f"   {link.relative_to(repo)} -> {os.readlink(link)}")

    say("3. containerd + cvmfs-snapshotter: pull with no layer download, then ctr run")
    sn = SnapshotterProcess(work / "sn", repositories=[repo]).start()
    procs.append(sn)
    cd = Containerd(work / "cd", sn.address, log_level="info").start()
    procs.append(cd)
    reg.clear_log()
    res, pull_secs = timed(lambda: run(BIN / "cvmfs-snapshotter", "pull", "--containerd-address", cd.address,
                                       "--plain-http", img.ref))
    print(res.stderr.strip())
    out, run_secs = timed(lambda: cd.run(img.ref, "/bin/sh", "-c",
                                         "cat /data/keep.txt; ls /opaque; test ! -e /data/delete-me.txt "
                                         "&& echo 'deleted file stays deleted'"))
    print(out.stdout.strip())
    layer_gets = sum(reg.blob_get_count(d) for d in img.layers)
    print(f"layer blobs downloaded: {layer_gets} of {len(img.layers)}; pull {pull_secs:.2f}s + run {run_secs:.2f}s")

    say("4. the same with containerd's own overlayfs snapshotter (downloads + unpacks everything)")
    cd2 = Containerd(work / "cd2", sn.address, log_level="info").start()
    procs.append(cd2)
    reg.clear_log()
    _, plain_pull = timed(lambda: cd2.pull(img.ref, snapshotter="overlayfs"))
    _, plain_run = timed(lambda: cd2.run(img.ref, "/bin/true", snapshotter="overlayfs"))
    plain_gets = sum(reg.blob_get_count(d) for d in img.layers)
    print(f"layer blobs downloaded: {plain_gets} of {len(img.layers)}; pull {plain_pull:.2f}s + run {plain_run:.2f}s")

    say("5. podman run straight from the repository's podmanStore (no pull, registry stopped)")
    reg.stop()
    podman_demo(work, repo, img.ref)

    say("summary")
    print(f"cvmfs-snapshotter: {layer_gets} layer downloads, {pull_secs + run_secs:.2f}s pull+run")
    print(f"plain overlayfs:   {plain_gets} layer downloads, {plain_pull + plain_run:.2f}s pull+run")
    return 0


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

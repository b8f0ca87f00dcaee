"""User-namespaced container starts through CRI: idmapped lowers (`remap-ids`) vs containerd's
chown of the root fs (no capability declared), plain and with `--overlay-metacopy`.

containerd (Debian sid's 2.1, or with --containerd 2.3 the LTS binaries of ../shared) and runc
run in the runtime tier's sid root fs (tests/runtimes); the image (~80 MB, 2000 files of 40 KB,
+ busybox) is served from a local repository. Each start is CreateContainer + StartContainer of
a container in a pod of its own (every pod has its own id range, so containerd's chown runs
for each). Prints bytes written under the snapshotter's snapshots/ and seconds, medians over
--runs, and the ratios to containerd's chown last.

    sudo .venv/bin/python bench/userns_bench.py [--runs 3] [--containerd 2.1|2.3]
"""
from __future__ import annotations

import argparse
import statistics
import sys
from pathlib import Path

sys.path.insert(0, str(Path(__file__).resolve().parents[1]))

from bench.benchlib import machine, ratio, require_root, workdir  # noqa: E402


def main() -> int:
    p = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    p.add_argument("--runs", type=int, default=3)
    p.add_argument("--containerd", choices=("2.1", "2.3"), default="2.1")
    args = p.parse_args()
    require_root()

    from tests.e2e.repo_writer import publish_layers
    from tests.fixtures.registry import start_registry
    from tests.fixtures.rootfs import start_container, stop_container
    from tests.runtimes.conftest import repo_in
    from tests.runtimes.cri import Cri, UserNs, install_noop_cni
    from tests.runtimes.stack import DIST_IN_CONTAINER, SID23_RT, SID_RT, Stack, shared_containerd_dir
    from tests.runtimes.test_cri_pods import push_big_image, push_pause, start_cost

    rt = SID23_RT if args.containerd == "2.3" else SID_RT
    binds = []
    if rt.tarball:
        dist = shared_containerd_dir()
        if dist is None or not (dist / rt.tarball).is_file():
            sys.exit(f"containerd {rt.containerd} needs {rt.tarball} in ../shared/containerd")
        binds.append((str(dist), DIST_IN_CONTAINER, True))
    variants = [("remap-ids (idmapped lowers)", ["remap-ids"], ""),
                ("containerd's chown", [], ""),
                ("containerd's chown + metacopy", [], "--overlay-metacopy")]
    results: dict[str, list[tuple[int, float]]] = {}
    with workdir("usernsb-") as base:
        reg = start_registry(base)
        c = None
        try:
            img = push_big_image(reg, base)
            pause = push_pause(reg, base)
            c = start_container(rt.spec, base, "usernsb-", binds=binds)
            install_noop_cni(c)
            publish_layers(reg.host, img, repo_in(c), range(len(img.layers)))
            stack = Stack(c, rt, registries=[reg.url], capabilities=["remap-ids"], sandbox_image=pause).start()
            api = Cri(stack)
            api.pull(img.ref)
            n = 0
            for label, caps, sn_args in variants:
                if (caps, sn_args) != (stack.capabilities, stack.snapshotter_args):
                    stack.capabilities, stack.snapshotter_args = caps, sn_args
                    stack.restart_snapshotter()
                    stack.restart_containerd()
                    api.close()
                    api = Cri(stack)
                for _ in range(args.runs):
                    n += 1
                    base_id = 100000 + n * 65536
                    results.setdefault(label, []).append(
                        start_cost(api, stack, img, UserNs(base_id, base_id), f"b{n}"))
            api.close()
        finally:
            if c is not None:
                stop_container(c)
            reg.stop()

    print(f"\n{machine()}; containerd {args.containerd}; ~80 MB image ({len(img.tree.entries)} paths); "
          f"median of {args.runs} user-namespaced container starts (CreateContainer + StartContainer)")
    med = {k: (statistics.median(w for w, _ in v), statistics.median(s for _, s in v)) for k, v in results.items()}
    for label, (written, seconds) in med.items():
        print(f"  {label:32s} {written / 1e6:9.2f} MB written {seconds:7.2f} s")
    chown = med["containerd's chown"]
    for label in ("remap-ids (idmapped lowers)", "containerd's chown + metacopy"):
        written, seconds = med[label]
        print(f"  ratio {label} / containerd's chown: bytes {ratio(written, chown[0])}, "
              f"time {ratio(seconds, chown[1])}")
    return 0


if __name__ == "__main__":
    sys.exit(main())

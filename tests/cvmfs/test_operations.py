"""Operations against a real stratum 0: a moved tag and gc (the publisher's, then
`cvmfs_server gc`), kill -9 of the publisher inside a transaction, and a hung repository
under a running snapshotter. `cvmfs_server check` must be clean after each."""
from __future__ import annotations

import subprocess
import time
from collections.abc import Callable

import pytest

from cvmfs_common.repo.paths import RepositoryLayout
from tests.fixtures.images import StandardImages
from tests.fixtures.registry import Registry
from tests.fixtures.tree import LISTING_SCRIPT, RUNTIME_MOUNTS, compare_trees, parse_listing
from tests.publisher.clirun import write_wishlist
from tests.publisher.repotree import flat_tree_problems, observed_tree

from .publishing import IGNORE, assert_check_clean, convert, kill9_when, split_hardlinks
from .runtime import InnerRuntime
from .stratum0 import Stratum0

pytestmark = pytest.mark.e2e

STAT_TIMEOUT = 1.0


def retag(registry: Registry, src: str, dst: str) -> None:
    subprocess.run(["skopeo", "copy", "--quiet", "--src-tls-verify=false", "--dest-tls-verify=false",
                    f"docker://{registry.host}/{src}", f"docker://{registry.host}/{dst}"],
                   check=True, capture_output=True, text=True)


def test_moved_tag_then_gc_reclaims_objects(stratum0: Stratum0, registry: Registry,
                                            standard_images: StandardImages) -> None:
    name = "unpacked.gc.test"
    repo = stratum0.mkfs(name)
    db = "/w/state/gc.db"
    write_wishlist(stratum0.host_w / "gc.yaml", [f"{registry.host}/test/moving:v1"], repo=name)
    retag(registry, "test/tagged:1.0", "test/moving:v1")
    assert "1 new" in convert(stratum0, repo, "/w/gc.yaml", db).stdout
    old = standard_images.tagged["1.0"]
    client = stratum0.host_view(repo.client)
    lay = RepositoryLayout(client)
    assert lay.flat_dir(old.config_digest).is_dir()
    retag(registry, "test/tagged:2.0", "test/moving:v1")
    before = repo.revision()
    out = convert(stratum0, repo, "/w/gc.yaml", db).stdout
    assert "1 updated" in out, out
    # its new layer is small: one unit for it and everything else (tests/cvmfs/test_batch.py)
    assert repo.revision() == before + 1
    new = standard_images.tagged["2.0"]
    assert lay.flat_dir(new.config_digest).is_dir() and lay.flat_dir(old.config_digest).is_dir()
    assert_check_clean(repo)

    time.sleep(2)
    out = stratum0.sh(f"cd / && cvmfs-publisher gc --older-than 1s --backend cvmfs --repository-root {repo.root} "
                      f"--state-db {db} 2>&1").stdout
    assert not lay.flat_dir(old.config_digest).exists(), out
    assert lay.flat_dir(new.config_digest).is_dir()
    objects = repo.objects()
    repo.server("gc", "-r", "0", "-f", name)
    assert repo.objects() < objects, "cvmfs_server gc reclaimed nothing"
    assert_check_clean(repo)
    # The image that stayed is still whole on the client.
    tree = observed_tree(lay.flat_dir(new.config_digest))
    assert split_hardlinks(new, tree, flat_tree_problems(new.tree, tree, IGNORE)) == []


def kill9_convert(stratum0: Stratum0, repo, images: list, until: Callable[[], bool]) -> str:
    """Start a convert of ``images`` into ``repo`` in the background, kill -9 it as soon as
    ``until()`` holds; returns the wishlist's path in the container."""
    name = repo.name
    write_wishlist(stratum0.host_w / f"{name}.yaml", [i.ref for i in images], repo=name)
    kill9_when(stratum0, name, f"cvmfs-publisher convert /w/{name}.yaml --backend cvmfs --repository-root "
               f"{repo.root} --state-db /w/state/{name}.db", until, timeout=120, poll=0.02)
    return f"/w/{name}.yaml"


def assert_recovered(stratum0: Stratum0, repo, images: list, out: str) -> None:
    assert "0 failed" in out, out
    lay = RepositoryLayout(stratum0.host_view(repo.client))
    for img in images:
        assert lay.flat_dir(img.config_digest).is_dir()
    assert not (lay.root / ".tmp").exists()
    assert not repo.in_transaction()
    assert_check_clean(repo)


def test_kill9_inside_a_transaction_then_recovery(stratum0: Stratum0, registry: Registry,
                                                  standard_images: StandardImages) -> None:
    repo = stratum0.mkfs("unpacked.crash.test")
    images = [standard_images.multilayer, standard_images.tagged["2.0"]]
    wishlist = kill9_convert(stratum0, repo, images, repo.in_transaction)
    # The cvmfs_server call of the moment runs to its end on its own (a transaction opened, a
    # publish completed); what stays open after it is the crash's leftover.
    orphans = f"pgrep -f 'cvmfs_(server|publish|swissknife) .*{repo.name}'"
    deadline = time.monotonic() + 300
    while stratum0.sh(orphans, check=False).returncode == 0:
        assert time.monotonic() < deadline, "a cvmfs_server call of the killed run never ended"
        time.sleep(0.2)
    left_open = repo.in_transaction()
    out = convert(stratum0, repo, wishlist, f"/w/state/{repo.name}.db").stdout
    if left_open:
        assert "aborting it" in out, out
    assert_recovered(stratum0, repo, images, out)


def test_a_transaction_left_locked_and_read_only_is_aborted(stratum0: Stratum0, registry: Registry,
                                                            standard_images: StandardImages) -> None:
    """A `publish` killed halfway leaves REPO locked in its transaction with the union
    read-only: `cvmfs_server transaction` then exits 1 ("in a transaction but ... not mounted
    read/write"), not 17. The next run aborts it (after `list` says so) and publishes."""
    repo = stratum0.mkfs("unpacked.lockedro.test")
    images = [standard_images.multilayer]
    write_wishlist(stratum0.host_w / f"{repo.name}.yaml", [i.ref for i in images], repo=repo.name)
    repo.server("transaction", repo.name)
    stratum0.sh(f"mount -o remount,ro {repo.root}")
    assert repo.in_transaction()
    out = convert(stratum0, repo, f"/w/{repo.name}.yaml", f"/w/state/{repo.name}.db").stdout
    assert "aborting it" in out, out
    assert_recovered(stratum0, repo, images, out)


def test_a_publishing_lock_the_client_kept_is_released(stratum0: Stratum0, registry: Registry,
                                                      standard_images: StandardImages) -> None:
    """`publish` flocks SPOOL/is_publishing.lock on its fd 9, remounts the client (cvmfs2,
    which inherits the fd and lives on) and only then removes the file. Its process group
    killed in between leaves the file locked by cvmfs2: every later `publish` fails with
    "Another publish process is active" and `abort` with "currently publishing". Built here
    as close_transaction does it; the next run removes the stale file and publishes."""
    repo = stratum0.mkfs("unpacked.pubunlock.test")
    images = [standard_images.multilayer]
    write_wishlist(stratum0.host_w / f"{repo.name}.yaml", [i.ref for i in images], repo=repo.name)
    lock = f"/var/spool/cvmfs/{repo.name}/is_publishing.lock"
    stratum0.sh(f"bash -c 'exec 9<>{lock}; flock -n 9; for t in rw_umount rdonly_umount rdonly_mount rw_mount; "
                f"do env -i /usr/bin/cvmfs_suid_helper $t {repo.name} >/dev/null; done'")
    assert stratum0.sh(f"flock -n {lock} true", check=False).returncode != 0, "cvmfs2 does not hold the lock"
    out = convert(stratum0, repo, f"/w/{repo.name}.yaml", f"/w/state/{repo.name}.db").stdout
    assert "is_publishing.lock" in out, out
    assert_recovered(stratum0, repo, images, out)


# A FUSE mount of the client whose process is gone before it answered: mounted on
# /dev/fuse by a process that then exits, as a cvmfs2 killed with its caller's group leaves it.
DEAD_FUSE_MOUNT = ("/opt/venv/bin/python -c \"import ctypes, os; fd = os.open('/dev/fuse', os.O_RDWR); "
                   "opts = 'fd=%d,rootmode=40000,user_id=0,group_id=0,allow_other' % fd; "
                   "assert ctypes.CDLL(None).mount(b'{name}', b'{path}', b'fuse', 1, opts.encode()) == 0\"")


def test_a_client_whose_process_died_is_unmounted(stratum0: Stratum0, registry: Registry,
                                                  standard_images: StandardImages) -> None:
    """`publish`, `ingest` and `abort` remount the client; its cvmfs2 starts in the caller's
    process group. That group killed then leaves SPOOL/rdonly a FUSE mount with no process
    (ENOTCONN), REPO in its transaction and the union unmounted, and every cvmfs_server
    call's own repair fails ("Mount point ... does not exist"). Built here as
    close_transaction leaves it; the next run unmounts the dead client and recovers."""
    repo = stratum0.mkfs("unpacked.deadclient.test")
    images = [standard_images.multilayer]
    write_wishlist(stratum0.host_w / f"{repo.name}.yaml", [i.ref for i in images], repo=repo.name)
    repo.server("transaction", repo.name)
    stratum0.sh(f"for t in rw_umount rdonly_umount; do env -i /usr/bin/cvmfs_suid_helper $t {repo.name}; done\n"
                + DEAD_FUSE_MOUNT.format(name=repo.name, path=repo.client))
    assert "not connected" in stratum0.sh(f"stat {repo.client} 2>&1", check=False).stdout
    refused = repo.server("abort", "-f", repo.name, check=False)
    assert refused.returncode != 0 and "does not exist" in refused.stdout, refused.stdout  # CernVM-FS cannot
    out = convert(stratum0, repo, f"/w/{repo.name}.yaml", f"/w/state/{repo.name}.db").stdout
    assert "is dead" in out, out
    assert_recovered(stratum0, repo, images, out)


def test_a_client_a_service_stop_killed_is_mounted_again(stratum0: Stratum0, registry: Registry,
                                                         standard_images: StandardImages) -> None:
    """The client's cvmfs2 that a publish remounted runs in the publisher's process tree, so
    a service manager stopping the publisher (systemd's default KillMode) sends it SIGTERM
    too: it dies without unmounting, outside any transaction, and /cvmfs/REPO answers
    ENOTCONN. The next run unmounts the dead client, mounts client and union again, publishes."""
    repo = stratum0.mkfs("unpacked.svcstop.test")
    first, second = standard_images.multilayer, standard_images.tagged["1.0"]
    write_wishlist(stratum0.host_w / f"{repo.name}.yaml", [first.ref], repo=repo.name)
    db = f"/w/state/{repo.name}.db"
    convert(stratum0, repo, f"/w/{repo.name}.yaml", db)
    stratum0.sh(f"kill -TERM $(pgrep -f '^cvmfs2 {repo.name} ')")
    deadline = time.monotonic() + 30
    while "not connected" not in stratum0.sh(f"ls {repo.root} 2>&1", check=False).stdout:
        assert time.monotonic() < deadline, "cvmfs2 did not die of SIGTERM"
        time.sleep(0.2)
    assert not repo.in_transaction()
    write_wishlist(stratum0.host_w / f"{repo.name}.yaml", [first.ref, second.ref], repo=repo.name)
    out = convert(stratum0, repo, f"/w/{repo.name}.yaml", db).stdout
    assert "is dead" in out, out
    assert_recovered(stratum0, repo, [first, second], out)


def test_kill9_during_publish_then_the_next_run_waits_for_it(stratum0: Stratum0, registry: Registry,
                                                             standard_images: StandardImages) -> None:
    """A kill -9 while `cvmfs_server publish` runs leaves that publish running on its own: the
    next run, started at once, recovers (it waits for the orphan: wait_for_orphans, whose
    own test is in tests/publisher/backend), and nothing goes unreported."""
    repo = stratum0.mkfs("unpacked.crashpub.test")
    images = [standard_images.multilayer, standard_images.tagged["2.0"]]
    publishing = f"pgrep -f 'cvmfs_server publish {repo.name}'"
    wishlist = kill9_convert(stratum0, repo, images,
                             lambda: stratum0.sh(publishing, check=False).returncode == 0)
    out = convert(stratum0, repo, wishlist, f"/w/state/{repo.name}.db").stdout
    assert_recovered(stratum0, repo, images, out)


def signal_apache(sig: str) -> str:
    """The apache the fixture started: its master (pid file) and that master's children."""
    return ("m=$(cat /var/run/apache2/apache2.pid); "
            f"kill -{sig} $m $(ps -o pid= --ppid $m)")


@pytest.fixture
def hung_setup(stratum0: Stratum0, registry: Registry, standard_images: StandardImages):
    name = "unpacked.hung.test"
    repo = stratum0.mkfs(name)
    db = "/w/state/hung.db"
    first, second = standard_images.tagged["1.0"], standard_images.multilayer
    write_wishlist(stratum0.host_w / "hung.yaml", [first.ref], repo=name)
    convert(stratum0, repo, "/w/hung.yaml", db)
    # `second` is published after the first: its nested catalogs were never read by the client.
    write_wishlist(stratum0.host_w / "hung.yaml", [first.ref, second.ref], repo=name)
    convert(stratum0, repo, "/w/hung.yaml", db)
    rt = InnerRuntime(stratum0, "rt-hung", [repo.client], stat_timeout=STAT_TIMEOUT).start()
    yield stratum0, repo, rt, second
    stratum0.sh(signal_apache("CONT"), check=False)
    rt.stop()


def test_hung_repository_falls_back_then_recovers(hung_setup, registry: Registry) -> None:
    s0, repo, rt, img = hung_setup
    # A cold client cache, then apache frozen: requests are accepted and never answered.
    s0.sh(f"cvmfs_talk -p /var/spool/cvmfs/{repo.name}/cvmfs_io cleanup 0 >/dev/null")
    s0.sh(signal_apache("STOP"))
    try:
        registry.clear_log()
        t0 = time.monotonic()
        res = rt.pull(img.ref)
        elapsed = time.monotonic() - t0
        assert f"0 layers from the repository, {len(img.layers)} downloaded" in res.stderr, res.stderr
        assert elapsed < 30, f"pull took {elapsed:.1f}s with --stat-timeout {STAT_TIMEOUT}"
        assert "did not answer" in rt.log() or "not answering" in rt.log(), rt.log()[-2000:]
        out = parse_listing(rt.run(img.ref, "/bin/sh", "-c", LISTING_SCRIPT).stdout)
        assert compare_trees(img.tree, out, ignore=RUNTIME_MOUNTS | IGNORE) == []
    finally:
        s0.sh(signal_apache("CONT"))
    # Back: once the prober sees the repository answer, layers come from it again.
    rt.ctr("images", "rm", "--sync", img.ref)
    end = time.monotonic() + 120
    while True:
        res = rt.pull(img.ref)
        if f"{len(img.layers)} layers from the repository, 0 downloaded" in res.stderr:
            break
        assert time.monotonic() < end, res.stderr
        rt.ctr("images", "rm", "--sync", img.ref)
        time.sleep(2)
    out = parse_listing(rt.run(img.ref, "/bin/sh", "-c", LISTING_SCRIPT).stdout)
    assert split_hardlinks(img, out, compare_trees(img.tree, out, ignore=RUNTIME_MOUNTS | IGNORE)) == []
    assert_check_clean(repo)

"""`cvmfs-publisher gc`: what no wishlist wants any more goes, after the grace period."""
from __future__ import annotations

import json
import os
import re
import subprocess
import threading
import time
from collections import Counter
from pathlib import Path

import pytest

from cvmfs_common.oci.digest import chain_ids
from cvmfs_common.repo.lookup import find_layer_by_diff_id
from cvmfs_common.repo.paths import RepositoryLayout
from publisher.maint.gc import freed_bytes
from publisher.core.runlock import exclusive, lock_path_for
from publisher.core.state import GC_UNFINISHED, State
from tests.fixtures.images import StandardImages

from tests.publisher.clirun import run_cli, run_proc, write_wishlist
from tests.fixtures.marks import requires_root
from tests.publisher.looprun import Images
from tests.publisher.repotree import fs_state


def _args(root: Path, db: Path) -> tuple:
    return ("--repository-root", root, "--state-db", db)


def _podman_names(lay: RepositoryLayout) -> set[str]:
    images = json.loads((lay.podman_store / "overlay-images/images.json").read_text())
    return {n for i in images for n in i.get("names", [])}


def _podman_ids(lay: RepositoryLayout) -> set[str]:
    return {i["id"] for i in json.loads((lay.podman_store / "overlay-images/images.json").read_text())}


def _figures(out: str) -> dict[str, int]:
    head = out.splitlines()[0]
    got = {what: int(n) for n, what in re.findall(r"(\d+) (tags?|images?|layers?|chains?|flat dirs?|podman images?)",
                                                  head)}
    freed = re.search(r"\((\d+) bytes\)", head)
    if freed:  # (on the cvmfs backend gc counts no bytes: only `cvmfs_server gc` frees storage)
        got["bytes"] = int(freed.group(1))
    return {k.rstrip("s") if k != "bytes" else k: v for k, v in got.items()}


def _freed_by_removing(paths: list[Path]) -> int:
    """What removing `paths` frees, worked out apart from publisher.maint.gc: the apparent size of
    each non-directory inode that find(1) lists under them, once per inode, and only when all
    its hard links are among them (a layer file hard-linked from a chain that stays frees nothing)."""
    res = subprocess.run(["find", *map(str, paths), "!", "-type", "d", "-printf", r"%D %i %n %s\n"],
                         capture_output=True, text=True, check=False)
    assert res.returncode == 0, res.stderr  # every path exists
    seen: Counter[tuple[str, str]] = Counter()
    facts: dict[tuple[str, str], tuple[int, int]] = {}
    for line in res.stdout.splitlines():
        dev, ino, nlink, size = line.split()
        seen[dev, ino] += 1
        facts[dev, ino] = int(nlink), int(size)
    return sum(size for key, (nlink, size) in facts.items() if seen[key] >= nlink)


def test_freed_bytes_counts_each_inode_once_and_only_when_all_its_links_go(tmp_path: Path) -> None:
    gone, stays = tmp_path / "gone", tmp_path / "stays"
    (gone / "sub").mkdir(parents=True)
    stays.mkdir()
    (gone / "a").write_bytes(b"a" * 1000)
    os.link(gone / "a", gone / "sub" / "a-again")  # both links go: 1000 bytes, once
    (gone / "b").write_bytes(b"b" * 300)
    os.link(gone / "b", stays / "b")  # a link stays: nothing freed
    os.symlink("a-target-of-17-ch", gone / "sym")  # a symlink's size is its target's length
    (tmp_path / "single").write_bytes(b"c" * 5)
    assert freed_bytes([gone]) == 1000 + 17
    assert freed_bytes([gone, stays]) == 1000 + 300 + 17
    assert freed_bytes([gone, gone / "sub", tmp_path / "single"]) == 1000 + 17 + 5  # a path given twice
    assert freed_bytes([tmp_path / "missing"]) == 0
    assert _freed_by_removing([gone, stays]) == 1000 + 300 + 17  # the helper the tests below trust


def test_freed_bytes_below_a_root_follows_no_symlink_on_the_way(tmp_path: Path) -> None:
    """A ``.layers/<xx>`` replaced by a symlink to elsewhere: the removal refuses to go
    through it (fsutil.beneath), so the size count must not walk or count what it points at."""
    root, outside = tmp_path / "repo", tmp_path / "outside"
    (outside / "cdef").mkdir(parents=True)
    (outside / "cdef" / "big").write_bytes(b"x" * 4096)
    (root / ".layers").mkdir(parents=True)
    os.symlink(outside, root / ".layers" / "ab")
    (root / ".layers" / "cd" / "real").mkdir(parents=True)
    (root / ".layers" / "cd" / "real" / "f").write_bytes(b"y" * 10)
    os.symlink(outside / "cdef", root / ".layers" / "cd" / "link")  # the named path itself a symlink
    planted, real, link = root / ".layers/ab/cdef", root / ".layers/cd/real", root / ".layers/cd/link"
    assert freed_bytes([planted, real, link], root) == 10 + len(str(outside / "cdef"))
    assert freed_bytes([planted]) == 4096  # without a root: by path, as for a path outside any repository


@requires_root
def test_dropped_tags_go_after_the_grace_period_shared_layers_stay(standard_images: StandardImages,
                                                                   tmp_path: Path) -> None:
    imgs = standard_images
    host = imgs.multilayer.host
    root, db = tmp_path / "repo", tmp_path / "state.db"
    lay = RepositoryLayout(root)
    all_tags = [f"{host}/test/multilayer:v1", f"{host}/test/tagged:1.0", f"{host}/test/tagged:1.1",
                f"{host}/test/tagged:2.0"]
    wishlist = write_wishlist(tmp_path / "w.yaml", all_tags)
    assert run_cli("convert", wishlist, *_args(root, db)).rc == 0
    write_wishlist(wishlist, all_tags[:2])  # 1.1 and 2.0 leave the wishlist
    assert run_cli("convert", wishlist, *_args(root, db)).rc == 0

    # inside the grace period: nothing
    res = run_cli("gc", "--older-than", "30d", *_args(root, db))
    assert res.rc == 0 and _figures(res.stdout)["tag"] == 0, res.stdout

    t10, t11, t20 = imgs.tagged["1.0"], imgs.tagged["1.1"], imgs.tagged["2.0"]
    keep_layers = set(t10.layers) | set(imgs.multilayer.layers)
    gone_layers = (set(t11.layers) | set(t20.layers)) - keep_layers
    keep_chains = set(chain_ids(t10.diff_ids)) | set(chain_ids(imgs.multilayer.diff_ids))
    gone_chains = (set(chain_ids(t11.diff_ids)) | set(chain_ids(t20.diff_ids))) - keep_chains
    assert gone_layers and gone_chains and set(t11.layers) & keep_layers  # 1.1 shares its base with 1.0
    expected_bytes = _freed_by_removing([lay.layer_dir(d) for d in gone_layers]
                                        + [lay.chain_dir(c) for c in gone_chains]
                                        + [lay.flat_dir(t.config_digest) for t in (t11, t20)]
                                        + [lay.link_path(host, "test/tagged", t) for t in ("1.1", "2.0")]
                                        + [lay.image_metadata_dir(host, "test/tagged", t) for t in ("1.1", "2.0")])

    before = fs_state(root)
    dry = run_cli("gc", "--older-than", "0s", "--dry-run", *_args(root, db))
    assert dry.rc == 0, dry.stdout
    assert fs_state(root) == before  # a dry run changes nothing
    want = {"tag": 2, "image": 2, "layer": len(gone_layers), "chain": len(gone_chains), "flat dir": 2,
            "podman image": 2}
    assert {k: v for k, v in _figures(dry.stdout).items() if k != "bytes"} == want, dry.stdout
    assert _figures(dry.stdout)["bytes"] == expected_bytes > 0, dry.stdout
    for d in gone_layers:
        assert f"layer {d}" in dry.stdout

    real = run_cli("gc", "--older-than", "0s", *_args(root, db))
    print("\n" + real.stdout)
    assert real.rc == 0, real.stdout
    assert _figures(real.stdout) == _figures(dry.stdout)
    for tag in ("1.1", "2.0"):
        assert not os.path.lexists(lay.link_path(host, "test/tagged", tag))
        assert not lay.image_metadata_dir(host, "test/tagged", tag).exists()
        assert f"{host}/test/tagged:{tag}" not in _podman_names(lay)
    diff_of = {d: diff for t in (imgs.multilayer, t10, t11, t20) for d, diff in zip(t.layers, t.diff_ids)}
    for d in gone_layers:
        assert not lay.layer_dir(d).exists()
        assert not os.path.lexists(lay.diffid_link(diff_of[d]))  # its .diffids link goes with it
    for d in keep_layers:
        assert find_layer_by_diff_id(lay, diff_of[d]).digest == d
    for c in gone_chains:
        assert not lay.chain_dir(c).exists()
    for t in (t11, t20):
        assert not os.path.lexists(lay.flat_dir(t.config_digest))
        assert t.config_digest[7:] not in _podman_ids(lay)
    # what stays is whole: shared layers and chains, links, podman, and check agrees
    for d in keep_layers:
        assert lay.layer_dir(d).is_dir()
    for c in keep_chains:
        assert lay.chain_dir(c).is_dir()
    assert (lay.link_path(host, "test/tagged", "1.0") / "version").read_text() == "1.0\n"
    assert {f"{host}/test/tagged:1.0", f"{host}/test/multilayer:v1"} <= _podman_names(lay)
    assert not any(lay.tmp_dir.iterdir())
    checked = run_cli("check", *_args(root, db))
    assert checked.rc == 0, checked.stdout
    with State.open(db, root) as st:
        assert st.counts()["tags"] == 2 and st.counts()["images"] == 2
        assert st.counts()["wishlist_entries"] == 2
        assert st.flag(GC_UNFINISHED) is None and st.trusted_layers()  # convert trusts the rows again
    again = run_cli("gc", "--older-than", "0s", *_args(root, db))
    assert again.rc == 0 and _figures(again.stdout)["bytes"] == 0 and _figures(again.stdout)["layer"] == 0


@requires_root
def test_gc_after_dropping_a_platform_removes_exactly_its_multiarch_entries(standard_images: StandardImages,
                                                                          tmp_path: Path) -> None:
    from tests.fixtures.images import host_arch

    other_arch = "arm64" if host_arch() != "arm64" else "amd64"
    names = {"amd64": "amd64", "arm64": "arm64:v8"}
    aliases = {"amd64": {"x86_64", "x86-64"}, "arm64": {"aarch64", "arm64"}}
    host = standard_images.multilayer.host
    root, db = tmp_path / "repo", tmp_path / "state.db"
    lay = RepositoryLayout(root)
    mdir = root / ".multiarch"
    inputs = [f"{host}/test/multiarch:v1", f"{host}/test/multilayer:v1"]
    wishlist = write_wishlist(tmp_path / "w.yaml", inputs, platforms=[f"linux/{host_arch()}", f"linux/{other_arch}"])
    assert run_cli("convert", wishlist, *_args(root, db)).rc == 0
    # a repository an older version wrote still has .platforms/: gc removes it
    (root / ".platforms/linux-arm64/old").mkdir(parents=True)
    assert set(os.listdir(mdir)) == {".podman", names[host_arch()], names[other_arch]} | aliases[host_arch()] \
        | aliases[other_arch]
    other_link = mdir / names[other_arch] / host / "test/multiarch:v1"
    assert other_link.is_dir()
    other_flat = os.path.realpath(other_link)
    before = {p: os.path.realpath(mdir / names[host_arch()] / host / p)
              for p in ("test/multiarch:v1", "test/multilayer:v1")}

    write_wishlist(wishlist, inputs, platforms=[f"linux/{host_arch()}"])
    assert run_cli("convert", wishlist, *_args(root, db)).rc == 0
    res = run_cli("gc", "--older-than", "0s", *_args(root, db))
    print("\n" + res.stdout)
    assert res.rc == 0, res.stdout
    # (multilayer has no arm64 image: its row for the platform records that, and goes too)
    assert _figures(res.stdout)["tag"] == 2 and _figures(res.stdout)["flat dir"] == 1, res.stdout
    # exactly the dropped platform's names: its arch dir, its aliases, its podman store's image
    assert set(os.listdir(mdir)) == {".podman", names[host_arch()]} | aliases[host_arch()]
    assert not os.path.lexists(other_flat)
    for p, flat in before.items():
        assert os.path.realpath(mdir / names[host_arch()] / host / p) == flat and os.path.isdir(flat)
    other_store = lay.for_platform("linux", other_arch).podman_store
    assert json.loads((other_store / "overlay-images/images.json").read_text()) == []
    assert not (root / ".platforms").exists()
    checked = run_cli("check", *_args(root, db))
    assert checked.rc == 0, checked.stdout


def test_the_image_a_moved_tag_left_goes_after_its_grace(registry, tmp_path: Path) -> None:
    images = Images(registry.host, tmp_path)
    root, db = tmp_path / "repo", tmp_path / "state.db"
    lay = RepositoryLayout(root)
    ref = f"{registry.host}/gc/moving:latest"
    images.push("one", "gc/moving", "latest")
    assert run_cli("convert-image", ref, *_args(root, db)).rc == 0
    old = images.pusher.describe("gc/moving", "latest")
    images.push("two", "gc/moving", "latest")
    assert run_cli("convert-image", ref, *_args(root, db)).rc == 0
    new = images.pusher.describe("gc/moving", "latest")

    assert _figures(run_cli("gc", "--older-than", "1h", *_args(root, db)).stdout)["image"] == 0
    res = run_cli("gc", "--older-than", "0s", *_args(root, db))
    assert res.rc == 0 and _figures(res.stdout)["image"] == 1 and _figures(res.stdout)["tag"] == 0, res.stdout
    assert not lay.layer_dir(old.layers[0]).exists() and not os.path.lexists(lay.flat_dir(old.config_digest))
    assert old.config_digest[7:] not in _podman_ids(lay)
    assert lay.layer_dir(new.layers[0]).is_dir()
    assert (lay.link_path(registry.host, "gc/moving", "latest") / "etc/version").read_text() == "two\n"
    assert run_cli("check", *_args(root, db)).rc == 0


def test_gc_waits_for_a_running_convert(registry, tmp_path: Path, capsys) -> None:
    images = Images(registry.host, tmp_path)
    images.push("one", "gc/locked", "v1")
    root, db = tmp_path / "repo", tmp_path / "state.db"
    assert run_cli("convert-image", f"{registry.host}/gc/locked:v1", *_args(root, db)).rc == 0
    held = threading.Event()
    release = threading.Event()

    def hold() -> None:
        with exclusive(lock_path_for(db)):
            held.set()
            release.wait(10)

    t = threading.Thread(target=hold)
    t.start()
    try:
        held.wait(5)
        res = run_cli("gc", "--older-than", "0s", "--lock-wait", "0s", *_args(root, db))
        assert res.rc == 2 and "another cvmfs-publisher" in capsys.readouterr().err
        threading.Timer(0.5, release.set).start()
        started = time.monotonic()
        res = run_cli("gc", "--older-than", "0s", "--dry-run", "--lock-wait", "30s", *_args(root, db))
        assert res.rc == 0 and time.monotonic() - started >= 0.4, res.stdout
    finally:
        release.set()
        t.join()


def test_gc_needs_an_existing_state(tmp_path: Path, capsys) -> None:
    assert run_cli("gc", "--repository-root", tmp_path / "nothing", "--state-db", tmp_path / "no.db").rc == 2
    assert "no state database" in capsys.readouterr().err
    assert run_cli("gc", "--state-db", tmp_path / "no.db").rc == 2
    assert "gc needs --repository-root" in capsys.readouterr().err
    assert not (tmp_path / "no.db").exists()


@pytest.mark.parametrize("bad", ["x", "10 parsecs", "1y"])
def test_gc_older_than_is_a_duration(tmp_path: Path, bad: str, capsys) -> None:
    with pytest.raises(SystemExit):
        run_cli("gc", "--older-than", bad, "--repository-root", tmp_path)
    assert "not a duration" in capsys.readouterr().err


def test_gc_refuses_the_conversion_options_it_would_ignore(tmp_path: Path) -> None:
    res = run_proc("gc", "--jobs", "2", "--repository-root", tmp_path, "--state-db", tmp_path / "state.db")
    assert res.rc == 2, res
    assert "usage: cvmfs-publisher gc" in res.stderr and "unrecognized arguments: --jobs 2" in res.stderr, res.stderr
    assert "Traceback" not in res.stderr and not (tmp_path / "state.db").exists()


@pytest.mark.parametrize("command, option", [
    ("gc", ["--min-transfer-rate", "5"]), ("gc", ["--insecure-registry", "r.example.org"]),
    ("check", ["--jobs", "2"]), ("check", ["--credentials", "auth.json"]), ("check", ["--no-thin-image"]),
    ("state", ["--image-timeout", "1h"]), ("state", ["--backend", "cvmfs"]),
])
def test_maintenance_commands_take_only_their_options(tmp_path: Path, command: str, option: list[str],
                                                      capsys) -> None:
    extra = ["rebuild"] if command == "state" else []
    with pytest.raises(SystemExit) as exited:
        run_cli(command, *extra, *option, "--repository-root", tmp_path)
    assert exited.value.code == 2
    assert f"unrecognized arguments: {option[0]}" in capsys.readouterr().err


@requires_root
def test_gc_on_the_cvmfs_backend_is_one_transaction(cvmfs_standin, standard_images: StandardImages,  # noqa: F811
                                                    tmp_path: Path) -> None:
    host = standard_images.multilayer.host
    repo = cvmfs_standin.mkfs("unpacked.example.org")
    db = tmp_path / "state.db"
    lay = RepositoryLayout(repo)
    wishlist = write_wishlist(tmp_path / "w.yaml", [f"{host}/test/tagged:1.0", f"{host}/test/tagged:2.0"],
                              repo="unpacked.example.org")
    args = ("--backend", "cvmfs", *_args(repo, db))
    assert run_cli("convert", wishlist, *args).rc == 0
    write_wishlist(wishlist, [f"{host}/test/tagged:1.0"], repo="unpacked.example.org")
    assert run_cli("convert", wishlist, *args).rc == 0

    cvmfs_standin.clear_log()
    assert run_cli("gc", "--older-than", "0s", "--dry-run", *args).rc == 0
    assert cvmfs_standin.commands() == []  # a dry run does not even look for a transaction
    res = run_cli("gc", "--older-than", "0s", *args)
    assert res.rc == 0 and _figures(res.stdout)["tag"] == 1, res.stdout
    commands = [c for c in cvmfs_standin.commands() if c[0] != "list"]
    t20 = standard_images.tagged["2.0"]
    # the names in one transaction, the content trees in one `ingest --delete` (catalog level)
    assert commands[:2] == [["transaction", "unpacked.example.org"], ["publish", "unpacked.example.org"]], commands
    assert [c[0] for c in commands[2:]] == ["ingest"] and commands[2][-1] == "unpacked.example.org", commands
    assert f"-d .flat/{t20.config_digest[7:9]}/{t20.config_digest[7:]}" in " ".join(commands[2]), commands
    assert cvmfs_standin.refusals() == [] and not cvmfs_standin.in_transaction("unpacked.example.org")
    assert "storage is freed by `cvmfs_server gc`" in res.stdout and "freed 0" not in res.stdout, res.stdout
    assert not os.path.lexists(lay.link_path(host, "test/tagged", "2.0"))
    assert not os.path.lexists(lay.flat_dir(t20.config_digest))
    assert (lay.link_path(host, "test/tagged", "1.0") / "version").read_text() == "1.0\n"
    checked = run_cli("check", *args)
    assert checked.rc == 0, checked.stdout

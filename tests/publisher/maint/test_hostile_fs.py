"""The publisher's file systems misbehaving: full, read-only, a directory where the state
DB should be. Clean errors and exit codes, nothing lost (issue 23, item 6)."""
from __future__ import annotations

import os
import subprocess
from pathlib import Path

import pytest

from cvmfs_common.repo.paths import RepositoryLayout
from publisher.core.state import State, reserve_path

from tests.publisher.clirun import run_proc, write_wishlist
from tests.publisher.looprun import Images
from tests.publisher.treeview import tree_snapshot
from tests.snapshotter.deep_tree import make_chain, remove_everything


@pytest.fixture
def small_fs(tmp_path: Path):
    """A 16 MiB tmpfs of its own (to fill it without filling the machine's disk)."""
    if os.geteuid() != 0:
        pytest.skip("needs root (mounts a tmpfs of its own)")
    mnt = tmp_path / "small"
    mnt.mkdir()
    res = subprocess.run(["mount", "-t", "tmpfs", "-o", "size=16m,mode=0755", "tmpfs", str(mnt)],
                         capture_output=True, text=True)
    if res.returncode != 0:
        pytest.skip(f"cannot mount a tmpfs: {res.stderr.strip()}")
    try:
        yield mnt
    finally:
        subprocess.run(["umount", "-l", str(mnt)], check=False)


def _fill(path: Path) -> None:
    fd = os.open(path, os.O_WRONLY | os.O_CREAT, 0o600)
    try:
        for block in (1 << 20, 4096, 1):
            try:
                while True:
                    os.write(fd, b"\0" * block)
            except OSError:
                continue
    finally:
        os.close(fd)


def _free(path: Path) -> int:
    st = os.statvfs(path)
    return st.f_bavail * st.f_frsize


def test_gc_frees_space_on_a_full_disk(registry, tmp_path: Path, small_fs: Path) -> None:
    images = Images(registry.host, tmp_path)
    images.make("big", {"/etc/version": "big\n", "/data/big": os.urandom(2_000_000).hex()})
    images.push("big", "full/big", "v1")
    images.push("small", "full/small", "v1")
    root, db = small_fs / "repo", small_fs / "state" / "s.db"
    args = ("--repository-root", root, "--state-db", db, "--no-podman-store")
    both = write_wishlist(tmp_path / "both.yaml", [f"{registry.host}/full/big:v1", f"{registry.host}/full/small:v1"])
    assert run_proc("convert", both, *args).rc == 0
    small = write_wishlist(tmp_path / "small.yaml", [f"{registry.host}/full/small:v1"])
    assert run_proc("convert", small, *args).rc == 0  # full/big is no longer wanted
    assert reserve_path(db).is_file()
    _fill(small_fs / "filler")
    assert _free(small_fs) < 64 * 1024

    res = run_proc("gc", "--older-than", "0s", *args)
    assert res.rc == 0, res.stdout + res.stderr
    assert "Traceback" not in res.stderr and "removed 1 tag, 1 image, 1 layer" in res.stdout, res.stdout + res.stderr
    assert "using its reserve" in res.stderr
    assert _free(small_fs) > 3_000_000  # the big layer (and its chain and flat dir) are gone
    lay = RepositoryLayout(root)
    assert not os.path.lexists(lay.link_path(registry.host, "full/big", "v1"))
    assert os.path.islink(lay.link_path(registry.host, "full/small", "v1"))
    with State.open(db, root) as state:  # the state forgot what went
        assert [t.key.repository for t in state.tag_rows()] == ["full/small"]
    assert run_proc("check", *args).rc == 0


def test_a_directory_in_place_of_the_state_db_is_a_clean_error(tmp_path: Path) -> None:
    db = tmp_path / "state.db"
    db.mkdir()
    wl = write_wishlist(tmp_path / "w.yaml", ["127.0.0.1:1/x/y:z"])
    res = run_proc("convert", wl, "--repository-root", tmp_path / "repo", "--state-db", db)
    assert res.rc == 2 and "Traceback" not in res.stderr, res.stderr
    assert f"state database {db} is not a file (a directory)" in res.stderr, res.stderr


def test_a_read_only_repository_is_a_clean_error(registry, tmp_path: Path, small_fs: Path) -> None:
    images = Images(registry.host, tmp_path)
    images.push("one", "ro/one", "v1")
    images.push("two", "ro/two", "v1")
    root, db = small_fs / "repo", tmp_path / "s.db"
    args = ("--repository-root", root, "--state-db", db)
    assert run_proc("convert", write_wishlist(tmp_path / "a.yaml", [f"{registry.host}/ro/one:v1"]), *args).rc == 0
    (RepositoryLayout(root).tmp_dir / "layer-left-over").mkdir(parents=True)  # a crashed run's work
    subprocess.run(["mount", "-o", "remount,ro", str(small_fs)], check=True)
    both = write_wishlist(tmp_path / "b.yaml", [f"{registry.host}/ro/one:v1", f"{registry.host}/ro/two:v1"])
    res = run_proc("convert", both, *args)
    assert res.rc == 1 and "Traceback" not in res.stderr, res.stdout + res.stderr
    assert "Read-only file system" in res.stdout + res.stderr, res.stdout + res.stderr
    gc = run_proc("gc", "--older-than", "0s", *args)
    assert gc.rc in (0, 1) and "Traceback" not in gc.stderr, gc.stdout + gc.stderr


def test_state_rebuild_skips_hostile_metadata_without_hanging(registry, tmp_path: Path, request) -> None:
    """Forged .metadata: JSON nested beyond the parser, a tree deeper than any tag name, a
    manifest.json that is a symlink to /dev/zero, a config.json that is a FIFO. The
    rebuild skips each (naming it), keeps the real tag, and never blocks on the FIFO."""
    images = Images(registry.host, tmp_path)
    images.push("real", "rebuild/real", "v1")
    root, db = tmp_path / "repo", tmp_path / "s.db"
    args = ("--repository-root", root, "--state-db", db, "--no-podman-store")
    assert run_proc("convert-image", f"{registry.host}/rebuild/real:v1", *args).rc == 0
    lay = RepositoryLayout(root)
    real = lay.image_metadata_dir(registry.host, "rebuild/real", "v1")

    def forged(tag: str) -> Path:
        d = lay.image_metadata_dir(registry.host, "rebuild/forged", tag)
        d.mkdir(parents=True)
        return d

    nested = forged("nested")
    (nested / "manifest.json").write_text("[" * 200_000 + "]" * 200_000)
    (nested / "config.json").write_bytes((real / "config.json").read_bytes())
    zero = forged("zero")
    os.symlink("/dev/zero", zero / "manifest.json")
    (zero / "config.json").write_bytes((real / "config.json").read_bytes())
    fifo = forged("fifo")
    (fifo / "manifest.json").write_bytes((real / "manifest.json").read_bytes())
    os.mkfifo(fifo / "config.json")
    deep = lay.metadata_root / "deep.example.org"
    deep.mkdir()
    # far deeper than PATH_MAX allows as one path; removed here, as pytest's own clean-up of
    # old base temp dirs recurses per level and would fail on it in a later run
    request.addfinalizer(lambda: remove_everything(str(deep)))
    make_chain(str(deep), 3000)

    res = run_proc("state", "rebuild", *args[:4], timeout=120)
    assert res.rc == 1 and "Traceback" not in res.stderr, res.stdout + res.stderr
    assert "state rebuild: 1 tags, 1 images, 1 layers" in res.stdout, res.stdout
    skipped = [line for line in res.stdout.splitlines() if "SKIPPED" in line]
    assert any("rebuild/forged:nested" in s and "nested too deeply" in s for s in skipped), skipped
    assert any("rebuild/forged:zero" in s and "symbolic link" in s for s in skipped), skipped
    assert any("rebuild/forged:fifo" in s and "config.json" in s and "not a regular file" in s for s in skipped), skipped
    assert any("deep.example.org" in s and "deeper than" in s for s in skipped), skipped
    with State.open(db, root) as state:
        assert [t.key.repository for t in state.published_tags()] == ["rebuild/real"]


def _plant(registry, tmp_path: Path) -> tuple[Path, tuple, Path]:
    """sym/a:v1 converted, then its `.metadata/<registry>/sym` and its layer's `.layers/<xx>`
    dirs moved outside the repository and symlinks to them put in their place."""
    images = Images(registry.host, tmp_path)
    images.push("a", "sym/a", "v1")
    images.make("b", {"/etc/version": "b\n", "/b": "bbb"})
    images.push("b", "sym/b", "v1")
    images.make("c", {"/etc/version": "c\n", "/c": "ccc"})
    images.push("c", "other/c", "v1")
    root, db = tmp_path / "repo", tmp_path / "s.db"
    args = ("--repository-root", root, "--state-db", db, "--no-podman-store")
    assert run_proc("convert", write_wishlist(tmp_path / "a.yaml", [f"{registry.host}/sym/a:v1"]), *args).rc == 0
    lay = RepositoryLayout(root)
    with State.open(db, root) as state:
        (a,) = state.published_tags()
        layer = state.image_layers(a.manifest_digest)[0].digest
    victim = tmp_path / "outside"
    victim.mkdir()
    for inside, name in ((lay.metadata_root / registry.host / "sym", "meta-sym"),
                         (lay.layer_dir(layer).parent, "layers-prefix")):
        os.rename(inside, victim / name)  # (what the repository had, now outside)
        os.symlink(victim / name, inside)
    return root, args, victim


def test_convert_never_writes_through_a_symlink_planted_in_the_repository(registry, tmp_path: Path) -> None:
    root, args, victim = _plant(registry, tmp_path)
    before = tree_snapshot(victim)
    b = run_proc("convert", write_wishlist(tmp_path / "b.yaml", [f"{registry.host}/sym/b:v1"]), *args)
    assert tree_snapshot(victim) == before
    assert b.rc == 1 and "Traceback" not in b.stderr, b.stdout + b.stderr
    assert "'sym' is a symlink or no directory; not followed" in b.stdout, b.stdout


def test_gc_never_removes_through_a_symlink_planted_in_the_repository(registry, tmp_path: Path) -> None:
    root, args, victim = _plant(registry, tmp_path)
    before = tree_snapshot(victim)
    c = run_proc("convert", write_wishlist(tmp_path / "c.yaml", [f"{registry.host}/other/c:v1"]), *args)
    assert c.rc == 0, c.stdout + c.stderr  # sym/a:v1 is no longer wanted
    gc = run_proc("gc", "--older-than", "0s", *args)
    assert tree_snapshot(victim) == before
    assert gc.rc == 1 and "Traceback" not in gc.stderr, gc.stdout + gc.stderr
    assert "not followed" in gc.stdout, gc.stdout


def test_a_full_state_disk_is_a_clean_error(registry, tmp_path: Path, small_fs: Path) -> None:
    images = Images(registry.host, tmp_path)
    images.push("one", "statefull/one", "v1")
    root, db = tmp_path / "repo", small_fs / "s.db"
    args = ("--repository-root", root, "--state-db", db, "--no-podman-store")
    wl = write_wishlist(tmp_path / "w.yaml", [f"{registry.host}/statefull/one:v1"])
    assert run_proc("convert", wl, *args).rc == 0
    reserve_path(db).unlink()  # (convert does not use it; gc would)
    _fill(small_fs / "filler")
    res = run_proc("convert", wl, *args)
    assert res.rc == 1 and "Traceback" not in res.stderr, res.stdout + res.stderr
    assert "the state database failed: disk I/O error" in res.stderr, res.stderr
    os.unlink(small_fs / "filler")
    again = run_proc("convert", wl, *args)
    assert again.rc == 0 and "1 unchanged" in again.stdout, again.stdout + again.stderr


def test_the_podman_store_is_never_written_or_swept_through_a_planted_symlink(registry, tmp_path: Path) -> None:
    images = Images(registry.host, tmp_path)
    images.push("a", "pod/a", "v1")
    images.make("b", {"/etc/version": "b\n", "/b": "bbb"})
    images.push("b", "pod/b", "v1")
    root, db = tmp_path / "repo", tmp_path / "s.db"
    args = ("--repository-root", root, "--state-db", db)
    assert run_proc("convert-image", f"{registry.host}/pod/a:v1", *args).rc == 0
    lay = RepositoryLayout(root)
    victim = tmp_path / "outside"
    (victim / "precious-dir").mkdir(parents=True)
    (victim / "precious").write_text("keep\n")
    victim.chmod(0o700)
    planted = lay.podman_store / "overlay-images"
    os.rename(planted, tmp_path / "was-overlay-images")
    os.symlink(victim, planted)
    before = tree_snapshot(victim)
    res = run_proc("convert-image", f"{registry.host}/pod/b:v1", *args)
    assert tree_snapshot(victim) == before
    assert res.rc == 1 and "Traceback" not in res.stderr, res.stdout + res.stderr
    assert "not followed" in res.stdout, res.stdout


def test_a_fifo_in_place_of_a_tags_manifest_json_is_replaced_not_waited_on(registry, tmp_path: Path) -> None:
    images = Images(registry.host, tmp_path)
    images.push("a", "fifo/a", "v1")
    root, db = tmp_path / "repo", tmp_path / "s.db"
    args = ("--repository-root", root, "--state-db", db, "--no-podman-store")
    assert run_proc("convert-image", f"{registry.host}/fifo/a:v1", *args).rc == 0
    manifest = RepositoryLayout(root).manifest_json(registry.host, "fifo/a", "v1")
    good = manifest.read_bytes()
    manifest.unlink()
    os.mkfifo(manifest)
    res = run_proc("check", *args, timeout=120)  # found by check (convert trusts the state), not waited on
    assert res.rc == 1 and "is a FIFO" in res.stdout, res.stdout + res.stderr
    res = run_proc("convert-image", f"{registry.host}/fifo/a:v1", *args, timeout=120)
    assert res.rc == 0, res.stdout + res.stderr
    assert manifest.is_file() and manifest.read_bytes() == good

"""convert writes a run's podman store entries at once (publisher/sync/convert.py, podman_store.PodmanBatch):
a kill -9 between images leaves well-formed store files, the next run repairs the store to what
the state says, and real podman then sees and runs every image."""
from __future__ import annotations

import json
import signal
import sqlite3
from pathlib import Path

import pytest

from cvmfs_common.repo.paths import RepositoryLayout
from tests.fixtures.images import busybox_entries
from tests.fixtures.layers import Entry, Layer
from tests.fixtures.polling import wait_until
from tests.fixtures.workdirs import new_workdir, remove_workdir

from tests.publisher.clirun import popen_cli, push_image, run_cli, write_wishlist
from tests.publisher.inflight import wait_for_work
from tests.publisher.podmanenv import Podman, podman_missing


FILES = 2_000  # the second image unpacks for a moment: the kill lands in it


def _published_configs(db: Path) -> set[str]:
    conn = sqlite3.connect(f"file:{db}?mode=ro", uri=True, timeout=10)
    try:
        rows = conn.execute("SELECT i.config_digest FROM tags t JOIN images i "
                            "ON i.manifest_digest = t.manifest_digest").fetchall()
    except sqlite3.OperationalError:  # not created yet
        rows = []
    finally:
        conn.close()
    return {r[0] for r in rows}


def _store_json(lay: RepositoryLayout) -> tuple[list, list]:
    """images.json and layers.json, which must parse whenever they exist (never partial)."""
    out = []
    for path in (lay.podman_store / "overlay-images/images.json", lay.podman_store / "overlay-layers/layers.json"):
        out.append(json.loads(path.read_bytes()) if path.exists() else [])
    return out[0], out[1]


def test_kill_9_between_images_then_next_run_repairs_the_store(registry, tmp_path: Path) -> None:
    if why := podman_missing():
        pytest.skip(why)
    base = Layer.from_entries(busybox_entries())
    small = push_image(registry.host, tmp_path / "small", "batch/small", "v1",
                       [base, Layer.from_entries([Entry.dir("/srv"), Entry.file("/srv/small", "small\n")])])
    many = [Entry.dir("/many")] + [Entry.dir(f"/many/d{i:03d}") for i in range(100)]
    many += [Entry.file(f"/many/d{i % 100:03d}/f{i:05d}", f"{i}\n" * 20) for i in range(FILES)]
    big = push_image(registry.host, tmp_path / "big", "batch/big", "v1",
                     [base, Layer.from_entries(many), Layer.from_entries([Entry.file("/srv/big", "big\n")])])
    root, db = tmp_path / "repo", tmp_path / "state.db"
    lay = RepositoryLayout(root)
    wl = write_wishlist(tmp_path / "wl.yaml", [small.ref, big.ref])
    args = ("convert", wl, "--repository-root", root, "--state-db", db, "--no-thin-image", "--jobs", "2")

    proc = popen_cli(*args, "--log-level", "debug", log=tmp_path / "killed.log")
    try:  # the small image is done (recorded in the state) once the big one's layer unpacks
        wait_until(lambda: db.exists() and _published_configs(db), 120, "the small image recorded", interval=0.005)
        wait_for_work(lay.tmp_dir, "layer-", timeout=120)
        proc.send_signal(signal.SIGKILL)
        proc.wait(timeout=30)
    finally:
        if proc.poll() is None:
            proc.kill()
            proc.wait()
    log = (tmp_path / "killed.log").read_text()
    assert proc.returncode == -signal.SIGKILL, log
    assert _published_configs(db) == {small.config_digest}, log
    images, layers = _store_json(lay)
    # The run's entries are written at its end (or after a minute): the store lags the state,
    # its files are whole, and it holds nothing the state does not know.
    assert images == [] and layers == [], log

    again = run_cli(*args)
    assert again.rc == 0, again.stdout
    assert _published_configs(db) == {small.config_digest, big.config_digest}
    images, _ = _store_json(lay)
    assert {i["id"] for i in images} == {small.config_digest[7:], big.config_digest[7:]}
    checked = run_cli("check", "--repository-root", root, "--state-db", db)
    assert checked.rc == 0 and ": 0 problems" in checked.stdout, checked.stdout

    work = new_workdir("podman-batch-")
    try:
        podman = Podman(work, stores=[lay.podman_store])
        names = podman.image_names()
        assert {f"{img.host}/{img.name}:v1" for img in (small, big)} <= names, names
        assert podman.run(f"{small.host}/{small.name}:v1", "/bin/cat", "/srv/small").stdout == "small\n"
        assert podman.run(f"{big.host}/{big.name}:v1", "/bin/cat", "/srv/big").stdout == "big\n"
    finally:
        remove_workdir(work)

    # now current: a re-sync publishes nothing again
    third = run_cli(*args)
    assert third.rc == 0 and "2 unchanged" in third.stdout, third.stdout


def test_a_failed_store_write_fails_its_images_and_the_next_run_repairs(registry, tmp_path: Path) -> None:
    base = Layer.from_entries(busybox_entries())
    img = push_image(registry.host, tmp_path / "img", "batch/fails", "v1",
                     [base, Layer.from_entries([Entry.file("/srv/fails", "x\n")])])
    root, db = tmp_path / "repo", tmp_path / "state.db"
    lay = RepositoryLayout(root)
    images_json = lay.podman_store / "overlay-images/images.json"
    images_json.mkdir(parents=True)  # unreadable as the store's file: writing the store fails
    wl = write_wishlist(tmp_path / "wl.yaml", [img.ref])
    args = ("convert", wl, "--repository-root", root, "--state-db", db, "--no-thin-image")
    res = run_cli(*args)
    assert res.rc == 1, res.stdout
    assert f"FAILED {img.ref}" in res.stdout and "podman store" in res.stdout, res.stdout
    assert lay.manifest_json(img.host, img.name, img.tag).is_file()  # the rest is published

    images_json.rmdir()
    again = run_cli(*args)
    assert again.rc == 0, again.stdout
    assert [i["id"] for i in _store_json(lay)[0]] == [img.config_digest[7:]]
    checked = run_cli("check", "--repository-root", root, "--state-db", db)
    assert checked.rc == 0 and ": 0 problems" in checked.stdout, checked.stdout

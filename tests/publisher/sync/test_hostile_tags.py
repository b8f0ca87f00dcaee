"""A registry's tag list is data: a listed name that is no valid tag (``*``, glob
characters) is skipped and counted, and never costs a wanted image (issue 23, item 1)."""
from __future__ import annotations

import os
import re
import shutil
import time
from pathlib import Path

from cvmfs_common.repo.paths import RepositoryLayout
from publisher.core.state import RunCounts, State
from tests.fixtures.layers import Entry, Layer

from tests.publisher.clirun import push_image, run_proc, write_wishlist


def _plant_tags(registry, repository: str, source_tag: str, names: list[str]) -> None:
    """The registry lists whatever its storage holds: tags no client could push."""
    tags = registry.storage / f"docker/registry/v2/repositories/{repository}/_manifests/tags"
    for name in names:
        shutil.copytree(tags / source_tag, tags / name)


def _gc_removed_tags(out: str) -> int:
    return int(re.search(r"(\d+) tags?", out.splitlines()[0]).group(1))


def test_a_tag_named_star_is_skipped_and_gc_keeps_the_wanted_image(registry, tmp_path: Path) -> None:
    img = push_image(registry.host, tmp_path, "glob/star", "v1", [Layer.from_entries([Entry.file("/a", "a")])])
    root, db = tmp_path / "repo", tmp_path / "s.db"
    args = ("--repository-root", root, "--state-db", db, "--no-podman-store")
    wishlist = write_wishlist(tmp_path / "w.yaml", [f"{registry.host}/glob/star:*"])
    first = run_proc("convert", wishlist, *args)
    assert first.rc == 0 and "1 new" in first.stdout, first.stdout + first.stderr

    _plant_tags(registry, "glob/star", "v1", ["*", "v[1]", "x?"])
    again = run_proc("convert", wishlist, *args)
    assert again.rc == 0, again.stdout + again.stderr
    assert "Traceback" not in again.stderr, again.stderr
    assert "1 images: 0 new, 0 updated, 1 unchanged" in again.stdout, again.stdout
    assert "skipped 3 invalid tag names from registry tag lists" in again.stdout, again.stdout
    assert "skipping '*' from the registry's tag list" in again.stderr, again.stderr

    gc = run_proc("gc", "--older-than", "0s", *args)
    assert gc.rc == 0 and _gc_removed_tags(gc.stdout) == 0, gc.stdout + gc.stderr
    link = RepositoryLayout(root).link_path(registry.host, "glob/star", img.tag)
    assert os.path.islink(link) and (link / "a").read_text() == "a"


def test_a_run_that_could_not_list_an_entrys_tags_does_not_count_for_gc(registry, tmp_path: Path) -> None:
    """The tag list fails (here: the repository is gone from the registry): the tags of
    that glob were not looked at, so gc keeps them."""
    img = push_image(registry.host, tmp_path, "glob/gone", "v1", [Layer.from_entries([Entry.file("/b", "b")])])
    root, db = tmp_path / "repo", tmp_path / "s.db"
    args = ("--repository-root", root, "--state-db", db, "--no-podman-store")
    wishlist = write_wishlist(tmp_path / "w.yaml", [f"{registry.host}/glob/gone:*"])
    assert run_proc("convert", wishlist, *args).rc == 0
    shutil.rmtree(registry.storage / "docker/registry/v2/repositories/glob/gone")

    again = run_proc("convert", wishlist, *args)
    assert again.rc == 1 and "listing tags" in again.stdout, again.stdout + again.stderr
    gc = run_proc("gc", "--older-than", "0s", *args)
    assert gc.rc == 0 and _gc_removed_tags(gc.stdout) == 0, gc.stdout + gc.stderr
    assert os.path.islink(RepositoryLayout(root).link_path(registry.host, "glob/gone", img.tag))
    assert "does not count as a full look at the wishlists for gc" in again.stderr, again.stderr


def test_gc_never_removes_a_tag_the_current_wishlist_names(registry, tmp_path: Path) -> None:
    """Defence in depth: even a state that records a finished full run which did not
    touch a tag the wishlist names (as the crash of issue 23 left it) costs nothing."""
    img = push_image(registry.host, tmp_path, "named/keep", "v1", [Layer.from_entries([Entry.file("/c", "c")])])
    root, db = tmp_path / "repo", tmp_path / "s.db"
    args = ("--repository-root", root, "--state-db", db, "--no-podman-store")
    wishlist = write_wishlist(tmp_path / "w.yaml", [img.ref])
    assert run_proc("convert", wishlist, *args).rc == 0
    with State.open(db, root) as state:  # a later "full" run that read the wishlist and saw no tag
        later = time.time() + 5
        run = state.begin_run("convert", now=later)
        for reference, platform in state.conn.execute("SELECT reference, platform FROM wishlist_entries").fetchall():
            state.upsert_entry(reference, platform, "w.yaml:6", now=later + 1)
        state.finish_run(run, RunCounts(0, 0, 0, 0, 0, 0), now=later + 2)
    gc = run_proc("gc", "--older-than", "0s", *args)
    assert gc.rc == 0 and _gc_removed_tags(gc.stdout) == 0, gc.stdout + gc.stderr
    assert os.path.islink(RepositoryLayout(root).link_path(registry.host, "named/keep", img.tag))

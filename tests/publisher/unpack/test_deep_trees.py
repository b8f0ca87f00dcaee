"""Images with directory trees deeper than PATH_MAX and Python's recursion limit, through
the real `cvmfs-publisher` processes: convert, gc, convert again, check."""
from __future__ import annotations

import os
import sys
from pathlib import Path

from cvmfs_common.repo.paths import RepositoryLayout
from cvmfs_common.fsutil.atomic import remove_tree
from tests.fixtures.layers import Entry, Layer

from tests.publisher.clirun import push_image, run_proc, write_wishlist


DEPTH = 5000  # "d/" per level: 10 000-byte paths (PATH_MAX is 4096)


def deep_layer(depth: int) -> Layer:
    entries, path = [], ""
    for _ in range(depth):
        path += "/d"
        entries.append(Entry.dir(path))
    entries.append(Entry.file(path + "/bottom.txt", "the bottom\n"))
    return Layer.from_entries(entries)


def read_bottom(top: Path, depth: int) -> str:
    fd = os.open(top, os.O_RDONLY | os.O_DIRECTORY)
    try:
        for _ in range(depth):
            sub = os.open("d", os.O_RDONLY | os.O_DIRECTORY, dir_fd=fd)
            os.close(fd)
            fd = sub
        with open(os.open("bottom.txt", os.O_RDONLY, dir_fd=fd)) as f:
            return f.read()
    finally:
        os.close(fd)


def test_a_tree_deeper_than_path_max_converts_gcs_and_converts_again(registry, tmp_path: Path) -> None:
    assert sys.getrecursionlimit() < DEPTH
    base = Layer.from_entries([Entry.dir("/etc"), Entry.file("/etc/os-release", "ID=deep\n")])
    img = push_image(registry.host, tmp_path, "deep/tree", "v1", [base, deep_layer(DEPTH)])
    root, db = tmp_path / "repo", tmp_path / "state.db"
    lay = RepositoryLayout(root)
    args = ("--repository-root", root, "--state-db", db)
    wishlist = write_wishlist(tmp_path / "w.yaml", [img.ref])
    empty = write_wishlist(tmp_path / "empty.yaml", [f"{registry.host}/deep/tree:none-*"])
    try:
        first = run_proc("convert", wishlist, *args)
        assert first.rc == 0, first.stderr
        top_chain = lay.chain_dir(img.chain_ids()[-1])
        assert read_bottom(lay.layerfs(img.layers[1]), DEPTH) == "the bottom\n"
        assert read_bottom(top_chain, DEPTH) == "the bottom\n"

        # The image leaves the wishlist; gc removes its deep layer and chain dirs.
        assert run_proc("convert", empty, *args).rc == 0
        gc = run_proc("gc", "--older-than", "0s", *args)
        assert gc.rc == 0, gc.stdout + gc.stderr
        assert "removed 1 tag" in gc.stdout and "2 layers" in gc.stdout, gc.stdout
        assert not os.path.lexists(top_chain) and not os.path.lexists(lay.layer_dir(img.layers[1]))
        assert os.listdir(lay.tmp_dir) == []

        again = run_proc("convert", wishlist, *args)
        assert again.rc == 0 and "1 new" in again.stdout, again.stdout + again.stderr
        assert read_bottom(top_chain, DEPTH) == "the bottom\n"
        check = run_proc("check", *args)
        assert check.rc == 0 and "0 problems" in check.stdout, check.stdout + check.stderr
    finally:
        remove_tree(root)  # pytest's own clean-up recurses

"""A batched round whose unit fails as a whole fails every image of it, reported (cvmfs stand-in)."""

from __future__ import annotations

from pathlib import Path

from publisher.core.state import State
from tests.fixtures.layers import Entry, Layer
from tests.publisher.clirun import push_image, run_cli, write_wishlist

BASE = [Layer.from_entries([Entry.dir("/etc"), Entry.file("/etc/base", "base\n")])]


def _top(text: str) -> Layer:
    return Layer.from_entries([Entry.dir("/app"), Entry.file(f"/app/{text}", text + "\n")])


def test_a_unit_that_cannot_open_fails_each_of_its_images(registry, cvmfs_standin, tmp_path: Path) -> None:
    """The transaction is refused (here: the repository was written outside one, which the
    stand-in refuses as a release manager would): no image of the round may go unreported,
    and the run must not succeed."""
    repo = cvmfs_standin.mkfs("unpacked.example.org")
    db, wl = tmp_path / "state.db", tmp_path / "w.yaml"
    a = push_image(registry.host, tmp_path / "a", "units/a", "v1", [*BASE, _top("a")])
    b = push_image(registry.host, tmp_path / "b", "units/b", "v1", [*BASE, _top("b")])
    c = push_image(registry.host, tmp_path / "c", "units/c", "v1", [*BASE, _top("c")])
    write_wishlist(wl, [a.ref])
    first = run_cli("convert", wl, "--backend", "cvmfs", "--repository-root", repo, "--state-db", db)
    assert first.rc == 0, first.stdout

    (repo / "stray").write_text("written outside a transaction\n")
    write_wishlist(wl, [a.ref, b.ref, c.ref])
    res = run_cli("convert", wl, "--backend", "cvmfs", "--repository-root", repo, "--state-db", db)
    assert res.rc != 0, res.stdout
    assert "2 failed" in res.stdout, res.stdout
    assert res.stdout.count("written outside a transaction") >= 2, res.stdout
    with State.open(db, repo) as state:
        for img in (b, c):
            tags = [t for t in state.tag_rows() if t.key.repository == img.name]
            assert tags and tags[0].last_error and "outside a transaction" in tags[0].last_error

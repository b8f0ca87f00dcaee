"""A new tag on a base the repository has, through a real CernVM-FS 2.12 stratum 0: the
revision leaves the nested catalogs of the base's layer and chain dirs as they were: no
origin.json appended (docs/DESIGN.md#origin), and the new chain links nothing published of
its parent chain (a link copies the entry up with its dirs, and publish rewrites the
parent chain's catalog)."""
from __future__ import annotations

import pytest

from cvmfs_common.oci.digest import chain_ids
from cvmfs_common.repo.paths import RepositoryLayout
from tests.publisher.clirun import write_wishlist

from .publishing import assert_check_clean, convert
from .stratum0 import Repository, Stratum0

pytestmark = pytest.mark.e2e


def catalog_hashes(repo: Repository) -> dict[str, str]:
    """Every catalog's mount point -> its content hash (`cvmfs_server list-catalogs -x -h`)."""
    out = repo.server("list-catalogs", "-x", "-h", repo.name).stdout
    hashes: dict[str, str] = {}
    for line in out.splitlines():
        words = line.split()
        if len(words) >= 2 and words[-1].startswith("/"):
            hashes[words[-1]] = words[0]
        elif len(words) >= 2 and words[0].startswith("/"):
            hashes[words[0]] = words[-1]
    assert hashes, out
    return hashes


DUMP = """import sys, zlib, sqlite3, tempfile
def rows(h):
    data = zlib.decompress(open(f"/srv/cvmfs/{sys.argv[1]}/data/{h[:2]}/{h[2:]}C", "rb").read())
    f = tempfile.NamedTemporaryFile(suffix=".db", delete=False); f.write(data); f.close()
    c = sqlite3.connect(f.name)
    out = set(map(repr, c.execute("SELECT * FROM catalog").fetchall()))
    out |= set(map(repr, c.execute("SELECT * FROM properties").fetchall()))
    out |= set(map(repr, c.execute("SELECT * FROM nested_catalogs").fetchall()))
    return out
a, b = rows(sys.argv[2]), rows(sys.argv[3])
print("-", sorted(a - b)[:10]); print("+", sorted(b - a)[:10])
"""


def catalog_diff(repo: Repository, old: str, new: str) -> str:
    (repo.s0.host_w / "catdiff.py").write_text(DUMP)
    return repo.s0.sh(f"python3 /w/catdiff.py {repo.name} {old} {new}", check=False).stdout


def test_a_new_tag_on_a_known_base_leaves_the_base_catalogs_alone(stratum0: Stratum0, standard_images) -> None:
    name = "unpacked.knownbase.test"
    repo = stratum0.mkfs(name)
    db = "/w/state/knownbase.db"
    a, b = standard_images.tagged["1.0"], standard_images.tagged["2.0"]
    base = [d for d in a.layers if d in b.layers]
    base_chains = [c for c in chain_ids(a.diff_ids) if c in chain_ids(b.diff_ids)]
    assert base and base_chains, "the fixture's tags share no base"
    write_wishlist(stratum0.host_w / "knownbase.yaml", [a.ref], repo=name)
    convert(stratum0, repo, "/w/knownbase.yaml", db)
    lay = RepositoryLayout("/")
    watched = (["/" + str(lay.layer_dir(d).relative_to("/")) for d in base]
               + ["/" + str(lay.chain_dir(c).relative_to("/")) for c in base_chains])
    before = catalog_hashes(repo)
    assert all(w in before for w in watched), (watched, before)

    write_wishlist(stratum0.host_w / "knownbase.yaml", [a.ref, b.ref], repo=name)
    revision = repo.revision()
    out = convert(stratum0, repo, "/w/knownbase.yaml", db).stdout
    assert "1 new" in out, out
    assert repo.revision() > revision
    after = catalog_hashes(repo)
    changed = [w for w in watched if after.get(w) != before[w]]
    assert changed == [], (changed, [catalog_diff(repo, before[w], after[w]) for w in changed],
                           chain_ids(a.diff_ids), chain_ids(b.diff_ids))
    assert_check_clean(repo)

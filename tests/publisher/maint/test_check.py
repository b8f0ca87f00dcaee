"""`cvmfs-publisher check`: the repository against the state, problems named by the images they hurt."""
from __future__ import annotations

import json
import os
from pathlib import Path

from cvmfs_common.oci.digest import chain_ids
from cvmfs_common.repo.paths import RepositoryLayout
from cvmfs_common.fsutil.atomic import remove_tree
from tests.fixtures.images import StandardImages, host_arch

from tests.publisher.clirun import run_cli, run_proc, write_wishlist
from tests.fixtures.marks import requires_root

OTHER_ARCH = "arm64" if host_arch() != "arm64" else "amd64"


def _convert(images: StandardImages, tmp_path: Path) -> tuple[Path, Path, str]:
    host = images.multilayer.host
    root, db = tmp_path / "repo", tmp_path / "state.db"
    wishlist = write_wishlist(tmp_path / "w.yaml", [
        f"{host}/test/multilayer:v1", f"{host}/test/multilayer-docker:v1", f"{host}/test/tagged:*",
        f"{host}/test/multiarch:v1"], platforms=[f"linux/{host_arch()}", f"linux/{OTHER_ARCH}"])
    res = run_cli("convert", wishlist, "--repository-root", root, "--state-db", db)
    assert res.rc == 0, res.stdout
    return root, db, host


def _check(root: Path, db: Path, *extra: str):
    return run_cli("check", "--repository-root", root, "--state-db", db, *extra)


def _problem_lines(out: str) -> list[str]:
    return [l.strip() for l in out.splitlines() if l.strip().startswith("PROBLEM")]


@requires_root
def test_a_sound_repository_passes(standard_images: StandardImages, tmp_path: Path) -> None:
    root, db, _ = _convert(standard_images, tmp_path)
    res = _check(root, db)
    print("\n" + res.stdout)
    assert res.rc == 0, res.stdout
    assert ": 0 problems" in res.stdout and "tags" in res.stdout


@requires_root
def test_deleted_layer_is_reported_with_the_image_it_hurts(standard_images: StandardImages, tmp_path: Path) -> None:
    root, db, host = _convert(standard_images, tmp_path)
    lay = RepositoryLayout(root)
    t20 = standard_images.tagged["2.0"]
    top = t20.layers[-1]  # only 2.0 has it
    remove_tree(lay.layer_dir(top))
    res = _check(root, db)
    print("\n" + res.stdout)
    assert res.rc == 1
    lines = _problem_lines(res.stdout)
    name = f"{host}/test/tagged:2.0 (linux/{host_arch()})"
    mine = [l for l in lines if top in l or top[7:] in l]
    assert mine and all(l.endswith(f"hurts {name}") for l in mine), lines
    assert any(f"layer {top}: .layers/" in l and "is missing" in l for l in mine), lines
    # the podman store sees it too: the layer's diff link dangles
    assert any(l.startswith("PROBLEM podman store podmanStore: layer ") for l in mine), lines
    assert all(name in l for l in lines), lines  # nothing else is hurt

    assert "the next convert publishes the 1 hurt tag(s) again (1 newly marked)" in res.stdout, res.stdout

    # check marked the tag: the next convert publishes it again, the others stay unchanged
    again = run_proc("convert", tmp_path / "w.yaml", "--repository-root", root, "--state-db", db)
    assert again.rc == 0 and "1 updated" in again.stdout, again.stdout
    assert f"repaired: layer {top}: .layers/" in again.stderr, again.stderr
    assert _check(root, db).rc == 0
    again = run_cli("convert", tmp_path / "w.yaml", "--repository-root", root, "--state-db", db)
    assert again.rc == 0 and "0 updated" in again.stdout, again.stdout


@requires_root
def test_convert_alone_trusts_the_state_check_marks_what_it_finds(standard_images: StandardImages,
                                                                   tmp_path: Path) -> None:
    """The unchanged-tag test reads the state, not the image's dirs (each a nested catalog
    on CernVM-FS): a lost chain is not seen by convert until check marks its tag."""
    root, db, host = _convert(standard_images, tmp_path)
    lay = RepositoryLayout(root)
    t20 = standard_images.tagged["2.0"]
    remove_tree(lay.chain_dir(t20.chain_ids()[-1]))
    args = (tmp_path / "w.yaml", "--repository-root", root, "--state-db", db)
    again = run_cli("convert", *args)
    assert again.rc == 0 and "0 updated" in again.stdout, again.stdout
    assert _check(root, db).rc == 1
    again = run_cli("convert", *args)
    assert again.rc == 0 and "1 updated" in again.stdout, again.stdout
    assert lay.chain_dir(t20.chain_ids()[-1]).is_dir()
    assert _check(root, db).rc == 0


@requires_root
def test_each_kind_of_damage_names_its_image(standard_images: StandardImages, tmp_path: Path) -> None:
    root, db, host = _convert(standard_images, tmp_path)
    lay = RepositoryLayout(root)
    imgs = standard_images
    native = f"linux/{host_arch()}"
    # a link gone, a manifest.json changed, a chain gone, a podman entry gone, a foreign platform's link
    os.unlink(lay.link_path(host, "test/multilayer-docker", "v1"))
    lay.manifest_json(host, "test/tagged", "1.0").write_text("{}")
    shared_chain = chain_ids(imgs.tagged["1.1"].diff_ids)[-1]  # 1.1's top chain is 2.0's middle one
    remove_tree(lay.chain_dir(shared_chain))
    plat = lay.for_platform("linux", OTHER_ARCH)
    os.unlink(plat.link_path(host, "test/multiarch", "v1"))
    images_json = lay.podman_store / "overlay-images/images.json"
    entries = json.loads(images_json.read_text())
    multilayer_id = imgs.multilayer.config_digest[7:]
    images_json.write_text(json.dumps([e for e in entries if e["id"] != multilayer_id]))

    res = _check(root, db)
    print("\n" + res.stdout)
    assert res.rc == 1
    lines = _problem_lines(res.stdout)

    def hurt(fragment: str) -> list[str]:
        return [l for l in lines if fragment in l]

    assert hurt(f"link {host}/test/multilayer-docker:v1 is missing")[0].endswith(
        f"hurts {host}/test/multilayer-docker:v1 ({native})")
    assert hurt(f".metadata/{host}/test/tagged:1.0/manifest.json is sha256:")[0].endswith(
        f"hurts {host}/test/tagged:1.0 ({native})")
    chain = hurt(f"chain {shared_chain}")[0]
    assert f"{host}/test/tagged:1.1 ({native})" in chain and f"{host}/test/tagged:2.0 ({native})" in chain
    other_name = "arm64:v8" if OTHER_ARCH == "arm64" else OTHER_ARCH
    assert hurt(f"link .multiarch/{other_name}/{host}/test/multiarch:v1 is missing")[0].endswith(
        f"hurts {host}/test/multiarch:v1 (linux/{OTHER_ARCH})")
    podman = hurt(f"image {multilayer_id} is not in images.json")[0]
    # the OCI and the Docker manifest share one config: both are hurt
    assert f"{host}/test/multilayer:v1 ({native})" in podman and f"{host}/test/multilayer-docker:v1" in podman
    assert f"{len(lines)} problems" in res.stdout.splitlines()[0]

    # an older layout: a .flat symlink, a flat dir without .singularity.d, a missing alias,
    # a missing .multiarch link of the default platform, a leftover .platforms/
    flat = lay.flat_dir(imgs.tagged["2.0"].config_digest)
    remove_tree(flat)
    os.symlink("../../.chains/xx", flat)
    remove_tree(lay.flat_dir(imgs.multilayer.config_digest) / ".singularity.d")
    native_name = "arm64:v8" if host_arch() == "arm64" else host_arch()
    alias = {"amd64": "x86_64", "arm64:v8": "aarch64"}[native_name]
    os.unlink(lay.root / ".multiarch" / alias)
    os.unlink(lay.root / ".multiarch" / native_name / host / "test/tagged:1.1")
    (lay.root / ".platforms").mkdir()
    lines = _problem_lines(_check(root, db).stdout)
    assert hurt2(lines, "is a symlink (an older layout")[0].endswith(f"hurts {host}/test/tagged:2.0 ({native})")
    assert f"{host}/test/multilayer:v1 ({native})" in hurt2(lines, "has no .singularity.d")[0]
    assert hurt2(lines, f"alias .multiarch/{alias} does not point to {native_name}")
    assert hurt2(lines, f"link .multiarch/{native_name}/{host}/test/tagged:1.1 is missing")[0].endswith(
        f"hurts {host}/test/tagged:1.1 ({native})")
    assert hurt2(lines, ".platforms: the older per-platform layout")

    # --no-podman-store: the podman problem is not looked for
    res = _check(root, db, "--no-podman-store")
    assert not [l for l in _problem_lines(res.stdout) if "podman" in l]


def hurt2(lines: list[str], fragment: str) -> list[str]:
    return [l for l in lines if fragment in l]


def test_check_needs_an_existing_state(tmp_path: Path, capsys) -> None:
    assert _check(tmp_path / "repo", tmp_path / "none.db").rc == 2
    assert "no state database" in capsys.readouterr().err


@requires_root
def test_a_lost_layerfs_is_found_by_check_and_repaired_by_the_next_convert(standard_images: StandardImages,
                                                                            tmp_path: Path) -> None:
    img = standard_images.multilayer
    root, db = tmp_path / "repo", tmp_path / "state.db"
    args = ("--repository-root", root, "--state-db", db)
    lay = RepositoryLayout(root)
    wishlist = write_wishlist(tmp_path / "w.yaml", [img.ref])
    assert run_proc("convert", wishlist, *args).rc == 0
    victim = img.layers[1]
    remove_tree(lay.layerfs(victim))  # the layer dir stays, half-present
    stray = lay.layer_dir("sha256:" + "ab" * 32)
    stray.mkdir(parents=True)  # a layer dir no image uses, with nothing in it

    res = run_proc("check", *args)
    assert res.rc == 1, res.stdout + res.stderr
    lines = _problem_lines(res.stdout)
    assert any(f"layer {victim}: .layers/" in l and "layerfs is missing" in l and img.ref.split("/", 1)[1] in l
               for l in lines), lines
    assert any(l.startswith(f"PROBLEM {os.path.relpath(stray, root)}: layerfs is missing") for l in lines), lines

    again = run_proc("convert", wishlist, *args)
    assert again.rc == 0 and "1 updated" in again.stdout, again.stdout + again.stderr
    assert f"layer {victim}: .layers/" in again.stderr and "publishing it again" in again.stderr, again.stderr
    assert "repaired: layer" in again.stderr
    assert lay.layerfs(victim).is_dir() and os.listdir(lay.layerfs(victim))
    remove_tree(stray)
    res = run_proc("check", *args)
    assert res.rc == 0 and ": 0 problems" in res.stdout, res.stdout


@requires_root
def test_lost_dotfiles_and_chains_are_found_and_repaired_without_a_layer_download(
        standard_images: StandardImages, registry, tmp_path: Path) -> None:
    """After a cleanup (the local backend; tests/cvmfs does it on CernVM-FS): a flat dir without
    .singularity.d and lost chains are reported by check and rebuilt by the next convert from
    the layer dirs there (local layer dirs keep their deletions): no layer GET."""
    img = standard_images.multilayer
    root, db = tmp_path / "repo", tmp_path / "state.db"
    args = ("--repository-root", root, "--state-db", db)
    lay = RepositoryLayout(root)
    wishlist = write_wishlist(tmp_path / "w.yaml", [img.ref])
    assert run_proc("convert", wishlist, *args).rc == 0
    chains = chain_ids(img.diff_ids)
    flat = lay.flat_dir(img.config_digest)
    remove_tree(flat / ".singularity.d")
    for c in chains[1:]:
        remove_tree(lay.chain_dir(c))
    lines = _problem_lines(_check(root, db).stdout)
    assert any(f"{os.path.relpath(flat, root)} has no .singularity.d" in l for l in lines), lines
    assert all(any(f"chain {c}" in l for l in lines) for c in chains[1:]), lines

    registry.clear_log()
    again = run_proc("convert", wishlist, *args)
    assert again.rc == 0, again.stdout + again.stderr
    assert all(registry.blob_get_count(d) == 0 for d in img.layers), registry.access_log()
    assert (flat / ".singularity.d/runscript").is_file()
    assert not os.path.lexists(lay.chain_dir(chains[-1]) / "data/delete-me.txt")
    assert _check(root, db).rc == 0

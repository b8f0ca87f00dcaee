"""A repository's copy of a tag (cvmfs_common/registry/published.py): used only where every
byte hashes to what the registry's HEAD says the tag is now."""

import json

from cvmfs_common.oci.digest import sha256_of
from cvmfs_common.oci.media import OCI_INDEX, OCI_MANIFEST
from cvmfs_common.oci.platform import Platform
from cvmfs_common.oci.reference import parse_reference
from cvmfs_common.registry.published import PublishedFiles, match_published

OCI_CONFIG_TYPE = "application/vnd.oci.image.config.v1+json"
REF = parse_reference("registry.example/team/app:v1")
AMD64, ARM64 = Platform("linux", "amd64"), Platform("linux", "arm64")


def config(arch: str) -> bytes:
    return json.dumps({"architecture": arch, "os": "linux", "rootfs": {"type": "layers", "diff_ids": []}}).encode()


def manifest(cfg: bytes) -> bytes:
    return json.dumps({"schemaVersion": 2, "mediaType": OCI_MANIFEST,
                       "config": {"mediaType": OCI_CONFIG_TYPE, "digest": sha256_of(cfg), "size": len(cfg)},
                       "layers": []}).encode()


def index(*entries: tuple[bytes, str]) -> bytes:
    return json.dumps({"schemaVersion": 2, "mediaType": OCI_INDEX, "manifests": [
        {"mediaType": OCI_MANIFEST, "digest": sha256_of(m), "size": len(m), "platform": {"os": "linux", "architecture": a}}
        for m, a in entries]}).encode()


CFG_AMD, CFG_ARM = config("amd64"), config("arm64")
MAN_AMD, MAN_ARM = manifest(CFG_AMD), manifest(CFG_ARM)
INDEX = index((MAN_AMD, "amd64"), (MAN_ARM, "arm64"))


def test_a_single_manifest_tag_as_of_its_head():
    got = match_published(REF, sha256_of(MAN_AMD), AMD64, PublishedFiles(MAN_AMD, CFG_AMD))
    assert got is not None
    image, cfg, parsed = got
    assert (image.manifest_digest, image.config_digest, image.index_digest) == \
        (sha256_of(MAN_AMD), sha256_of(CFG_AMD), None)
    assert cfg == CFG_AMD and parsed["architecture"] == "amd64"


def test_an_index_tag_picks_this_platforms_manifest():
    files = PublishedFiles(MAN_AMD, CFG_AMD, INDEX)
    image, _, _ = match_published(REF, sha256_of(INDEX), AMD64, files)
    assert image.index_digest == sha256_of(INDEX) and image.index_bytes == INDEX
    assert image.manifest_digest == sha256_of(MAN_AMD) and image.platform == AMD64
    # the manifest next to it is another platform's: not this one
    assert match_published(REF, sha256_of(INDEX), ARM64, files) is None
    assert match_published(REF, sha256_of(INDEX), Platform("linux", "s390x"), files) is None


def test_a_moved_tag_or_changed_bytes_are_not_used():
    top = sha256_of(MAN_AMD)
    assert match_published(REF, sha256_of(MAN_ARM), AMD64, PublishedFiles(MAN_AMD, CFG_AMD)) is None  # moved
    assert match_published(REF, top, AMD64, PublishedFiles(MAN_AMD, CFG_ARM)) is None  # another config
    assert match_published(REF, top, AMD64, PublishedFiles(MAN_AMD, CFG_AMD + b" ")) is None  # edited
    assert match_published(REF, top, AMD64, PublishedFiles(MAN_AMD, None)) is None
    assert match_published(REF, top, AMD64, PublishedFiles(None, CFG_AMD)) is None
    # an index.json that is not the tag's, or not an index at all
    assert match_published(REF, sha256_of(INDEX), AMD64, PublishedFiles(MAN_AMD, CFG_AMD, INDEX + b"\n")) is None
    torn = b'{"schemaVersion": 2, "manifests": ['
    assert match_published(REF, sha256_of(torn), AMD64, PublishedFiles(MAN_AMD, CFG_AMD, torn)) is None
    assert match_published(REF, sha256_of(torn), AMD64, PublishedFiles(torn, CFG_AMD)) is None


def test_a_config_whose_size_disagrees_is_not_used():
    lying = json.loads(MAN_AMD)
    lying["config"]["size"] += 1
    raw = json.dumps(lying).encode()
    assert match_published(REF, sha256_of(raw), AMD64, PublishedFiles(raw, CFG_AMD)) is None

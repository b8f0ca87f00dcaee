"""Digest validation and the three chain-id forms (OCI, DUCC 1, DUCC 2)."""
from __future__ import annotations

import hashlib

import pytest

from cvmfs_common.oci.digest import (Digest, InvalidDigest, chain_id, chain_ids, ducc2_chain_ids, ducc_chain_ids,
    is_digest, parse_digest, parse_hex, sha256_of)

HEX = "0123456789abcdef" * 4


def test_parse_valid_digest():
    d = parse_digest(f"sha256:{HEX}")
    assert d.hex == HEX
    assert d.prefix == "01"
    assert str(d) == f"sha256:{HEX}"
    assert parse_digest(d) is d
    assert is_digest(f"sha256:{HEX}")


@pytest.mark.parametrize("bad", [
    "", "sha256:", HEX, f"sha512:{HEX}", f"SHA256:{HEX}", f"sha256:{HEX.upper()}",
    f"sha256:{HEX[:-1]}", f"sha256:{HEX}0", "sha256:../../x", f"sha256:{HEX[:62]}/.",
    f"sha256:{HEX}\x00", f"sha256:{HEX}\n", f" sha256:{HEX}", f"sha256:{HEX[:63]}g",
    "sha256:" + "../" * 21 + "x", None, 42, b"sha256:" + HEX.encode(),
])
def test_parse_rejects(bad):
    with pytest.raises(InvalidDigest):
        parse_digest(bad)
    assert not is_digest(bad)


def test_invalid_digest_is_value_error():
    assert issubclass(InvalidDigest, ValueError)


def test_parse_hex_and_of_bytes():
    assert parse_hex(HEX).hex == HEX
    with pytest.raises(InvalidDigest):
        parse_hex(f"sha256:{HEX}")
    with pytest.raises(InvalidDigest):
        Digest("../" + HEX[3:])
    assert sha256_of(b"abc") == "sha256:" + hashlib.sha256(b"abc").hexdigest()


# Published vector: DUCC's own test (cvmfs/cvmfs ducc/lib/chainid_test.go, redis image)
# lists diffIDs and the OCI chainIDs Docker computes for them.
REDIS_DIFF_IDS = [
    "sha256:6744ca1b11903f4db4d5e26145f6dd20f9a6d321a7f725f1a0a7a45a4174c579",
    "sha256:4f442ee57ce8d8bd2cd0a84b07404f1bfb982999f568c46ea8883d0164179d25",
    "sha256:0a5fa8924bd600cdf8167cd211dc595206c1da11c4f232b1cd39e81c8267ddbc",
    "sha256:23cfd55841513b43cbc862c6304684a7759d415be303ba443bf52a8e076fedc6",
    "sha256:036b23f466cade4db1ca12629b98204ed5e88599fe1f3d571e8832e920f7c93d",
    "sha256:0ea23dbb18ab8cf7683d80f4526033d096e43deee4c68abd1e11ab32cddd6262",
]
REDIS_CHAIN_IDS = [
    "sha256:6744ca1b11903f4db4d5e26145f6dd20f9a6d321a7f725f1a0a7a45a4174c579",
    "sha256:b3bcf5ea8345bc3bff9cc11fe0b0ffaf89edf2dc085ce8fb8e020075d192004a",
    "sha256:9c6b6e118e74cba1ab3978e46bdfbcca56d0738a24ebab4b3e75d4a06b931386",
    "sha256:640d7d5e90b3829c5393959bf1d7320fffbd4cab213298424410a206a190a6a8",
    "sha256:52c069fff757e5af1e9e7f09ed0bfa69ba880ffa5a0abeb44a9d9f49599dbd65",
    "sha256:f5c82cd22e3348bb4a4fcc5bfedbd9f3bc0ae2834a6a2361aff608aa2310dfa1",
]


def test_oci_chain_ids_match_published_vector():
    assert chain_ids(REDIS_DIFF_IDS) == REDIS_CHAIN_IDS
    assert chain_id(REDIS_DIFF_IDS) == REDIS_CHAIN_IDS[-1]
    assert chain_ids([]) == []
    with pytest.raises(ValueError):
        chain_id([])


def test_chain_ids_reject_bad_input():
    with pytest.raises(InvalidDigest):
        chain_ids([REDIS_DIFF_IDS[0], "sha256:../x"])


def _h(text: str) -> str:
    return hashlib.sha256(text.encode()).hexdigest()


def test_ducc1_chain_ids_formula():
    # ducc/docker-api/util.go Manifest.GetChainIDs: over compressed digests,
    # c1 = sha256("sha256:<d1>"), cN = sha256("sha256:<c(N-1)> sha256:<dN>").
    d = [f"sha256:{c * 64}" for c in "abc"]
    c1 = _h(d[0])
    c2 = _h(f"sha256:{c1} {d[1]}")
    c3 = _h(f"sha256:{c2} {d[2]}")
    assert ducc_chain_ids(d) == [f"sha256:{c1}", f"sha256:{c2}", f"sha256:{c3}"]
    # differs from the OCI form on the first layer already
    assert ducc_chain_ids(d)[0] != chain_ids(d)[0]


def test_ducc2_chain_ids_formula():
    # ducc/unpacker/createFlat.go GenerateChainFromManifest: c1 = d1,
    # cN = sha256("<hex c(N-1)> <hex dN>") (bare hex).
    d = [f"sha256:{c * 64}" for c in "abc"]
    c2 = _h(f"{'a' * 64} {'b' * 64}")
    c3 = _h(f"{c2} {'c' * 64}")
    assert ducc2_chain_ids(d) == [d[0], f"sha256:{c2}", f"sha256:{c3}"]

"""DUCC's chain ids as a typed value (snapshotter/lineage.py), against cvmfs_common's list formulas."""

import hashlib

import pytest

from cvmfs_common.oci.digest import InvalidDigest, ducc2_chain_ids, ducc_chain_ids
from snapshotter.lineage import DuccIds, next_ducc_ids


def d(text: str) -> str:
    return "sha256:" + hashlib.sha256(text.encode()).hexdigest()


BLOBS = [d("blob0"), d("blob1"), d("blob2")]


def test_steps_give_the_same_ids_as_the_whole_list():
    ids = next_ducc_ids(None, False, BLOBS[0])
    for i in (1, 2):
        ids = next_ducc_ids(ids, True, BLOBS[i])
    assert ids == DuccIds(ducc_chain_ids(BLOBS)[2], ducc2_chain_ids(BLOBS)[2])
    assert DuccIds.first(BLOBS[0]).ducc2 == BLOBS[0]  # DUCC 2: the bottom chain is the digest itself
    assert DuccIds.first(BLOBS[0]).ducc1 == d(BLOBS[0])  # DUCC 1: the hash of the digest string


def test_unknowable_ids_are_none_and_bad_digests_raise():
    assert next_ducc_ids(None, True, BLOBS[1]) is None  # a parent whose ids we do not know
    assert next_ducc_ids(DuccIds.first(BLOBS[0]), True, None) is None  # no layer digest label
    with pytest.raises(InvalidDigest):
        next_ducc_ids(None, False, "sha256:nothex")
    with pytest.raises(ValueError):
        DuccIds.first(BLOBS[0]).then("md5:abc")


def test_codec_round_trip_and_iteration_order():
    ids = DuccIds(d("a"), d("b"))
    assert ids.encode() == f"{d('a')} {d('b')}"  # the sqlite form, unchanged since schema 1
    assert DuccIds.decode(ids.encode()) == ids
    assert list(ids) == [d("a"), d("b")]


@pytest.mark.parametrize("text", [None, "", "one", "a b c", " b", "a "])
def test_decode_of_missing_or_malformed_values_is_unknown(text):
    assert DuccIds.decode(text) is None

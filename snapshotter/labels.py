"""Snapshot labels: the names containerd and our pull set, and the limits containerd's
`labels.Validate` enforces in its metadata store."""

from __future__ import annotations

from typing import Mapping

from .errors import InvalidArgument

MAX_LABEL_SIZE = 4096  # bytes of key + value of one label

SNAPSHOT_REF_LABEL = "containerd.io/snapshot.ref"  # the OCI chainID of the stack up to this layer
# containerd 2.3+'s unpacker adds the layer's diffID to every unpack Prepare.
DIFF_ID_LABEL = "containerd.io/snapshot/diff-id"
CRI_LAYER_DIGEST_LABEL = "containerd.io/snapshot/cri.layer-digest"
CVMFS_LAYER_DIGEST_LABEL = "containerd.io/snapshot/cvmfs.layer-digest"
SOURCE_LABEL = "containerd.io/snapshot/cvmfs.source"  # the directory a remote snapshot shows


def validate_labels(labels: Mapping[str, str]) -> None:
    for key, value in labels.items():
        size = len(key.encode()) + len(value.encode())
        if size > MAX_LABEL_SIZE:
            raise InvalidArgument(
                f"label key and value length ({size} bytes) greater than maximum size "
                f"({MAX_LABEL_SIZE} bytes), key: {key[:10]}"
            )

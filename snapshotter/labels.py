"""Label limits, as containerd's `labels.Validate` enforces them in its metadata store."""

from __future__ import annotations

from typing import Mapping

from .errors import InvalidArgument

MAX_LABEL_SIZE = 4096  # bytes of key + value of one label


def validate_labels(labels: Mapping[str, str]) -> None:
    for key, value in labels.items():
        size = len(key.encode()) + len(value.encode())
        if size > MAX_LABEL_SIZE:
            raise InvalidArgument(
                f"label key and value length ({size} bytes) greater than maximum size "
                f"({MAX_LABEL_SIZE} bytes), key: {key[:10]}"
            )

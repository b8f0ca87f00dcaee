"""The distribution API's names for things: a repository's URLs and its auth scopes."""

from __future__ import annotations

import urllib.parse

from cvmfs_common.oci.digest import Digest, InvalidDigest, parse_digest
from cvmfs_common.oci.reference import Reference
from cvmfs_common.registry.errors import RegistryError


def api_url(ref: Reference, *path: str) -> str:
    """``<api base>/v2/<repository>/<path...>``, each part quoted."""
    quoted = "/".join(urllib.parse.quote(p, safe=":@") for p in path)
    return f"{ref.api_base}/v2/{ref.repository}/{quoted}"


def repository_scope(ref: Reference, push: bool = False) -> str:
    """The token scope for reading (or also writing) the repository."""
    return f"repository:{ref.repository}:{'pull,push' if push else 'pull'}"


def blob_digest(ref: Reference, digest: "str | Digest") -> Digest:
    """A blob's digest, or RegistryError naming the reference."""
    try:
        return parse_digest(digest)
    except InvalidDigest as e:
        raise RegistryError(ref, str(e)) from None

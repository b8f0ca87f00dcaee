"""Push: small things only (thin images): a blob uploaded monolithically, a manifest PUT."""

from __future__ import annotations

import urllib.parse

from cvmfs_common.oci.digest import sha256_of
from cvmfs_common.oci.reference import Reference
from cvmfs_common.registry.api import api_url, repository_scope
from cvmfs_common.registry.errors import DigestMismatch, RegistryError
from cvmfs_common.registry.fetch import Fetcher
from cvmfs_common.registry.transport import Authorizer, Transport


class Pusher:
    def __init__(self, transport: Transport, auth: Authorizer, fetcher: Fetcher) -> None:
        self.transport = transport
        self.auth = auth
        self.fetcher = fetcher  # for the HEAD that skips a blob already there

    def push_blob(self, ref: Reference, data: bytes) -> str:
        """Upload a small blob monolithically (POST + PUT ?digest=); returns its digest."""
        transport = self.transport
        digest = sha256_of(data)
        scope = repository_scope(ref, push=True)
        if self.fetcher.exists(ref, digest, push_scope=True):
            return digest
        resp = transport.send(ref, "POST", api_url(ref, "blobs", "uploads") + "/", auth=self.auth, scope=scope,
                              headers={"Content-Length": "0"})
        transport.raise_for_status(ref, resp, "start blob upload")
        resp.close()
        location = resp.headers.get("Location")
        if not location:
            raise RegistryError(ref, "blob upload: no Location in the registry's answer")
        upload = urllib.parse.urljoin(resp.url, location)
        parts = urllib.parse.urlsplit(upload)
        query = urllib.parse.parse_qsl(parts.query, keep_blank_values=True) + [("digest", digest)]
        upload = urllib.parse.urlunsplit(parts._replace(query=urllib.parse.urlencode(query)))
        resp = transport.send(ref, "PUT", upload, auth=self.auth, scope=scope, data=data,
                              headers={"Content-Type": "application/octet-stream"})
        transport.raise_for_status(ref, resp, f"upload blob {digest}")
        resp.close()
        return digest

    def put_manifest(self, ref: Reference, data: bytes, media_type: str, reference: str | None = None) -> str:
        """PUT a manifest under a tag (default: the ref's tag) or its digest; returns the digest."""
        digest = sha256_of(data)
        target = reference or (ref.tag if ref.tag and not ref.is_glob else digest)
        resp = self.transport.send(ref, "PUT", api_url(ref, "manifests", target), auth=self.auth,
                                   scope=repository_scope(ref, push=True), data=data,
                                   headers={"Content-Type": media_type})
        self.transport.raise_for_status(ref, resp, f"put manifest {target}")
        resp.close()
        header = resp.headers.get("Docker-Content-Digest")
        if header and header != digest:
            raise DigestMismatch(ref, f"registry stored manifest as {header}, we sent {digest}")
        return digest

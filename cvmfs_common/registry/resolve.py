"""Resolve: a tag or digest to a verified manifest, an index to the platform's image, a
repository to its tags (``Link`` pagination, fnmatch globs)."""

from __future__ import annotations

import fnmatch
import json
import time
import urllib.parse
from typing import Any

from cvmfs_common.oci.digest import InvalidDigest, parse_digest, sha256_of
from cvmfs_common.oci.media import MANIFEST_ACCEPT
from cvmfs_common.oci.platform import Platform
from cvmfs_common.oci.reference import Reference
from cvmfs_common.registry.api import api_url, repository_scope
from cvmfs_common.registry.errors import DigestMismatch, RegistryError
from cvmfs_common.registry.manifest import Manifest, ResolvedImage, image_of, parse_manifest, select_platform
from cvmfs_common.registry.transport import Authorizer, Transport

MAX_MANIFEST_BYTES = 4 * 1024 * 1024  # distribution's own limit


class Resolver:
    def __init__(self, transport: Transport, auth: Authorizer) -> None:
        self.transport = transport
        self.auth = auth

    def get_manifest(self, ref: Reference, reference: str | None = None) -> Manifest:
        """Fetch a manifest or index by tag or digest (default: the ref's own), checked
        against its digest."""
        target = reference or ref.manifest_reference
        url = api_url(ref, "manifests", target)
        resp = self.transport.send(ref, "GET", url, auth=self.auth, scope=repository_scope(ref),
                                   headers={"Accept": MANIFEST_ACCEPT}, stream=True)
        self.transport.raise_for_status(ref, resp, f"manifest {target}")
        try:
            raw = self.transport.read_limited(ref, resp, MAX_MANIFEST_BYTES, f"manifest {target}")
        finally:
            resp.close()
        actual = sha256_of(raw)
        if target.startswith("sha256:") and actual != target:
            raise DigestMismatch(ref, f"manifest {target} has digest {actual}")
        header = resp.headers.get("Docker-Content-Digest")
        if header and header.startswith("sha256:") and header != actual:
            raise DigestMismatch(ref, f"manifest {target}: Docker-Content-Digest {header} but content is {actual}")
        return parse_manifest(ref, raw, resp.headers.get("Content-Type", ""), name=target)

    def head_manifest(self, ref: Reference, *, timeout: float | None = None) -> str | None:
        """The digest the tag points at now (Docker-Content-Digest), None if unknown.

        Cheap: a HEAD, which Docker Hub does not count against pull limits.
        Falls back to a GET when the registry sends no digest header. ``timeout``: the
        HEAD (token and retries included) ends within it (DeadlineExceeded).
        """
        target = ref.manifest_reference
        url = api_url(ref, "manifests", target)
        deadline = None if not timeout else (time.monotonic() + timeout, f"the HEAD deadline of {timeout:g} s")
        resp = self.transport.send(ref, "HEAD", url, auth=self.auth, scope=repository_scope(ref),
                                   headers={"Accept": MANIFEST_ACCEPT}, deadline=deadline)
        resp.close()
        if resp.status_code == 404:
            return None
        self.transport.raise_for_status(ref, resp, f"HEAD manifest {target}")
        header = resp.headers.get("Docker-Content-Digest")
        if header:
            try:
                return str(parse_digest(header))
            except InvalidDigest:
                pass
        return self.get_manifest(ref).digest

    def resolve(self, ref: Reference, platform: Platform | None = None) -> ResolvedImage:
        """Tag/digest -> the image manifest for ``platform`` (default: the host's)."""
        want = platform or Platform.host()
        top = self.get_manifest(ref)
        if not top.is_index:
            return image_of(ref, top)
        desc = select_platform(ref, top, want)
        return image_of(ref, self.get_manifest(ref, desc.digest), desc.platform, index=top)

    def list_tags(self, ref: Reference, page_size: int | None = None, max_pages: int = 10_000) -> list[str]:
        """All tags of the repository, following ``Link: <...>; rel="next"``."""
        url = api_url(ref, "tags", "list")
        params: dict[str, Any] | None = {"n": page_size} if page_size else None
        tags: list[str] = []
        seen_urls: set[str] = set()
        for _ in range(max_pages):
            resp = self.transport.send(ref, "GET", url, auth=self.auth, scope=repository_scope(ref), params=params)
            self.transport.raise_for_status(ref, resp, "tag list")
            try:
                body = json.loads(self.transport.read_limited(ref, resp, self.transport.limits.max_tag_list_bytes,
                                                              "tag list"))
            except (ValueError, UnicodeDecodeError, RecursionError):
                raise RegistryError(ref, "tag list is not JSON") from None
            finally:
                resp.close()
            page = body.get("tags") or [] if isinstance(body, dict) else []
            tags.extend(t for t in page if isinstance(t, str))
            nxt = resp.links.get("next", {}).get("url")
            if not nxt:
                return tags
            url = urllib.parse.urljoin(resp.url, nxt)
            params = None  # the next link carries n and last
            if url in seen_urls:
                raise RegistryError(ref, f"tag list pagination loops at {url}")
            seen_urls.add(url)
        raise RegistryError(ref, f"tag list longer than {max_pages} pages")

    def match_tags(self, ref: Reference, page_size: int | None = None) -> list[str]:
        """Tags matching the ref's tag glob (fnmatch, case-sensitive), sorted."""
        pattern = ref.tag or "*"
        return sorted(t for t in self.list_tags(ref, page_size=page_size) if fnmatch.fnmatchcase(t, pattern))

    def expand(self, ref: Reference, page_size: int | None = None) -> list[Reference]:
        """A glob reference -> one reference per matching tag; others unchanged."""
        if not ref.is_glob:
            return [ref]
        return [ref.with_tag(t) for t in self.match_tags(ref, page_size=page_size)]

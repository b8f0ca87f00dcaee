"""THE OCI registry client (distribution API v2), used by publisher and snapshotter.

    from cvmfs_common.oci.platform import Platform
    from cvmfs_common.registry.client import RegistryClient
    client = RegistryClient(auth_file="auth.json")
    image = client.resolve("docker.io/library/debian:stable", Platform.host())
    for layer in image.layers:
        client.fetch_blob(image.reference, layer.digest, dest_path, size=layer.size)

A thin facade over the parts, split as containerd's ``remotes/docker`` is:

* ``transport.py``: the HTTP session, retries with back-off on connection errors, timeouts,
  5xx and 429 (``Retry-After`` honoured; :class:`RetryPolicy`), bodies read streamed with a
  size cap (:class:`TransferLimits`), and ``watchdog.py``: a thread that shuts the socket of
  a transfer past its bounds (minimum rate over a window, a blob's time limit, the deadline
  of :meth:`RegistryClient.set_deadline`, :meth:`RegistryClient.abort`), so a server
  trickling one byte per read timeout cannot hold a caller (TransferTooSlow /
  DeadlineExceeded / Aborted).
* ``authorizer.py``: anonymous until challenged; bearer tokens from the ``WWW-Authenticate``
  challenge (cached per scope until expiry) or basic auth, credentials from
  :class:`Credentials` (``auth.py``: auth.json files and helpers).
* ``resolve.py``: manifests and indexes checked against their digest, platform selection,
  cheap HEAD re-checks, tag lists (``Link`` pagination, fnmatch globs).
* ``fetch.py``: blobs verified on the fly (size, sha256), resumed with ``Range`` after a
  dropped connection, renamed into place only when verified; :meth:`RegistryClient.open_blob`
  / ``iter_blob`` stream for callers that unpack while downloading.
* ``push.py``: small pushes (monolithic blob upload, manifest PUT) for thin images.

Every error is a :class:`RegistryError` whose message names the reference.
"""

from __future__ import annotations

import os
import time
from collections.abc import Callable, Collection, Iterator
from typing import IO

import requests

from cvmfs_common.oci.digest import Digest
from cvmfs_common.oci.platform import Platform
from cvmfs_common.oci.reference import InvalidReference, Reference, parse_reference
from cvmfs_common.registry.authorizer import TokenAuthorizer
from cvmfs_common.registry.credentials import Credentials
from cvmfs_common.registry.errors import RegistryError
from cvmfs_common.registry.fetch import MAX_CONFIG_BYTES, BlobStream, Fetcher
from cvmfs_common.registry.limits import DEFAULT_CHUNK, RetryPolicy, TransferLimits
from cvmfs_common.registry.manifest import Manifest, ResolvedImage, select_platform
from cvmfs_common.registry.push import Pusher
from cvmfs_common.registry.resolve import Resolver
from cvmfs_common.registry.transport import Transport


class RegistryClient:
    """Talks to OCI/Docker registries. Thread-safe for concurrent blob fetches
    (one ``requests.Session``; the token cache is locked)."""

    def __init__(
        self,
        *,
        credentials: Credentials | None = None,
        auth_file: "str | os.PathLike[str] | None" = None,
        retry: RetryPolicy | None = None,
        limits: TransferLimits | None = None,
        insecure_registries: Collection[str] = (),
        session: requests.Session | None = None,
        chunk_size: int = DEFAULT_CHUNK,
        user_agent: str = "cvmfs-images/0.1",
        sleep: Callable[[float], None] = time.sleep,
    ) -> None:
        if credentials is None and auth_file is not None:
            credentials = Credentials.load(auth_file)
        self.credentials = credentials or Credentials()
        self.insecure_registries = frozenset(insecure_registries)
        if session is None:
            session = requests.Session()
            session.headers["User-Agent"] = user_agent
        self.transport = Transport(session, retry or RetryPolicy(), limits or TransferLimits(), sleep)
        auth = TokenAuthorizer(self.transport, self.credentials)
        self._resolver = Resolver(self.transport, auth)
        self._fetcher = Fetcher(self.transport, auth, chunk_size)
        self._pusher = Pusher(self.transport, auth, self._fetcher)

    @property
    def session(self) -> requests.Session:
        return self.transport.session

    @property
    def retry(self) -> RetryPolicy:
        return self.transport.retry

    @property
    def limits(self) -> TransferLimits:
        return self.transport.limits

    def close(self) -> None:
        self.transport.close()

    def __enter__(self) -> "RegistryClient":
        return self

    def __exit__(self, *exc: object) -> None:
        self.close()

    # -- bounds ---------------------------------------------------------------------
    def set_deadline(self, when: float | None, what: str = "the deadline") -> None:
        """Every transfer in flight or started until the next call must end before
        ``when`` (time.monotonic()); None lifts it. ``what`` names it in errors."""
        self.transport.watchdog.set_deadline(when, what)

    def abort(self, reason: str) -> None:
        """End every transfer in flight now and refuse new requests (Aborted): a
        stop that cannot wait for a download. There is no way back for this client."""
        self.transport.watchdog.abort(reason)

    # -- references ---------------------------------------------------------
    def reference(self, ref: "Reference | str") -> Reference:
        if isinstance(ref, Reference):
            return ref
        try:
            return parse_reference(ref, insecure_registries=self.insecure_registries)
        except InvalidReference as e:
            raise RegistryError(ref, str(e)) from None

    # -- manifests and tags (resolve.py) ----------------------------------------------
    def get_manifest(self, ref: "Reference | str", reference: str | None = None) -> Manifest:
        """Fetch a manifest or index by tag or digest (default: the ref's own)."""
        return self._resolver.get_manifest(self.reference(ref), reference)

    def head_manifest(self, ref: "Reference | str", *, timeout: float | None = None) -> str | None:
        """The digest the tag points at now (a HEAD; see Resolver.head_manifest), None if unknown."""
        return self._resolver.head_manifest(self.reference(ref), timeout=timeout)

    def resolve(self, ref: "Reference | str", platform: Platform | None = None) -> ResolvedImage:
        """Tag/digest -> the image manifest for ``platform`` (default: the host's)."""
        return self._resolver.resolve(self.reference(ref), platform)

    select_platform = staticmethod(select_platform)

    def list_tags(self, ref: "Reference | str", page_size: int | None = None, max_pages: int = 10_000) -> list[str]:
        """All tags of the repository, following ``Link: <...>; rel="next"``."""
        return self._resolver.list_tags(self.reference(ref), page_size, max_pages)

    def match_tags(self, ref: "Reference | str", page_size: int | None = None) -> list[str]:
        """Tags matching the ref's tag glob (fnmatch, case-sensitive), sorted."""
        return self._resolver.match_tags(self.reference(ref), page_size)

    def expand(self, ref: "Reference | str", page_size: int | None = None) -> list[Reference]:
        """A glob reference -> one reference per matching tag; others unchanged."""
        return self._resolver.expand(self.reference(ref), page_size)

    # -- blobs (fetch.py) ---------------------------------------------------------------
    def blob_exists(self, ref: "Reference | str", digest: str, *, push_scope: bool = False) -> bool:
        return self._fetcher.exists(self.reference(ref), digest, push_scope=push_scope)

    def iter_blob(self, ref: "Reference | str", digest: "str | Digest", size: int | None = None, *,
                  verify: bool = True) -> Iterator[bytes]:
        """The blob's bytes in chunks, verified at the end (see Fetcher.iter_blob)."""
        # A generator itself, so that a bad reference fails at the first read, as the digest does.
        yield from self._fetcher.iter_blob(self.reference(ref), digest, size, verify=verify)

    def open_blob(self, ref: "Reference | str", digest: "str | Digest", size: int | None = None, *,
                  verify: bool = True) -> BlobStream:
        """A read-only file object over the blob; call ``finish()`` when done (see BlobStream)."""
        return BlobStream(self.iter_blob(ref, digest, size, verify=verify))

    def fetch_blob(self, ref: "Reference | str", digest: "str | Digest", dest: "str | os.PathLike[str] | IO[bytes]",
                   size: int | None = None, *, tmp_dir: "str | os.PathLike[str] | None" = None) -> int:
        """Download a verified blob to a path (renamed into place when verified) or a file object."""
        return self._fetcher.fetch_blob(self.reference(ref), digest, dest, size, tmp_dir=tmp_dir)

    def get_blob_bytes(self, ref: "Reference | str", digest: "str | Digest", size: int | None = None,
                       limit: int = MAX_CONFIG_BYTES) -> bytes:
        """A small blob (config, thin-image JSON) in memory, verified."""
        return self._fetcher.get_blob_bytes(self.reference(ref), digest, size, limit)

    def fetch_config(self, image: ResolvedImage) -> tuple[bytes, dict]:
        """The image config blob (verified), raw and parsed."""
        return self._fetcher.fetch_config(image)

    # -- push (push.py) -----------------------------------------------------------------
    def push_blob(self, ref: "Reference | str", data: bytes) -> str:
        """Upload a small blob monolithically (POST + PUT ?digest=); returns its digest."""
        return self._pusher.push_blob(self.reference(ref), data)

    def put_manifest(self, ref: "Reference | str", data: bytes, media_type: str, reference: str | None = None) -> str:
        """PUT a manifest under a tag (default: the ref's tag) or its digest; returns the digest."""
        return self._pusher.put_manifest(self.reference(ref), data, media_type, reference)

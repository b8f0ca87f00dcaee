"""THE OCI registry client (distribution API v2), used by publisher and snapshotter.

    from cvmfs_common.oci.platform import Platform
    from cvmfs_common.registry.client import RegistryClient
    client = RegistryClient(auth_file="auth.json")
    image = client.resolve("docker.io/library/debian:stable", Platform.host())
    for layer in image.layers:
        client.fetch_blob(image.reference, layer.digest, dest_path, size=layer.size)

What it does:

* auth: anonymous; bearer tokens from the ``WWW-Authenticate`` challenge
  (realm/service/scope, cached per scope until expiry); basic auth from a
  containers ``auth.json`` (also sent to the token endpoint).
* manifests: OCI and Docker schema2 manifests and indexes/manifest lists, with
  platform selection (:class:`Platform`, host default); every manifest is
  checked against its digest. :meth:`RegistryClient.head_manifest` for cheap
  re-checks, :meth:`RegistryClient.list_tags` / :meth:`RegistryClient.match_tags`
  (``Link`` pagination, fnmatch globs).
* blobs: :meth:`RegistryClient.fetch_blob` streams to a temp file, verifying
  size and sha256 on the fly, resuming with ``Range`` after a dropped
  connection, and renames into place only when verified (nothing is left
  behind on error). :meth:`RegistryClient.open_blob` / ``iter_blob`` stream for
  callers that unpack while downloading (verification at EOF / ``finish()``).
* retries with exponential backoff on connection errors, timeouts, 5xx and 429
  (``Retry-After`` honoured), tunable through :class:`RetryPolicy`.
* bounds (:class:`TransferLimits`): every body is read streamed with a size cap
  (manifests, tokens, tag lists, error bodies); a blob must keep a minimum rate over
  a window and may have a total time limit; :meth:`RegistryClient.set_deadline` bounds
  all I/O of one unit of work (the publisher: one image) and :meth:`RegistryClient.abort`
  ends everything in flight. A watchdog thread enforces these by shutting the socket
  of a transfer that broke a bound, so a server trickling one byte per read timeout
  cannot hold a caller; the caller gets TransferTooSlow / DeadlineExceeded / Aborted.
* small pushes (monolithic blob upload, manifest PUT) for thin images.

Every error is a :class:`RegistryError` whose message names the reference.
"""

from __future__ import annotations

import base64
import contextlib
import fnmatch
import hashlib
import json
import os
import threading
import time
import urllib.parse
from collections.abc import Callable, Collection, Iterator
from pathlib import Path
from typing import IO, Any

import requests

from cvmfs_common.oci.digest import Digest, InvalidDigest, parse_digest, sha256_of
from cvmfs_common.oci.media import MANIFEST_ACCEPT
from cvmfs_common.oci.platform import Platform
from cvmfs_common.oci.reference import InvalidReference, Reference, parse_reference
from cvmfs_common.fsutil.atomic import replacing_file
from cvmfs_common.registry.challenge import _Token, parse_www_authenticate
from cvmfs_common.registry.credentials import Credentials
from cvmfs_common.registry.errors import (Aborted, AuthenticationError, DeadlineExceeded, DigestMismatch, NotFound,
                                          RegistryError, RetriesExhausted)
from cvmfs_common.registry.manifest import (Manifest, ResolvedImage, image_of, parse_config, parse_manifest,
                                            select_platform)
from cvmfs_common.registry.transport import (_TIMEOUT_EXC, _TRANSIENT_EXC, DEFAULT_CHUNK, BlobStream, RetryPolicy, TransferLimits,
                                             _content_range_start, _is_transient_status, _retry_after_seconds,
                                             _Transfer)

MAX_MANIFEST_BYTES = 4 * 1024 * 1024  # distribution's own limit
MAX_CONFIG_BYTES = 16 * 1024 * 1024


# the client ---------------------------------------------------------------------
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
        self.retry = retry or RetryPolicy()
        self.limits = limits or TransferLimits()
        self.insecure_registries = frozenset(insecure_registries)
        if session is None:
            session = requests.Session()
            session.headers["User-Agent"] = user_agent
        self.session = session
        self.chunk_size = chunk_size
        self._sleep = sleep
        self._lock = threading.Lock()
        self._tokens: dict[tuple[str, str, str], _Token] = {}
        # per API host: the last challenge seen, so new scopes skip the 401 round trip
        self._challenges: dict[str, tuple[str, dict[str, str]]] = {}
        self._transfers: set[_Transfer] = set()  # guarded by _lock
        self._deadline: tuple[float, str] | None = None  # (time.monotonic(), what it is)
        self._aborted: str | None = None
        self._watchdog: threading.Thread | None = None
        self._closed = threading.Event()

    def close(self) -> None:
        self._closed.set()
        self.session.close()

    # -- bounds ---------------------------------------------------------------------
    def set_deadline(self, when: float | None, what: str = "the deadline") -> None:
        """Every transfer in flight or started until the next call must end before
        ``when`` (time.monotonic()); None lifts it. ``what`` names it in errors."""
        self._deadline = None if when is None else (when, what)

    def abort(self, reason: str) -> None:
        """End every transfer in flight now and refuse new requests (Aborted): a
        stop that cannot wait for a download. There is no way back for this client."""
        self._aborted = reason
        self._check_transfers()

    def _check_now(self, ref: Reference, what: str) -> None:
        """Before a request: the abort and the deadline (a body being read is the watchdog's)."""
        if self._aborted is not None:
            raise Aborted(ref, f"{what}: {self._aborted}")
        deadline = self._deadline
        if deadline is not None and time.monotonic() >= deadline[0]:
            raise DeadlineExceeded(ref, f"{what}: {deadline[1]} passed")

    def _check_transfers(self) -> None:
        now, deadline, aborted = time.monotonic(), self._deadline, self._aborted
        with self._lock:
            transfers = list(self._transfers)
        for t in transfers:
            if t.failure is None:
                error = t.check(now, deadline, aborted)
                if error is not None:
                    t.fail(error)

    def _watch(self) -> None:
        while not self._closed.wait(self.limits.check_interval):
            try:
                self._check_transfers()
            except Exception:  # noqa: BLE001 - the watchdog must outlive anything
                pass

    @contextlib.contextmanager
    def _tracked(self, ref: Reference, what: str, *, blob: bool = False) -> Iterator[_Transfer]:
        t = _Transfer(ref, what, self.limits, blob)
        with self._lock:
            self._transfers.add(t)
            if self._watchdog is None:
                self._watchdog = threading.Thread(target=self._watch, name="registry-watchdog", daemon=True)
                self._watchdog.start()
        try:
            yield t
        finally:
            with self._lock:
                self._transfers.discard(t)

    def _read_body(self, t: _Transfer, resp: requests.Response, size: int) -> Iterator[bytes]:
        """The body as it arrives (one recv per chunk, so the counters are fine-grained)."""
        t.resp = resp
        t.raise_failure()  # the watchdog may have failed it before this response existed
        read1 = getattr(resp.raw, "read1", None)
        while True:
            data = read1(size, decode_content=True) if read1 is not None else resp.raw.read(size, decode_content=True)
            if not data:
                resp._content_consumed = True  # read to the end: requests may pool the connection again
                return
            t.received += len(data)
            yield data

    def __enter__(self) -> "RegistryClient":
        return self

    def __exit__(self, *exc: object) -> None:
        self.close()

    # -- references ---------------------------------------------------------
    def reference(self, ref: "Reference | str") -> Reference:
        if isinstance(ref, Reference):
            return ref
        try:
            return parse_reference(ref, insecure_registries=self.insecure_registries)
        except InvalidReference as e:
            raise RegistryError(ref, str(e)) from None

    def _url(self, ref: Reference, *path: str) -> str:
        quoted = "/".join(urllib.parse.quote(p, safe=":@") for p in path)
        return f"{ref.api_base}/v2/{ref.repository}/{quoted}"

    # -- auth ---------------------------------------------------------------------
    @staticmethod
    def _scope(ref: Reference, push: bool) -> str:
        return f"repository:{ref.repository}:{'pull,push' if push else 'pull'}"

    def _basic_header(self, ref: Reference) -> str | None:
        creds = self.credentials.lookup(ref)
        if creds is None:
            return None
        return "Basic " + base64.b64encode(f"{creds[0]}:{creds[1]}".encode()).decode()

    def _auth_header(self, ref: Reference, scope: str, *, fetch: bool,
                     deadline: "tuple[float, str] | None" = None) -> str | None:
        """A header for this scope from the cache, or (fetch=True) from the known challenge."""
        challenge = self._challenges.get(ref.api_host)
        if challenge is None:
            return None
        kind, params = challenge
        if kind == "basic":
            return self._basic_header(ref)
        if kind != "bearer":
            return None
        key = (params.get("realm", ""), params.get("service", ""), scope)
        with self._lock:
            tok = self._tokens.get(key)
            if tok is not None and tok.expires > time.monotonic():
                return tok.header
        if not fetch:
            return None
        return self._fetch_token(ref, params, scope, deadline=deadline)

    def _fetch_token(self, ref: Reference, params: dict[str, str], scope: str, extra_scope: str | None = None,
                     deadline: "tuple[float, str] | None" = None) -> str:
        """GET the realm for ``scope`` (plus the challenge's own scope when it asked
        for something else, as Docker does); cache the token under ``scope``."""
        realm = params.get("realm")
        if not realm:
            raise AuthenticationError(ref, "bearer challenge without realm")
        query: list[tuple[str, str]] = []
        if params.get("service"):
            query.append(("service", params["service"]))
        query.append(("scope", scope))
        if extra_scope and extra_scope != scope:
            query.append(("scope", extra_scope))
        headers = {}
        basic = self._basic_header(ref)
        if basic:
            headers["Authorization"] = basic
        resp = self._send(ref, "GET", realm, params=query, headers=headers, auth_retry=False, deadline=deadline)
        try:
            if resp.status_code in (401, 403):
                raise AuthenticationError(ref, f"token endpoint {realm} refused ({resp.status_code})", status=resp.status_code)
            if resp.status_code != 200:
                raise RegistryError(ref, f"token endpoint {realm} answered {resp.status_code}", status=resp.status_code)
            raw = self._read_limited(ref, resp, self.limits.max_token_bytes, f"token response from {realm}")
            try:
                body = json.loads(raw)
            except (ValueError, UnicodeDecodeError, RecursionError):
                raise AuthenticationError(ref, f"token endpoint {realm} sent no JSON") from None
        finally:
            resp.close()
        if not isinstance(body, dict):
            raise AuthenticationError(ref, f"token endpoint {realm} sent no JSON object")
        token = body.get("token") or body.get("access_token")
        if not token or not isinstance(token, str):
            raise AuthenticationError(ref, f"token endpoint {realm} sent no token")
        expires_in = body.get("expires_in")
        if not isinstance(expires_in, (int, float)) or expires_in <= 0:
            expires_in = 60  # the token spec's default
        # Renew a little early so a token never expires in flight.
        lifetime = max(0.0, float(expires_in) - min(10.0, float(expires_in) / 10))
        header = f"Bearer {token}"
        key = (realm, params.get("service", ""), scope)
        with self._lock:
            self._tokens[key] = _Token(header, time.monotonic() + lifetime)
        return header

    # -- transport ---------------------------------------------------------------
    def _send(
        self,
        ref: Reference,
        method: str,
        url: str,
        *,
        scope: str | None = None,
        auth_retry: bool = True,
        stream: bool = False,
        headers: dict[str, str] | None = None,
        deadline: "tuple[float, str] | None" = None,
        **kwargs: Any,
    ) -> requests.Response:
        """One logical request: auth (401 -> challenge -> retry once) and retries on
        transient failures. Returns the final response (caller checks the status).
        ``deadline``: (time.monotonic(), what it is): the request, its token fetch and its
        retries all end by then (DeadlineExceeded), whatever the timeouts allow."""
        timeout = (self.retry.connect_timeout, self.retry.read_timeout)
        # Bodies are always streamed, so that they are read through _read_limited (capped),
        # never whole by requests; HEADs have none (and keep their connection for reuse).
        stream = stream or method != "HEAD"
        attempt = 0
        authed_after_challenge = False
        while True:
            self._check_now(ref, f"{method} {url}")
            if deadline is not None:
                left = deadline[0] - time.monotonic()
                if left <= 0:
                    raise DeadlineExceeded(ref, f"{method} {url}: no answer within {deadline[1]}")
                timeout = (min(self.retry.connect_timeout, left), min(self.retry.read_timeout, left))
            hdrs = dict(headers or {})
            if scope is not None and "Authorization" not in hdrs:
                auth = self._auth_header(ref, scope, fetch=True, deadline=deadline)
                if auth:
                    hdrs["Authorization"] = auth
            try:
                resp = self.session.request(method, url, headers=hdrs, stream=stream, timeout=timeout, **kwargs)
            except _TRANSIENT_EXC as e:
                if attempt + 1 >= self.retry.attempts:
                    raise RetriesExhausted(ref, f"{method} {url}: {type(e).__name__}: {e}") from e
                delay = self.retry.delay(attempt)
                if deadline is not None and time.monotonic() + delay >= deadline[0]:
                    happened = "timed out" if isinstance(e, _TIMEOUT_EXC) else f"failed ({type(e).__name__})"
                    raise DeadlineExceeded(ref, f"{method} {url}: {happened}, and no answer within "
                                                f"{deadline[1]}") from e
                self._sleep(delay)
                attempt += 1
                continue
            except requests.RequestException as e:
                raise RegistryError(ref, f"{method} {url}: {e}") from e

            if resp.status_code == 401 and scope is not None and auth_retry and not authed_after_challenge:
                challenge = resp.headers.get("WWW-Authenticate", "")
                self._discard(ref, resp)
                kind, params = parse_www_authenticate(challenge)
                if kind not in ("bearer", "basic"):
                    raise AuthenticationError(ref, f"{method} {url}: 401 without a usable challenge", status=401)
                if kind == "basic" and self._basic_header(ref) is None:
                    raise AuthenticationError(ref, f"{method} {url}: registry wants credentials, none configured", status=401)
                with self._lock:
                    self._challenges[ref.api_host] = (kind, params)
                if kind == "bearer":  # (re)fetch: a cached token was refused or missing
                    self._fetch_token(ref, params, scope, extra_scope=params.get("scope"), deadline=deadline)
                authed_after_challenge = True
                continue
            if _is_transient_status(resp.status_code):
                wait = _retry_after_seconds(resp)
                if attempt + 1 >= self.retry.attempts:
                    status = resp.status_code
                    resp.close()
                    raise RetriesExhausted(ref, f"{method} {url}: HTTP {status} after {attempt + 1} attempts", status=status)
                self._discard(ref, resp)
                delay = self.retry.delay(attempt) if wait is None else min(wait, self.retry.max_retry_after)
                if deadline is not None and time.monotonic() + delay >= deadline[0]:
                    raise DeadlineExceeded(ref, f"{method} {url}: HTTP {resp.status_code}, and no answer within "
                                                f"{deadline[1]}", status=resp.status_code)
                self._sleep(delay)
                attempt += 1
                continue
            return resp

    def _raise_for_status(self, ref: Reference, resp: requests.Response, what: str) -> None:
        code = resp.status_code
        if code < 400:
            return
        detail = ""
        try:
            if resp.request is not None and resp.request.method != "HEAD":
                errs = json.loads(self._read_limited(ref, resp, self.limits.max_error_bytes, f"HTTP {code} body"))
                errs = errs.get("errors") or []
                detail = "; ".join(f"{e.get('code')}: {e.get('message')}"[:500] for e in errs[:5] if isinstance(e, dict))
        except (ValueError, AttributeError, TypeError, RecursionError, RegistryError, requests.RequestException):
            pass  # the status alone says enough
        resp.close()
        msg = f"{what}: HTTP {code}" + (f" ({detail})" if detail else "")
        if code in (401, 403):
            raise AuthenticationError(ref, msg, status=code)
        if code == 404:
            raise NotFound(ref, msg, status=code)
        raise RegistryError(ref, msg, status=code)

    # -- manifests ------------------------------------------------------------------
    def get_manifest(self, ref: "Reference | str", reference: str | None = None) -> Manifest:
        """Fetch a manifest or index by tag or digest (default: the ref's own)."""
        ref = self.reference(ref)
        target = reference or ref.manifest_reference
        url = self._url(ref, "manifests", target)
        resp = self._send(ref, "GET", url, scope=self._scope(ref, False), headers={"Accept": MANIFEST_ACCEPT}, stream=True)
        self._raise_for_status(ref, resp, f"manifest {target}")
        try:
            raw = self._read_limited(ref, resp, MAX_MANIFEST_BYTES, f"manifest {target}")
        finally:
            resp.close()
        actual = sha256_of(raw)
        if target.startswith("sha256:") and actual != target:
            raise DigestMismatch(ref, f"manifest {target} has digest {actual}")
        header = resp.headers.get("Docker-Content-Digest")
        if header and header.startswith("sha256:") and header != actual:
            raise DigestMismatch(ref, f"manifest {target}: Docker-Content-Digest {header} but content is {actual}")
        return parse_manifest(ref, raw, resp.headers.get("Content-Type", ""), name=target)

    def head_manifest(self, ref: "Reference | str", *, timeout: float | None = None) -> str | None:
        """The digest the tag points at now (Docker-Content-Digest), None if unknown.

        Cheap: a HEAD, which Docker Hub does not count against pull limits.
        Falls back to a GET when the registry sends no digest header. ``timeout``: the
        HEAD (token and retries included) ends within it (DeadlineExceeded).
        """
        ref = self.reference(ref)
        target = ref.manifest_reference
        url = self._url(ref, "manifests", target)
        deadline = None if not timeout else (time.monotonic() + timeout, f"the HEAD deadline of {timeout:g} s")
        resp = self._send(ref, "HEAD", url, scope=self._scope(ref, False), headers={"Accept": MANIFEST_ACCEPT},
                          deadline=deadline)
        resp.close()
        if resp.status_code == 404:
            return None
        self._raise_for_status(ref, resp, f"HEAD manifest {target}")
        header = resp.headers.get("Docker-Content-Digest")
        if header:
            try:
                return str(parse_digest(header))
            except InvalidDigest:
                pass
        return self.get_manifest(ref).digest

    def resolve(self, ref: "Reference | str", platform: Platform | None = None) -> ResolvedImage:
        """Tag/digest -> the image manifest for ``platform`` (default: the host's)."""
        ref = self.reference(ref)
        want = platform or Platform.host()
        top = self.get_manifest(ref)
        if not top.is_index:
            return image_of(ref, top)
        desc = select_platform(ref, top, want)
        return image_of(ref, self.get_manifest(ref, desc.digest), desc.platform, index=top)

    select_platform = staticmethod(select_platform)

    def fetch_config(self, image: ResolvedImage) -> tuple[bytes, dict]:
        """The image config blob (verified), raw and parsed."""
        data = self.get_blob_bytes(image.reference, image.config.digest, size=image.config.size, limit=MAX_CONFIG_BYTES)
        return data, parse_config(image.reference, image.config.digest, data)

    # -- tags -------------------------------------------------------------------------
    def list_tags(self, ref: "Reference | str", page_size: int | None = None, max_pages: int = 10_000) -> list[str]:
        """All tags of the repository, following ``Link: <...>; rel="next"``."""
        ref = self.reference(ref)
        url = self._url(ref, "tags", "list")
        params: dict[str, Any] | None = {"n": page_size} if page_size else None
        tags: list[str] = []
        seen_urls: set[str] = set()
        for _ in range(max_pages):
            resp = self._send(ref, "GET", url, scope=self._scope(ref, False), params=params)
            self._raise_for_status(ref, resp, "tag list")
            try:
                body = json.loads(self._read_limited(ref, resp, self.limits.max_tag_list_bytes, "tag list"))
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

    def match_tags(self, ref: "Reference | str", page_size: int | None = None) -> list[str]:
        """Tags matching the ref's tag glob (fnmatch, case-sensitive), sorted."""
        ref = self.reference(ref)
        pattern = ref.tag or "*"
        return sorted(t for t in self.list_tags(ref, page_size=page_size) if fnmatch.fnmatchcase(t, pattern))

    def expand(self, ref: "Reference | str", page_size: int | None = None) -> list[Reference]:
        """A glob reference -> one reference per matching tag; others unchanged."""
        ref = self.reference(ref)
        if not ref.is_glob:
            return [ref]
        return [ref.with_tag(t) for t in self.match_tags(ref, page_size=page_size)]

    # -- blobs -----------------------------------------------------------------------
    def blob_exists(self, ref: "Reference | str", digest: str, *, push_scope: bool = False) -> bool:
        ref = self.reference(ref)
        d = self._blob_digest(ref, digest)
        resp = self._send(ref, "HEAD", self._url(ref, "blobs", str(d)), scope=self._scope(ref, push_scope))
        resp.close()
        if resp.status_code == 404:
            return False
        self._raise_for_status(ref, resp, f"HEAD blob {d}")
        return True

    @staticmethod
    def _blob_digest(ref: Reference, digest: "str | Digest") -> Digest:
        try:
            return parse_digest(digest)
        except InvalidDigest as e:
            raise RegistryError(ref, str(e)) from None

    def iter_blob(self, ref: "Reference | str", digest: "str | Digest", size: int | None = None, *,
                  verify: bool = True) -> Iterator[bytes]:
        """Yield the blob's bytes in chunks; raises DigestMismatch at the end if
        the content is wrong. Dropped connections resume with ``Range``.

        Consumers must treat what they got as tentative until the iterator is
        exhausted without error. ``verify=False`` leaves the digest to a consumer
        that hashes the bytes anyway (the publisher's unpacker): sizes are still
        checked, the sha256 is not computed twice.
        """
        ref = self.reference(ref)
        d = self._blob_digest(ref, digest)
        with self._tracked(ref, f"blob {d} from {ref.registry}", blob=True) as t:
            yield from self._iter_blob(ref, d, size, verify, t)

    def _iter_blob(self, ref: Reference, d: Digest, size: int | None, verify: bool, t: _Transfer) -> Iterator[bytes]:
        url = self._url(ref, "blobs", str(d))
        scope = self._scope(ref, False)
        hasher = hashlib.sha256() if verify else None
        received = 0
        drops = 0
        while True:
            headers = {"Range": f"bytes={received}-"} if received else {}
            resp = self._send(ref, "GET", url, scope=scope, stream=True, headers=headers)
            try:
                if received and resp.status_code == 416:
                    break  # nothing after what we have: the size check below decides
                self._raise_for_status(ref, resp, f"blob {d}")
                skip = 0
                if received:
                    if resp.status_code == 206:
                        start = _content_range_start(resp.headers.get("Content-Range", ""))
                        if start != received:
                            raise RegistryError(ref, f"blob {d}: asked for bytes {received}-, got Content-Range {resp.headers.get('Content-Range')!r}")
                    else:
                        skip = received  # server ignored Range: discard what we have
                try:
                    for chunk in self._read_body(t, resp, self.chunk_size):
                        if skip:
                            if len(chunk) <= skip:
                                skip -= len(chunk)
                                continue
                            chunk, skip = chunk[skip:], 0
                        received += len(chunk)
                        if size is not None and received > size:
                            raise DigestMismatch(ref, f"blob {d}: more than the expected {size} bytes")
                        if hasher is not None:
                            hasher.update(chunk)
                        yield chunk
                    t.raise_failure()  # the watchdog cut it: the end is not the blob's end
                except _TRANSIENT_EXC as e:
                    t.raise_failure()
                    drops += 1
                    if drops >= self.retry.attempts:
                        raise RetriesExhausted(ref, f"blob {d}: connection dropped {drops} times, last: {e}") from e
                    self._sleep(self.retry.delay(drops - 1))
                    continue
            finally:
                t.resp = None
                resp.close()
            if size is not None and received < size:
                # The body ended early without a protocol error (no Content-Length): resume.
                drops += 1
                if drops >= self.retry.attempts:
                    raise RetriesExhausted(ref, f"blob {d}: got {received} of {size} bytes after {drops} attempts")
                self._sleep(self.retry.delay(drops - 1))
                continue
            break
        if size is not None and received != size:
            raise DigestMismatch(ref, f"blob {d}: got {received} bytes, expected {size}")
        if hasher is None:
            return
        actual = hasher.hexdigest()
        if actual != d.hex:
            raise DigestMismatch(ref, f"blob {d}: content has digest sha256:{actual}")

    def open_blob(self, ref: "Reference | str", digest: "str | Digest", size: int | None = None, *,
                  verify: bool = True) -> "BlobStream":
        """A read-only file object over the blob (for tarfile ``r|*`` while downloading).

        Call :meth:`BlobStream.finish` when done: it drains the rest and raises
        DigestMismatch if the blob was wrong -- only then is the result valid
        (with ``verify=False``, see iter_blob, the caller checks the digest).
        """
        return BlobStream(self.iter_blob(ref, digest, size, verify=verify))

    def fetch_blob(
        self,
        ref: "Reference | str",
        digest: "str | Digest",
        dest: "str | os.PathLike[str] | IO[bytes]",
        size: int | None = None,
        *,
        tmp_dir: "str | os.PathLike[str] | None" = None,
    ) -> int:
        """Download a verified blob to ``dest`` (a path or a binary file object).

        For a path: written to a temp file (in ``tmp_dir`` or dest's directory),
        fsynced, renamed over ``dest`` only after size and digest check out; on
        any error the temp file is removed and ``dest`` is untouched. For a file
        object the bytes are written as they arrive (the caller discards it on
        error). Returns the number of bytes.
        """
        if hasattr(dest, "write"):
            n = 0
            for chunk in self.iter_blob(ref, digest, size):
                dest.write(chunk)  # type: ignore[union-attr]
                n += len(chunk)
            return n
        path = Path(os.fspath(dest))  # type: ignore[arg-type]
        n = 0
        with replacing_file(path, tmp_dir, ".partial") as f:
            for chunk in self.iter_blob(ref, digest, size):
                f.write(chunk)
                n += len(chunk)
        return n

    def get_blob_bytes(self, ref: "Reference | str", digest: "str | Digest", size: int | None = None, limit: int = MAX_CONFIG_BYTES) -> bytes:
        """A small blob (config, thin-image JSON) in memory, verified."""
        ref = self.reference(ref)
        if size is not None and size > limit:
            raise RegistryError(ref, f"blob {digest} is {size} bytes, over the {limit} limit")
        buf = bytearray()
        for chunk in self.iter_blob(ref, digest, size):
            buf += chunk
            if len(buf) > limit:
                raise RegistryError(ref, f"blob {digest} is over the {limit} byte limit")
        return bytes(buf)

    def _read_limited(self, ref: Reference, resp: requests.Response, limit: int, what: str) -> bytes:
        """The whole body, or RegistryError when it is over ``limit`` bytes (read no
        further) or arrives too slowly (TransferLimits: the watchdog)."""
        declared = resp.headers.get("Content-Length", "")
        if declared.isdigit() and int(declared) > limit:
            raise RegistryError(ref, f"{what} is {declared} bytes, over the limit of {limit}")
        buf = bytearray()
        with self._tracked(ref, what) as t:
            try:
                for chunk in self._read_body(t, resp, 64 * 1024):
                    buf += chunk
                    if len(buf) > limit:
                        raise RegistryError(ref, f"{what} is larger than {limit} bytes")
                t.raise_failure()
            except _TRANSIENT_EXC as e:
                t.raise_failure()
                raise RegistryError(ref, f"{what}: connection dropped: {e}") from e
            finally:
                t.resp = None
        return bytes(buf)

    def _discard(self, ref: Reference, resp: requests.Response) -> None:
        """Read and drop a small body (a challenge, a 5xx page) so that the connection
        can be reused; a large or slow one just closes it."""
        try:
            self._read_limited(ref, resp, self.limits.max_error_bytes, f"HTTP {resp.status_code} body")
        except (RegistryError, requests.RequestException):
            pass
        finally:
            resp.close()

    # -- push (small things: thin images) -------------------------------------------------
    def push_blob(self, ref: "Reference | str", data: bytes) -> str:
        """Upload a small blob monolithically (POST + PUT ?digest=); returns its digest."""
        ref = self.reference(ref)
        digest = sha256_of(data)
        scope = self._scope(ref, True)
        if self.blob_exists(ref, digest, push_scope=True):
            return digest
        resp = self._send(ref, "POST", self._url(ref, "blobs", "uploads") + "/", scope=scope, headers={"Content-Length": "0"})
        self._raise_for_status(ref, resp, "start blob upload")
        resp.close()
        location = resp.headers.get("Location")
        if not location:
            raise RegistryError(ref, "blob upload: no Location in the registry's answer")
        upload = urllib.parse.urljoin(resp.url, location)
        parts = urllib.parse.urlsplit(upload)
        query = urllib.parse.parse_qsl(parts.query, keep_blank_values=True) + [("digest", digest)]
        upload = urllib.parse.urlunsplit(parts._replace(query=urllib.parse.urlencode(query)))
        resp = self._send(ref, "PUT", upload, scope=scope, data=data, headers={"Content-Type": "application/octet-stream"})
        self._raise_for_status(ref, resp, f"upload blob {digest}")
        resp.close()
        return digest

    def put_manifest(self, ref: "Reference | str", data: bytes, media_type: str, reference: str | None = None) -> str:
        """PUT a manifest under a tag (default: the ref's tag) or its digest; returns the digest."""
        ref = self.reference(ref)
        digest = sha256_of(data)
        target = reference or (ref.tag if ref.tag and not ref.is_glob else digest)
        resp = self._send(
            ref, "PUT", self._url(ref, "manifests", target), scope=self._scope(ref, True),
            data=data, headers={"Content-Type": media_type},
        )
        self._raise_for_status(ref, resp, f"put manifest {target}")
        resp.close()
        header = resp.headers.get("Docker-Content-Digest")
        if header and header != digest:
            raise DigestMismatch(ref, f"registry stored manifest as {header}, we sent {digest}")
        return digest



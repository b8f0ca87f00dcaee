"""The authorizer: what a registry's 401 asks for. Anonymous until challenged; then bearer
tokens from the challenge's realm (cached per realm, service and scope until shortly before
they expire; credentials sent to the token endpoint as basic auth) or basic auth itself."""

from __future__ import annotations

import base64
import json
import threading
import time
from dataclasses import dataclass

from cvmfs_common.oci.reference import Reference
from cvmfs_common.registry.challenge import parse_www_authenticate
from cvmfs_common.registry.credentials import Credentials
from cvmfs_common.registry.errors import AuthenticationError, RegistryError
from cvmfs_common.registry.limits import Deadline
from cvmfs_common.registry.transport import Transport


@dataclass
class _Token:
    header: str
    expires: float  # time.monotonic()


class TokenAuthorizer:
    """The transport's :class:`~cvmfs_common.registry.transport.Authorizer`. Thread-safe."""

    def __init__(self, transport: Transport, credentials: Credentials) -> None:
        self.transport = transport
        self.credentials = credentials
        self._lock = threading.Lock()
        self._tokens: dict[tuple[str, str, str], _Token] = {}
        # per API host: the last challenge seen, so new scopes skip the 401 round trip
        self._challenges: dict[str, tuple[str, dict[str, str]]] = {}

    def header(self, ref: Reference, scope: str, deadline: Deadline | None) -> str | None:
        """A header for this scope from the cache, or from the known challenge."""
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
        return self._fetch_token(ref, params, scope, deadline=deadline)

    def challenged(self, ref: Reference, scope: str, challenge: str, what: str, deadline: Deadline | None) -> None:
        kind, params = parse_www_authenticate(challenge)
        if kind not in ("bearer", "basic"):
            raise AuthenticationError(ref, f"{what}: 401 without a usable challenge", status=401)
        if kind == "basic" and self._basic_header(ref) is None:
            raise AuthenticationError(ref, f"{what}: registry wants credentials, none configured", status=401)
        with self._lock:
            self._challenges[ref.api_host] = (kind, params)
        if kind == "bearer":  # (re)fetch: a cached token was refused or missing
            self._fetch_token(ref, params, scope, extra_scope=params.get("scope"), deadline=deadline)

    def _basic_header(self, ref: Reference) -> str | None:
        creds = self.credentials.lookup(ref)
        if creds is None:
            return None
        return "Basic " + base64.b64encode(f"{creds[0]}:{creds[1]}".encode()).decode()

    def _fetch_token(self, ref: Reference, params: dict[str, str], scope: str, extra_scope: str | None = None,
                     deadline: Deadline | None = None) -> str:
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
        transport = self.transport
        resp = transport.send(ref, "GET", realm, params=query, headers=headers, deadline=deadline)
        try:
            if resp.status_code in (401, 403):
                raise AuthenticationError(ref, f"token endpoint {realm} refused ({resp.status_code})", status=resp.status_code)
            if resp.status_code != 200:
                raise RegistryError(ref, f"token endpoint {realm} answered {resp.status_code}", status=resp.status_code)
            raw = transport.read_limited(ref, resp, transport.limits.max_token_bytes, f"token response from {realm}")
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

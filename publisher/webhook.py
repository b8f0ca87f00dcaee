"""Registry push notifications for ``loop --listen HOST:PORT`` (DESIGN §5).

The distribution registry (``docker-registry``) POSTs to every URL in its config's
``notifications.endpoints`` an envelope::

    {"events": [{"action": "push",
                 "target": {"repository": "test/app", "tag": "v1", "digest": "sha256:...",
                            "mediaType": "application/vnd.oci.image.manifest.v1+json", "url": ...},
                 "request": {"host": "registry.example.org:5000", ...}, ...}]}

The listener accepts such POSTs on any path, answers 200 at once and hands the
manifest pushes to a callback; the loop decides (against the wishlists) what to
convert. An event only ever triggers a conversion of a tag the wishlists name, which
is then read from the registry as usual: a forged event can make the publisher look,
never publish something else.
"""

from __future__ import annotations

import json
import logging
import socket
import threading
import urllib.parse
from collections.abc import Callable
from dataclasses import dataclass
from http.server import BaseHTTPRequestHandler, ThreadingHTTPServer

from cvmfs_common.registry import IMAGE_MANIFESTS, INDEXES

log = logging.getLogger(__name__)

MAX_BODY = 4 * 1024 * 1024
_MANIFEST_TYPES = IMAGE_MANIFESTS | INDEXES


@dataclass(frozen=True)
class PushEvent:
    """A manifest pushed to a registry."""

    host: str  # the registry as the pusher addressed it (request.host), lower case
    repository: str
    tag: str | None
    digest: str | None

    def __str__(self) -> str:
        where = f":{self.tag}" if self.tag else f"@{self.digest}"
        return f"{self.host}/{self.repository}{where}"


def parse_envelope(body: bytes) -> list[PushEvent]:
    """The manifest pushes in a notification envelope; other events (pulls, blob
    pushes, deletes) are left out. ValueError when the body is not an envelope."""
    try:
        doc = json.loads(body)
    except (ValueError, UnicodeDecodeError) as e:
        raise ValueError(f"not JSON: {e}") from None
    events = doc.get("events") if isinstance(doc, dict) else None
    if not isinstance(events, list):
        raise ValueError("not a notification envelope (no 'events' list)")
    out: list[PushEvent] = []
    for ev in events:
        if not isinstance(ev, dict) or ev.get("action") != "push":
            continue
        target = ev.get("target") if isinstance(ev.get("target"), dict) else {}
        media_type = target.get("mediaType")
        if media_type and media_type not in _MANIFEST_TYPES:
            continue  # a blob
        repository, tag, digest = target.get("repository"), target.get("tag"), target.get("digest")
        if not isinstance(repository, str) or not repository:
            continue
        tag = tag if isinstance(tag, str) and tag else None
        digest = digest if isinstance(digest, str) and digest else None
        if tag is None and digest is None:
            continue
        request = ev.get("request") if isinstance(ev.get("request"), dict) else {}
        host = request.get("host") if isinstance(request.get("host"), str) else ""
        if not host and isinstance(target.get("url"), str):
            host = urllib.parse.urlsplit(target["url"]).netloc
        out.append(PushEvent(host.lower(), repository, tag, digest))
    return out


def parse_address(text: str, default_host: str = "127.0.0.1") -> tuple[str, int]:
    """``HOST:PORT``, ``[v6]:PORT`` or ``:PORT`` -> (host, port)."""
    host, sep, port = text.rpartition(":")
    if not sep or not port.isdigit() or not 0 <= int(port) <= 65535:
        raise ValueError(f"not a HOST:PORT address: {text!r}")
    host = host.strip("[]") or default_host
    return host, int(port)


class _Server(ThreadingHTTPServer):
    daemon_threads = True
    allow_reuse_address = True

    def __init__(self, address: tuple[str, int], on_events: Callable[[list[PushEvent]], None]) -> None:
        if ":" in address[0]:
            self.address_family = socket.AF_INET6
        self.on_events = on_events
        super().__init__(address, _Handler)


class _Handler(BaseHTTPRequestHandler):
    server: _Server
    protocol_version = "HTTP/1.1"

    def _answer(self, code: int, text: str = "") -> None:
        data = text.encode()
        self.send_response(code)
        self.send_header("Content-Type", "text/plain; charset=utf-8")
        self.send_header("Content-Length", str(len(data)))
        self.end_headers()
        self.wfile.write(data)

    def do_POST(self) -> None:  # noqa: N802 - http.server's naming
        try:
            length = int(self.headers.get("Content-Length") or "")
        except ValueError:
            self.close_connection = True
            self._answer(411, "Content-Length required\n")
            return
        if length < 0 or length > MAX_BODY:
            self.close_connection = True
            self._answer(413, "too large\n")
            return
        body = self.rfile.read(length)
        try:
            events = parse_envelope(body)
        except ValueError as e:
            log.warning("webhook from %s: %s", self.client_address[0], e)
            self._answer(400, f"{e}\n")
            return
        self._answer(200)  # at once: the registry's queue must never wait for a conversion
        if events:
            log.info("webhook from %s: %s pushed", self.client_address[0], ", ".join(map(str, events)))
            self.server.on_events(events)

    def do_GET(self) -> None:  # noqa: N802 - a probe
        self._answer(200, "cvmfs-publisher loop: POST registry notifications here\n")

    def log_message(self, fmt: str, *args: object) -> None:
        log.debug("webhook %s: " + fmt, self.client_address[0], *args)


class WebhookListener:
    """``listener = WebhookListener("0.0.0.0:8080", on_events).start()`` ... ``stop()``.
    ``on_events`` runs on the request's thread: keep it short (queue the events)."""

    def __init__(self, address: str, on_events: Callable[[list[PushEvent]], None]) -> None:
        self._server = _Server(parse_address(address), on_events)
        self._thread = threading.Thread(target=self._server.serve_forever, name="webhook", daemon=True)

    @property
    def address(self) -> tuple[str, int]:
        host, port = self._server.server_address[:2]
        return str(host), int(port)

    def start(self) -> "WebhookListener":
        self._thread.start()
        log.info("listening for registry notifications on %s:%d", *self.address)
        return self

    def stop(self) -> None:
        self._server.shutdown()
        self._server.server_close()

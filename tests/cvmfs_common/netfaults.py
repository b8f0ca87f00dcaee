"""Small servers that stand between the client and a real registry to misbehave on cue:

* Frontend        an HTTP server forwarding to the registry; a `script` may answer a
                  request itself (429, 503, 401 challenges) instead of forwarding.
* DroppingProxy   a TCP proxy that cuts its first connections after N response bytes.
* TokenServer     a bearer-token endpoint (the distribution token spec, simplified).
"""
from __future__ import annotations

import base64
import http.client
import json
import socket
import threading
import time
import urllib.parse
from dataclasses import dataclass, field
from http.server import BaseHTTPRequestHandler, ThreadingHTTPServer
from typing import Callable

# What a script returns to answer a request itself: (status, headers, body).
Answer = tuple[int, dict[str, str], bytes]
HOP_BY_HOP = {"connection", "keep-alive", "transfer-encoding", "proxy-connection", "te", "upgrade"}


@dataclass
class Seen:
    method: str
    path: str
    headers: dict[str, str]
    status: int = 0


class _Server(ThreadingHTTPServer):
    daemon_threads = True
    allow_reuse_address = True


class _HTTPService:
    """Common start/stop for the small HTTP servers below."""

    def __init__(self) -> None:
        self.requests: list[Seen] = []
        self._lock = threading.Lock()
        self._server = _Server(("127.0.0.1", 0), self._handler_class())
        self.port = self._server.server_address[1]
        self._thread = threading.Thread(target=self._server.serve_forever, daemon=True)

    @property
    def host(self) -> str:
        return f"127.0.0.1:{self.port}"

    def start(self):
        self._thread.start()
        return self

    def stop(self) -> None:
        self._server.shutdown()
        self._server.server_close()

    def __enter__(self):
        return self.start()

    def __exit__(self, *exc) -> None:
        self.stop()

    def _record(self, seen: Seen) -> None:
        with self._lock:
            self.requests.append(seen)

    def _handler_class(self):
        service = self

        class Handler(BaseHTTPRequestHandler):
            protocol_version = "HTTP/1.1"

            def log_message(self, *args) -> None:  # keep test output clean
                pass

            def _handle(self) -> None:
                service.handle(self)

            do_GET = do_HEAD = do_POST = do_PUT = do_PATCH = do_DELETE = _handle

        return Handler

    def handle(self, h: BaseHTTPRequestHandler) -> None:
        raise NotImplementedError

    @staticmethod
    def answer(h: BaseHTTPRequestHandler, status: int, headers: dict[str, str], body: bytes) -> None:
        h.send_response(status)
        for k, v in headers.items():
            h.send_header(k, v)
        h.send_header("Content-Length", str(len(body)))
        h.end_headers()
        if h.command != "HEAD" and body:
            h.wfile.write(body)


class Frontend(_HTTPService):
    """Forwards every request to `upstream` (host:port) unless `script` answers it.

    script(seen) -> Answer | None (the script keeps its own state; None forwards).
    `strip_request_headers` are removed before forwarding (e.g. "Range", to play a
    server that ignores it).
    """

    def __init__(self, upstream: str, script: Callable[[Seen], Answer | None] | None = None,
                 strip_request_headers: tuple[str, ...] = ()) -> None:
        self.upstream = upstream
        self.script = script
        self.strip = {h.lower() for h in strip_request_headers}
        super().__init__()

    def handle(self, h: BaseHTTPRequestHandler) -> None:
        length = int(h.headers.get("Content-Length") or 0)
        body = h.rfile.read(length) if length else b""
        seen = Seen(h.command, h.path, {k: v for k, v in h.headers.items()})
        self._record(seen)
        if self.script is not None:
            answer = self.script(seen)
            if answer is not None:
                seen.status = answer[0]
                self.answer(h, *answer)
                return
        conn = http.client.HTTPConnection(self.upstream, timeout=30)
        try:
            headers = {k: v for k, v in h.headers.items()
                       if k.lower() not in HOP_BY_HOP and k.lower() not in self.strip}
            conn.request(h.command, h.path, body=body or None, headers=headers)
            resp = conn.getresponse()
            data = resp.read()
            seen.status = resp.status
            out = {k: v for k, v in resp.getheaders()
                   if k.lower() not in HOP_BY_HOP and k.lower() != "content-length"}
            if h.command == "HEAD":
                # keep the upstream's Content-Length for HEAD (no body to measure)
                h.send_response(resp.status)
                for k, v in resp.getheaders():
                    if k.lower() not in HOP_BY_HOP:
                        h.send_header(k, v)
                h.end_headers()
            else:
                self.answer(h, resp.status, out, data)
        finally:
            conn.close()


class TokenServer(_HTTPService):
    """GET /token?service=..&scope=.. -> {"token", "expires_in"}; optional basic auth."""

    def __init__(self, expires_in: int | None = 300, users: dict[str, str] | None = None) -> None:
        self.expires_in = expires_in
        self.users = users or {}
        self.issued: dict[str, str] = {}  # token -> scope
        self._n = 0
        super().__init__()

    @property
    def realm(self) -> str:
        return f"http://{self.host}/token"

    def handle(self, h: BaseHTTPRequestHandler) -> None:
        seen = Seen(h.command, h.path, {k: v for k, v in h.headers.items()})
        self._record(seen)
        url = urllib.parse.urlsplit(h.path)
        query = dict(urllib.parse.parse_qsl(url.query))
        if url.path != "/token":
            seen.status = 404
            self.answer(h, 404, {}, b"")
            return
        if self.users:
            auth = h.headers.get("Authorization", "")
            ok = False
            if auth.startswith("Basic "):
                user, _, pw = base64.b64decode(auth[6:]).decode().partition(":")
                ok = self.users.get(user) == pw
            if not ok:
                seen.status = 401
                self.answer(h, 401, {"WWW-Authenticate": 'Basic realm="token"'}, b"")
                return
        with self._lock:
            self._n += 1
            token = f"tok-{self._n}-{int(time.time() * 1000)}"
            self.issued[token] = query.get("scope", "")
        body: dict = {"token": token}
        if self.expires_in is not None:
            body["expires_in"] = self.expires_in
        seen.status = 200
        self.answer(h, 200, {"Content-Type": "application/json"}, json.dumps(body).encode())

    def token_requests(self) -> list[Seen]:
        return [r for r in self.requests if r.path.startswith("/token")]


def bearer_guard(tokens: TokenServer, service: str = "test-registry") -> Callable[[Seen], Answer | None]:
    """A Frontend script demanding a token issued for the request's repository."""

    def script(seen: Seen) -> Answer | None:
        path = urllib.parse.urlsplit(seen.path).path
        repo = None
        for marker in ("/manifests/", "/blobs/", "/tags/list"):
            if marker in path:
                repo = path[len("/v2/"):path.index(marker)]
                break
        scope = f"repository:{repo}:pull" if repo else ""
        auth = seen.headers.get("Authorization", "")
        token = auth[7:] if auth.startswith("Bearer ") else None
        with tokens._lock:
            granted = tokens.issued.get(token or "")
        # the token must exist and cover this repository (pull is enough for GET/HEAD)
        if granted is not None and (not repo or granted.split(":")[1:2] == [repo]):
            expired = False
            if tokens.expires_in is not None and token:
                issued_ms = int(token.rsplit("-", 1)[1])
                expired = time.time() * 1000 - issued_ms > tokens.expires_in * 1000
            if not expired:
                return None  # forward
        challenge = f'Bearer realm="{tokens.realm}",service="{service}"'
        if scope:
            challenge += f',scope="{scope}"'
        return 401, {"WWW-Authenticate": challenge, "Content-Type": "application/json"}, \
            b'{"errors":[{"code":"UNAUTHORIZED","message":"authentication required"}]}'

    return script


class _LoopbackProxy:
    """A listening socket on 127.0.0.1 with an accept thread (`_accept`, the subclass's);
    start/stop or use as a context manager."""

    def _listen(self) -> None:
        self._sock = socket.socket(socket.AF_INET, socket.SOCK_STREAM)
        self._sock.setsockopt(socket.SOL_SOCKET, socket.SO_REUSEADDR, 1)
        self._sock.bind(("127.0.0.1", 0))
        self._sock.listen(16)
        self.port = self._sock.getsockname()[1]
        self._lock = threading.Lock()
        self._stop = threading.Event()
        self._thread = threading.Thread(target=self._accept, daemon=True)

    def _accept(self) -> None:
        raise NotImplementedError

    @property
    def host(self) -> str:
        return f"127.0.0.1:{self.port}"

    def start(self):
        self._thread.start()
        return self

    def stop(self) -> None:
        self._stop.set()
        self._sock.close()

    def __enter__(self):
        return self.start()

    def __exit__(self, *exc) -> None:
        self.stop()


@dataclass
class DroppingProxy(_LoopbackProxy):
    """TCP proxy to `upstream`; each of the first `drop_connections` connections is cut
    once it has carried `drop_after` bytes of response. Records each connection's
    request bytes (to check e.g. the Range header of a resumed download)."""

    upstream: tuple[str, int]
    drop_after: int
    drop_connections: int = 1
    connections: list[bytearray] = field(default_factory=list)
    dropped: int = 0

    def __post_init__(self) -> None:
        self._listen()

    def _accept(self) -> None:
        while not self._stop.is_set():
            try:
                client, _ = self._sock.accept()
            except OSError:
                return
            with self._lock:
                index = len(self.connections)
                self.connections.append(bytearray())
            upstream = socket.create_connection(self.upstream)
            drop = index < self.drop_connections
            threading.Thread(target=self._pump_requests, args=(client, upstream, index), daemon=True).start()
            threading.Thread(target=self._pump_responses, args=(upstream, client, drop), daemon=True).start()

    def _pump_requests(self, src: socket.socket, dst: socket.socket, index: int) -> None:
        try:
            while data := src.recv(65536):
                with self._lock:
                    if len(self.connections[index]) < 65536:
                        self.connections[index] += data
                dst.sendall(data)
        except OSError:
            pass
        finally:
            _close(dst)

    def _pump_responses(self, src: socket.socket, dst: socket.socket, drop: bool) -> None:
        sent = 0
        try:
            while data := src.recv(65536):
                if drop and sent + len(data) >= self.drop_after:
                    dst.sendall(data[: max(0, self.drop_after - sent)])
                    with self._lock:
                        self.dropped += 1
                    break  # cut both directions mid-body
                dst.sendall(data)
                sent += len(data)
        except OSError:
            pass
        finally:
            _close(dst)
            _close(src)

    def requests_text(self) -> list[str]:
        with self._lock:
            return [bytes(c).decode("latin-1") for c in self.connections]


def _close(s: socket.socket) -> None:
    try:
        s.shutdown(socket.SHUT_RDWR)
    except OSError:
        pass
    s.close()


def paginating_tags(upstream: str, link_style: str = "relative") -> Callable[[Seen], Answer | None]:
    """A Frontend script serving /tags/list in pages as the distribution spec says
    (sorted, `n` per page, `last` exclusive, `Link: <...>; rel="next"`).

    Needed because Debian's docker-registry 2.8 ignores `n` and `last` (checked:
    it always returns every tag, without a Link header)."""
    import requests

    def script(seen: Seen) -> Answer | None:
        url = urllib.parse.urlsplit(seen.path)
        if not url.path.endswith("/tags/list") or seen.method != "GET":
            return None
        full = requests.get(f"http://{upstream}{url.path}", timeout=30)
        if full.status_code != 200:
            return full.status_code, {"Content-Type": "application/json"}, full.content
        body = full.json()
        tags = sorted(body.get("tags") or [])
        query = dict(urllib.parse.parse_qsl(url.query))
        if "last" in query:
            tags = [t for t in tags if t > query["last"]]
        headers = {"Content-Type": "application/json"}
        n = int(query["n"]) if "n" in query else None
        if n is not None and len(tags) > n:
            tags = tags[:n]
            nxt = f"{url.path}?{urllib.parse.urlencode({'n': n, 'last': tags[-1]})}"
            if link_style == "absolute":
                nxt = f"http://{seen.headers.get('Host')}{nxt}"
            headers["Link"] = f'<{nxt}>; rel="next"'
        return 200, headers, json.dumps({"name": body.get("name"), "tags": tags}).encode()

    return script


class HugeTokenServer(TokenServer):
    """A token endpoint whose answer is `token_bytes` long (one giant token string),
    generated while it is sent: the client must stop reading, not buffer it."""

    def __init__(self, token_bytes: int, declare_length: bool = True) -> None:
        self.token_bytes = token_bytes
        self.declare_length = declare_length  # False: the body ends when the connection does
        self.sent = 0  # bytes of body written before the client hung up
        super().__init__()

    def handle(self, h: BaseHTTPRequestHandler) -> None:
        seen = Seen(h.command, h.path, {k: v for k, v in h.headers.items()})
        self._record(seen)
        head, tail = b'{"token": "', b'", "expires_in": 300}'
        body_len = len(head) + self.token_bytes + len(tail)
        seen.status = 200
        h.send_response(200)
        h.send_header("Content-Type", "application/json")
        if self.declare_length:
            h.send_header("Content-Length", str(body_len))
        else:
            h.send_header("Connection", "close")
            h.close_connection = True
        h.end_headers()
        block = b"A" * (1024 * 1024)
        try:
            h.wfile.write(head)
            left = self.token_bytes
            while left > 0:
                n = min(left, len(block))
                h.wfile.write(block[:n])
                left -= n
                with self._lock:
                    self.sent += n
            h.wfile.write(tail)
        except OSError:
            h.close_connection = True


@dataclass
class TricklingProxy(_LoopbackProxy):
    """TCP proxy to `upstream`; once a connection has carried `after` bytes of response,
    the rest trickles: `step` bytes every `every` seconds (a registry stuck behind a
    bad link). `trickling` counts the connections that reached that point."""

    upstream: tuple[str, int]
    after: int
    every: float = 1.0
    step: int = 1
    trickling: int = 0

    def __post_init__(self) -> None:
        self._listen()

    def _accept(self) -> None:
        while not self._stop.is_set():
            try:
                client, _ = self._sock.accept()
            except OSError:
                return
            upstream = socket.create_connection(self.upstream)
            threading.Thread(target=self._pump, args=(client, upstream, False), daemon=True).start()
            threading.Thread(target=self._pump, args=(upstream, client, True), daemon=True).start()

    def _pump(self, src: socket.socket, dst: socket.socket, response: bool) -> None:
        sent = 0
        counted = False
        try:
            while not self._stop.is_set() and (data := src.recv(65536)):
                if not response or sent + len(data) <= self.after:
                    dst.sendall(data)
                    sent += len(data)
                    continue
                head = max(0, self.after - sent)
                dst.sendall(data[:head])
                sent += head
                if not counted:
                    counted = True
                    with self._lock:
                        self.trickling += 1
                for i in range(head, len(data), self.step):
                    if self._stop.wait(self.every):
                        return
                    dst.sendall(data[i:i + self.step])
                    sent += len(data[i:i + self.step])
        except OSError:
            pass
        finally:
            _close(dst)
            _close(src)

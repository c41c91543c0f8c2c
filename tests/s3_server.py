"""S3 on loopback for tests: moto's server, and a proxy that makes it fail on purpose.

`start_moto_server()` gives (server, endpoint); `with FlakyProxy(endpoint, failures=2,
methods=("PUT",)) as proxy:` then point clients at `proxy.url`, and its first 2 PUTs answer
503 SlowDown; `stop_moto_server(server)` at the end.
"""

from __future__ import annotations

import http.client
import logging
import socket
import struct
import threading
import time
import uuid
from collections.abc import Iterable
from http.server import BaseHTTPRequestHandler, ThreadingHTTPServer
from urllib.parse import urlsplit

from moto.server import ThreadedMotoServer

# Headers that belong to one connection, not to the request or response (RFC 9110 7.6.1), plus
# the ones the proxy rewrites itself: Expect (the proxy already has the body) and Content-Length.
_HOP_BY_HOP = frozenset(
    {
        "connection",
        "keep-alive",
        "proxy-authenticate",
        "proxy-authorization",
        "proxy-connection",
        "te",
        "trailer",
        "transfer-encoding",
        "upgrade",
        "expect",
        "content-length",
    }
)


def start_moto_server() -> tuple[ThreadedMotoServer, str]:
    """moto's S3 (all of moto, in fact) in a thread on 127.0.0.1 and a free port; (server, url)."""
    # Werkzeug logs every request at INFO to stderr; tests only want to hear about problems.
    logging.getLogger("werkzeug").setLevel(logging.WARNING)
    server = ThreadedMotoServer(ip_address="127.0.0.1", port=0, verbose=False)  # port 0: no race
    server.start()
    host, port = server.get_host_and_port()
    return server, f"http://{host}:{port}"


def stop_moto_server(server: ThreadedMotoServer) -> None:
    server.stop()


class FlakyProxy:
    """A reverse proxy on 127.0.0.1 in front of `upstream` that answers the first `failures`
    requests whose method is in `methods` (and whose path contains `path_contains`, if given) with
    `status` and an S3 XML error `code`; every other request is forwarded unchanged, Host and
    Authorization included, so SigV4 signatures stay valid.

    Counters (read them after the client call returned): `requests` (all seen), `injected`
    (failures answered), `seen` ((method, path) of each request).
    """

    def __init__(
        self,
        upstream: str,
        failures: int = 0,
        methods: Iterable[str] = ("PUT", "POST"),
        *,
        status: int = 503,
        code: str = "SlowDown",
        path_contains: str | None = None,
    ) -> None:
        parts = urlsplit(upstream)
        if parts.scheme != "http" or not parts.hostname:
            raise ValueError(f"FlakyProxy forwards to plain http endpoints, got {upstream!r}")
        self.upstream_host = parts.hostname
        self.upstream_port = parts.port or 80
        self.status = status
        self.code = code
        self.requests = 0
        self.injected = 0
        self.outage_requests = 0  # requests that met an outage
        self.seen: list[tuple[str, str]] = []
        self._lock = threading.Lock()
        self._outage_until = 0.0
        self._outage_mode = "reset"
        self.set_failures(failures, methods, path_contains=path_contains)
        self._server: ThreadingHTTPServer | None = None
        self._thread: threading.Thread | None = None

    def set_failures(
        self, failures: int, methods: Iterable[str] = ("PUT", "POST"), *, path_contains: str | None = None
    ) -> None:
        """(Re)arm: the next `failures` matching requests fail."""
        with self._lock:
            self._remaining = failures
            self._methods = frozenset(m.upper() for m in methods)
            self._path_contains = path_contains

    def outage(self, seconds: float, mode: str = "reset") -> None:
        """For the next ``seconds``, every request meets a dead storage: its connection is reset
        ("reset", a restarting server), or answered never and closed when the outage ends ("hang")."""
        if mode not in ("reset", "hang"):
            raise ValueError(f"outage mode is reset or hang, got {mode!r}")
        with self._lock:
            self._outage_mode = mode
            self._outage_until = time.monotonic() + seconds

    def _in_outage(self) -> tuple[str, float] | None:
        with self._lock:
            left = self._outage_until - time.monotonic()
            if left > 0:
                self.outage_requests += 1
                return self._outage_mode, left
            return None

    @property
    def url(self) -> str:
        assert self._server is not None, "start() the proxy first"
        host, port = self._server.server_address[:2]
        return f"http://{host}:{port}"

    def start(self) -> FlakyProxy:
        handler = type("_BoundHandler", (_ProxyHandler,), {"proxy": self})
        self._server = ThreadingHTTPServer(("127.0.0.1", 0), handler)
        self._server.daemon_threads = True
        self._thread = threading.Thread(
            target=self._server.serve_forever, args=(0.05,), name="flaky-proxy", daemon=True
        )
        self._thread.start()
        return self

    def stop(self) -> None:
        if self._server is not None:
            self._server.shutdown()
            self._server.server_close()
            self._server = None
        if self._thread is not None:
            self._thread.join(timeout=5)
            self._thread = None

    def __enter__(self) -> FlakyProxy:
        return self.start()

    def __exit__(self, *exc: object) -> None:
        self.stop()

    def _should_fail(self, method: str, path: str) -> bool:
        # One lock for counting and deciding, so concurrent part uploads fail exactly N times.
        with self._lock:
            self.requests += 1
            self.seen.append((method, path))
            matches = method in self._methods and (self._path_contains is None or self._path_contains in path)
            if matches and self._remaining > 0:
                self._remaining -= 1
                self.injected += 1
                return True
            return False


class _ProxyHandler(BaseHTTPRequestHandler):
    protocol_version = "HTTP/1.1"  # keep-alive, and answers "Expect: 100-continue" as S3 does
    proxy: FlakyProxy

    def log_message(self, format: str, *args: object) -> None:  # quiet in tests
        pass

    def _read_body(self) -> bytes:
        if "chunked" in self.headers.get("Transfer-Encoding", "").lower():
            chunks = []
            while True:
                size = int(self.rfile.readline().split(b";", 1)[0].strip() or b"0", 16)
                if size == 0:
                    while self.rfile.readline() not in (b"\r\n", b"\n", b""):
                        pass  # trailers
                    return b"".join(chunks)
                chunks.append(self.rfile.read(size))
                self.rfile.readline()
        length = int(self.headers.get("Content-Length") or 0)
        return self.rfile.read(length) if length else b""

    def _handle(self) -> None:
        outage = self.proxy._in_outage()
        if outage is not None:
            self._drop_connection(*outage)
            return
        body = self._read_body()  # always drained, so the connection stays usable after a 503
        if self.proxy._should_fail(self.command, self.path):
            self._send_error()
        else:
            self._forward(body)

    do_GET = do_PUT = do_POST = do_HEAD = do_DELETE = do_PATCH = do_OPTIONS = _handle

    def _drop_connection(self, mode: str, left: float) -> None:
        if mode == "hang":
            time.sleep(left)
        # SO_LINGER 0: closing sends a reset, as a server that went away does.
        self.connection.setsockopt(socket.SOL_SOCKET, socket.SO_LINGER, struct.pack("ii", 1, 0))
        self.close_connection = True

    def _send_error(self) -> None:
        request_id = uuid.uuid4().hex[:16].upper()
        payload = (
            '<?xml version="1.0" encoding="UTF-8"?>\n'
            f"<Error><Code>{self.proxy.code}</Code><Message>Injected by FlakyProxy: please reduce "
            f"your request rate.</Message><RequestId>{request_id}</RequestId></Error>"
        ).encode()
        self.send_response_only(self.proxy.status)
        self.send_header("Content-Type", "application/xml")
        self.send_header("Content-Length", str(len(payload)))
        self.send_header("x-amz-request-id", request_id)
        self.end_headers()
        if self.command != "HEAD":
            self.wfile.write(payload)

    def _forward(self, body: bytes) -> None:
        conn = http.client.HTTPConnection(self.proxy.upstream_host, self.proxy.upstream_port, timeout=120)
        try:
            # putrequest/putheader keep the client's headers as they were, Host first of all.
            conn.putrequest(self.command, self.path, skip_host=True, skip_accept_encoding=True)
            for name, value in self.headers.items():
                if name.lower() not in _HOP_BY_HOP:
                    conn.putheader(name, value)
            if body or self.command in ("PUT", "POST", "PATCH"):
                conn.putheader("Content-Length", str(len(body)))
            conn.endheaders(body or None)
            resp = conn.getresponse()
            data = resp.read()
        except OSError as exc:
            self._send_bad_gateway(exc)
            return
        finally:
            conn.close()
        self.send_response_only(resp.status, resp.reason)
        for name, value in resp.getheaders():
            lower = name.lower()
            if lower not in _HOP_BY_HOP:
                self.send_header(name, value)
            elif lower == "content-length" and self.command == "HEAD":
                self.send_header(name, value)  # a HEAD answer describes the GET body it omits
        if self.command != "HEAD":
            self.send_header("Content-Length", str(len(data)))
        self.end_headers()
        if self.command != "HEAD" and resp.status not in (204, 304):
            self.wfile.write(data)

    def _send_bad_gateway(self, exc: OSError) -> None:
        payload = f"<Error><Code>BadGateway</Code><Message>{type(exc).__name__}</Message></Error>".encode()
        self.send_response_only(502)
        self.send_header("Content-Type", "application/xml")
        self.send_header("Content-Length", str(len(payload)))
        self.end_headers()
        if self.command != "HEAD":
            self.wfile.write(payload)

"""A fault-injecting HTTP proxy for tests: sits between the code under test and moto's S3 server.

Every request (any method, path, query, headers, body) is forwarded to a loopback upstream, except that with
probability ``p`` (per method; GET, PUT and POST by default) or whenever the URL path contains one of
``fail_paths``, the proxy answers instead with a fault chosen at random among ``kinds``:

- ``"slowdown"``: 503 with an S3 ``SlowDown`` XML error body,
- ``"internal"``: 500 with an S3 ``InternalError`` XML error body,
- ``"reset"``: the connection is dropped with a TCP reset (``SO_LINGER`` 0), no response at all,

the transient faults every layer retries (the default ``kinds``); and, named on purpose, a permanent one:

- ``"denied"``: 403 with an S3 ``AccessDenied`` XML error body (e.g. a bucket policy denying a prefix), which
  no layer retries.

A fault is injected before the request reaches the upstream (the request body is read first, so the client
sees the fault while waiting for the response), so a faulted request never takes effect.

Request bodies: a ``Content-Length`` body is forwarded byte for byte (this covers botocore's ``aws-chunked``
content encoding, which travels with a ``Content-Length``); a ``Transfer-Encoding: chunked`` body is
de-chunked and forwarded with a ``Content-Length``. Bodies are buffered in memory: meant for small test objects.

Standard library only; the upstream must be a literal address in 127.0.0.0/8.
"""

from __future__ import annotations

import http.client
import ipaddress
import logging
import random
import socket
import struct
import threading
from collections import Counter
from collections.abc import Iterable, Mapping
from http.server import BaseHTTPRequestHandler, ThreadingHTTPServer
from types import TracebackType
from urllib.parse import unquote, urlsplit

log = logging.getLogger(__name__)

FAULT_KINDS: tuple[str, ...] = ("slowdown", "internal", "reset")  # transient: the default kinds
KNOWN_KINDS: tuple[str, ...] = (*FAULT_KINDS, "denied")
FAULTED_METHODS: tuple[str, ...] = ("GET", "PUT", "POST")
LOOPBACK = ipaddress.ip_network("127.0.0.0/8")
UPSTREAM_TIMEOUT_S = 30.0
# Per-connection headers that a proxy must not forward (RFC 9110 §7.6.1), plus Expect: the 100-continue
# exchange is answered here by http.server, and the upstream gets the whole body at once.
HOP_BY_HOP = frozenset({"connection", "keep-alive", "proxy-authenticate", "proxy-authorization", "proxy-connection",
                        "te", "trailer", "transfer-encoding", "upgrade", "expect"})
ERRORS: dict[str, tuple[int, str, str]] = {
    "slowdown": (503, "SlowDown", "Please reduce your request rate."),
    "internal": (500, "InternalError", "We encountered an internal error. Please try again."),
    "denied": (403, "AccessDenied", "Access Denied"),
}


def loopback_upstream(url: str) -> tuple[str, int]:
    """``(host, port)`` of an ``http://`` URL whose host is a literal 127.0.0.0/8 address; anything else is refused."""
    parts = urlsplit(url)
    if parts.scheme != "http" or not parts.hostname or parts.port is None:
        raise ValueError(f"upstream must be http://127.x.y.z:PORT, got {url!r}")
    try:
        address = ipaddress.ip_address(parts.hostname)
    except ValueError:
        raise ValueError(f"upstream host must be a literal loopback address, got {parts.hostname!r}") from None
    if address not in LOOPBACK:
        raise ValueError(f"upstream host {address} is outside 127.0.0.0/8")
    return str(address), parts.port


def s3_error_body(code: str, message: str, request_id: str) -> bytes:
    return (f'<?xml version="1.0" encoding="UTF-8"?>\n<Error><Code>{code}</Code><Message>{message}</Message>'
            f"<RequestId>{request_id}</RequestId><HostId>faultproxy</HostId></Error>").encode()


class FaultProxy:
    """A context manager running the proxy on a free 127.0.0.1 port; ``url`` is its endpoint.

    ``p_fail`` is the fault probability for GET, PUT and POST; ``p_by_method`` overrides or adds methods
    (e.g. ``{"GET": 0.2, "HEAD": 0.1}``). ``fail_paths``: substrings of the (unquoted) URL path whose requests,
    any method, always fail. ``requests``, ``faults`` (per method) and ``fault_kinds`` count what happened;
    ``p_by_method``, ``kinds`` and ``fail_paths`` may be changed while it runs.
    """

    def __init__(self, upstream: str, p_fail: float = 0.1, *, p_by_method: Mapping[str, float] | None = None,
                 kinds: Iterable[str] = FAULT_KINDS, fail_paths: Iterable[str] = (), seed: int = 0) -> None:
        self.upstream = loopback_upstream(upstream)
        self.p_by_method: dict[str, float] = {m: p_fail for m in FAULTED_METHODS}
        self.p_by_method.update({m.upper(): p for m, p in (p_by_method or {}).items()})
        self.kinds: tuple[str, ...] = tuple(kinds)
        unknown = set(self.kinds) - set(KNOWN_KINDS)
        if unknown or not self.kinds:
            raise ValueError(f"fault kinds must be a non-empty subset of {KNOWN_KINDS}, got {self.kinds}")
        self.fail_paths: set[str] = set(fail_paths)
        self.requests: Counter[str] = Counter()
        self.faults: Counter[str] = Counter()
        self.fault_kinds: Counter[str] = Counter()
        self._rng = random.Random(seed)
        self._lock = threading.Lock()
        self._connections: set[socket.socket] = set()
        self._server: ThreadingHTTPServer | None = None
        self._thread: threading.Thread | None = None

    @property
    def url(self) -> str:
        if self._server is None:
            raise RuntimeError("FaultProxy is not running")
        host, port = self._server.server_address[:2]
        return f"http://{host}:{port}"

    @property
    def total_faults(self) -> int:
        return sum(self.faults.values())

    def reset_counters(self) -> None:
        with self._lock:
            self.requests.clear()
            self.faults.clear()
            self.fault_kinds.clear()

    def start(self) -> FaultProxy:
        server = ThreadingHTTPServer(("127.0.0.1", 0), _Handler)
        server.daemon_threads = True
        server.proxy = self  # type: ignore[attr-defined]
        self._server = server
        self._thread = threading.Thread(target=server.serve_forever, kwargs={"poll_interval": 0.05}, name="faultproxy",
                                        daemon=True)
        self._thread.start()
        return self

    def close(self) -> None:
        if self._server is None:
            return
        self._server.shutdown()
        self._server.server_close()
        with self._lock:
            open_connections = list(self._connections)
        for conn in open_connections:  # idle keep-alive connections of the client's pool
            try:
                conn.shutdown(socket.SHUT_RDWR)
            except OSError:
                pass
        if self._thread is not None:
            self._thread.join(timeout=5)
        self._server = None

    def __enter__(self) -> FaultProxy:
        return self.start()

    def __exit__(self, exc_type: type[BaseException] | None, exc: BaseException | None,
                 tb: TracebackType | None) -> None:
        self.close()

    def decide(self, method: str, path: str) -> str | None:
        """Count the request; the fault kind to inject, or None to forward it."""
        with self._lock:
            self.requests[method] += 1
            decoded = unquote(path.split("?", 1)[0])
            forced = any(s in decoded for s in self.fail_paths)
            if not forced and self._rng.random() >= self.p_by_method.get(method, 0.0):
                return None
            kind = self._rng.choice(self.kinds)
            self.faults[method] += 1
            self.fault_kinds[kind] += 1
            return kind

    def track(self, conn: socket.socket, *, open_: bool) -> None:
        with self._lock:
            if open_:
                self._connections.add(conn)
            else:
                self._connections.discard(conn)


class _Handler(BaseHTTPRequestHandler):
    protocol_version = "HTTP/1.1"  # keep-alive, as botocore / aiohttp expect
    timeout = 60  # an idle keep-alive connection is closed after this
    server: ThreadingHTTPServer

    @property
    def proxy(self) -> FaultProxy:
        return self.server.proxy  # type: ignore[attr-defined,no-any-return]

    def setup(self) -> None:
        super().setup()
        self.proxy.track(self.connection, open_=True)

    def finish(self) -> None:
        self.proxy.track(self.connection, open_=False)
        try:
            super().finish()
        except OSError:
            pass

    def log_message(self, format: str, *args: object) -> None:
        log.debug("faultproxy: " + format, *args)

    def handle_one_request(self) -> None:
        try:
            super().handle_one_request()
        except (ConnectionError, TimeoutError):
            self.close_connection = True

    def __getattr__(self, name: str) -> object:
        """``do_GET``, ``do_PUT``, ...: every method goes through ``relay``."""
        if name.startswith("do_"):
            return self.relay
        raise AttributeError(name)

    def read_body(self) -> bytes:
        if "chunked" in self.headers.get("Transfer-Encoding", "").lower():
            return self.read_chunked()
        length = int(self.headers.get("Content-Length") or 0)
        return self.rfile.read(length) if length else b""

    def read_chunked(self) -> bytes:
        parts: list[bytes] = []
        while True:
            size = int(self.rfile.readline().split(b";", 1)[0].strip(), 16)
            if size == 0:
                while self.rfile.readline() not in (b"\r\n", b"\n", b""):  # trailers
                    pass
                return b"".join(parts)
            parts.append(self.rfile.read(size))
            self.rfile.readline()  # CRLF after the chunk

    def relay(self) -> None:
        body = self.read_body()
        kind = self.proxy.decide(self.command, self.path)
        if kind == "reset":
            self.reset()
        elif kind is not None:
            self.send_error_xml(*ERRORS[kind])
        else:
            self.forward(body)

    def reset(self) -> None:
        """Drop the connection with RST: linger 0, then close every reference to the socket."""
        self.close_connection = True
        self.connection.setsockopt(socket.SOL_SOCKET, socket.SO_LINGER, struct.pack("ii", 1, 0))
        self.rfile.close()  # the socket's fd is released once its makefile reader is closed too
        self.connection.close()

    def send_error_xml(self, status: int, code: str, message: str) -> None:
        body = b"" if self.command == "HEAD" else s3_error_body(code, message, f"faultproxy-{id(self):x}")
        self.send_response_only(status)
        self.send_header("Content-Type", "application/xml")
        self.send_header("Content-Length", str(len(body)))
        self.send_header("x-amz-request-id", "faultproxy")
        self.end_headers()
        self.wfile.write(body)

    def forward(self, body: bytes) -> None:
        host, port = self.proxy.upstream
        upstream = http.client.HTTPConnection(host, port, timeout=UPSTREAM_TIMEOUT_S)
        try:
            upstream.putrequest(self.command, self.path, skip_host=True, skip_accept_encoding=True)
            for name, value in self.headers.items():
                if name.lower() not in HOP_BY_HOP and name.lower() != "content-length":
                    upstream.putheader(name, value)
            if body or self.command in ("PUT", "POST"):
                upstream.putheader("Content-Length", str(len(body)))
            upstream.endheaders(body or None)
            response = upstream.getresponse()
            payload = response.read()
        finally:
            upstream.close()
        self.send_response_only(response.status, response.reason)
        for name, value in response.getheaders():
            if name.lower() not in HOP_BY_HOP and name.lower() != "content-length":
                self.send_header(name, value)
        self.send_header("Content-Length", self.response_length(response, payload))
        self.end_headers()
        if self.command != "HEAD":
            self.wfile.write(payload)

    def response_length(self, response: http.client.HTTPResponse, payload: bytes) -> str:
        """HEAD keeps the upstream's length (no body follows); otherwise the length of the body relayed."""
        if self.command == "HEAD":
            return response.getheader("Content-Length") or "0"
        return str(len(payload))

"""A fault-injecting HTTP proxy in front of an S3 endpoint, for tests.

``FaultProxy(upstream)`` listens on 127.0.0.1 and forwards every request to the S3
server at ``upstream`` (moto), except where its :class:`Plan` makes it answer as a
busy or broken S3 does:

* ``slowdown``: 503 ``SlowDown`` with S3's XML error body (no body for a HEAD)
* ``internal``: 500 ``InternalError``, likewise
* ``drop``: the request is read, then the connection is closed without an answer
* ``cut_request``: the connection is closed after half of the request body (PUT, POST)
* ``truncate``: the upstream answer goes out with its full Content-Length but half of
  its body, then the connection is closed (GET: objects and listings)
* ``lost_reply``: the request reaches upstream and takes effect, then the connection
  is closed instead of the answer (a client must retry idempotently)

Which request is hit is decided from the seed, the request's identity (method, path,
query, Range) and how often that identity was seen, never from timing: the same
requests get the same faults whatever the interleaving.  One request is hit at most
``streak`` times in a row, so a client with more attempts always gets through.
``refuse`` (a regex searched in the key) answers every request for matching keys with
503 SlowDown: a fault that does not clear until the plan changes.

The proxy counts what it injected (``injected[(op, kind)]``) so a test can assert that
faults really happened, and records what clients were shown under ``watch``: every
key and size a listing returned, every object body a GET returned complete.
"""

from __future__ import annotations

import http.client
import re
import socket
import threading
import xml.etree.ElementTree as ET
import zlib
from collections import Counter
from collections.abc import Iterator
from contextlib import contextmanager
from dataclasses import dataclass, field
from http.server import BaseHTTPRequestHandler, ThreadingHTTPServer
from typing import Any
from urllib.parse import parse_qs, unquote, urlsplit

KINDS = ("slowdown", "internal", "drop", "cut_request", "truncate", "lost_reply")
_ERRORS = {
    "slowdown": (503, "SlowDown", "Please reduce your request rate."),
    "internal": (500, "InternalError", "We encountered an internal error. Please try again."),
}
_HOP_BY_HOP = {
    "connection",
    "keep-alive",
    "proxy-connection",
    "transfer-encoding",
    "te",
    "upgrade",
    "expect",
}


@dataclass(frozen=True)
class Plan:
    """Which faults to inject: none by default."""

    #: Hit about one request in ``every`` (0: none).
    every: int = 0
    #: ``every`` for some operations: ``(("list", 1),)`` hits every listing.
    rates: tuple[tuple[str, int], ...] = ()
    seed: int = 0
    #: At most this many faults in a row for one request (its retries).
    streak: int = 2
    kinds: tuple[str, ...] = KINDS
    #: Only these operations (see :func:`operation`); empty: all.
    ops: frozenset[str] = frozenset()
    #: Every request whose key matches this regex is answered 503 SlowDown.
    refuse: str | None = None


def operation(method: str, key: str, query: str, headers: Any) -> str:
    """The S3 operation of a (path-style) request, as the counters name it."""
    params = parse_qs(query, keep_blank_values=True)
    if method == "GET":
        return "get" if key else "list"
    if method == "HEAD":
        return "head"
    if method == "PUT":
        if "x-amz-copy-source" in headers:
            return "copy"
        return "part" if "partNumber" in params else "put"
    if method == "POST":
        if "delete" in params:
            return "delete"
        return "create" if "uploads" in params else "complete"
    if method == "DELETE":
        return "abort" if "uploadId" in params else "delete_one"
    return method.lower()


@dataclass
class Seen:
    """What clients were shown under the watched prefix."""

    #: (key, size) of every entry of every listing answered whole.
    listed: list[tuple[str, int]] = field(default_factory=list)
    #: (key, body) of every GET answered whole (ranged GETs: (key, part of the body)).
    read: list[tuple[str, bytes, str]] = field(default_factory=list)


class FaultProxy:
    def __init__(self, upstream: str, plan: Plan = Plan()) -> None:
        parts = urlsplit(upstream)
        assert parts.hostname and parts.port
        self.upstream = (parts.hostname, parts.port)
        self.plan = plan
        self.lock = threading.Lock()
        self.requests: Counter[str] = Counter()
        self.injected: Counter[tuple[str, str]] = Counter()
        self.watch: str | None = None
        self.seen = Seen()
        self._times: Counter[str] = Counter()
        self._streak: Counter[str] = Counter()
        self._ids = 0
        self.server = ThreadingHTTPServer(("127.0.0.1", 0), _Handler)
        self.server.daemon_threads = True
        self.server.proxy = self  # type: ignore[attr-defined]
        self.url = f"http://127.0.0.1:{self.server.server_address[1]}"
        self._thread = threading.Thread(target=self.server.serve_forever, daemon=True)
        self._thread.start()

    def close(self) -> None:
        self.server.shutdown()
        self.server.server_close()

    def reset(self, plan: Plan = Plan(), watch: str | None = None) -> None:
        """A new plan, with every counter and record cleared."""
        with self.lock:
            self.plan, self.watch, self.seen = plan, watch, Seen()
            self.requests.clear()
            self.injected.clear()
            self._times.clear()
            self._streak.clear()

    @contextmanager
    def faults(self, plan: Plan, watch: str | None = None) -> Iterator[FaultProxy]:
        self.reset(plan, watch)
        try:
            yield self
        finally:
            with self.lock:
                self.plan = Plan()

    def count(self, op: str | None = None, kind: str | None = None) -> int:
        """Faults injected, for one operation and/or of one kind."""
        with self.lock:
            return sum(
                n
                for (o, k), n in self.injected.items()
                if (op is None or o == op) and (kind is None or k == kind)
            )

    # --- the decision --------------------------------------------------------------------

    def decide(self, op: str, identity: str, key: str, has_body: bool) -> str | None:
        with self.lock:
            self.requests[op] += 1
            plan = self.plan
            if plan.refuse is not None and re.search(plan.refuse, key):
                self.injected[(op, "refused")] += 1
                return "refused"
            every = dict(plan.rates).get(op, plan.every)
            if not every or (plan.ops and op not in plan.ops):
                return None
            seen = self._times[identity]
            self._times[identity] += 1
            roll = zlib.crc32(f"{plan.seed}|{identity}|{seen}".encode())
            if self._streak[identity] >= plan.streak or roll % every:
                self._streak[identity] = 0
                return None
            kinds = [k for k in plan.kinds if _applies(k, op, has_body)]
            if not kinds:
                return None
            kind = kinds[(roll // every) % len(kinds)]
            self._streak[identity] += 1
            self.injected[(op, kind)] += 1
            return kind

    def request_id(self) -> str:
        with self.lock:
            self._ids += 1
            return f"FAULT{self._ids:08d}"

    def record(self, op: str, key: str, status: int, headers: dict[str, str], data: bytes) -> None:
        watch = self.watch
        if watch is None or status not in (200, 206):
            return
        if op == "list":
            root = ET.fromstring(data)
            found = [
                (unquote(c.findtext("{*}Key") or ""), int(c.findtext("{*}Size") or -1))
                for c in root.iter()
                if c.tag.endswith("}Contents") or c.tag == "Contents"
            ]
            with self.lock:
                self.seen.listed.extend(k for k in found if k[0].startswith(watch))
        elif op == "get" and key.startswith(watch):
            with self.lock:
                self.seen.read.append((key, data, headers.get("content-range", "")))


def _applies(kind: str, op: str, has_body: bool) -> bool:
    if kind == "cut_request":
        return has_body
    if kind == "truncate":
        return op in ("get", "list")
    return True


def _error_body(code: str, message: str, resource: str, request_id: str) -> bytes:
    return (
        '<?xml version="1.0" encoding="UTF-8"?>\n'
        f"<Error><Code>{code}</Code><Message>{message}</Message>"
        f"<Resource>{resource}</Resource><RequestId>{request_id}</RequestId></Error>"
    ).encode()


class _Handler(BaseHTTPRequestHandler):
    protocol_version = "HTTP/1.1"  # keep-alive, and 100-continue for PUTs that ask for it

    def log_message(self, format: str, *args: Any) -> None:
        pass

    def do_GET(self) -> None:
        self._serve()

    def do_HEAD(self) -> None:
        self._serve()

    def do_PUT(self) -> None:
        self._serve()

    def do_POST(self) -> None:
        self._serve()

    def do_DELETE(self) -> None:
        self._serve()

    def _serve(self) -> None:
        proxy: FaultProxy = self.server.proxy  # type: ignore[attr-defined]
        url = urlsplit(self.path)
        _bucket, _, key = unquote(url.path).lstrip("/").partition("/")
        op = operation(self.command, key, url.query, self.headers)
        length = int(self.headers.get("Content-Length") or 0)
        chunked = "chunked" in self.headers.get("Transfer-Encoding", "").lower()
        identity = f"{self.command} {url.path}?{url.query} {self.headers.get('Range', '')}"
        kind = proxy.decide(op, identity, key, has_body=length > 1)
        if kind == "cut_request":
            self.rfile.read(length // 2)
            self._hang_up()
            return
        body = self._read_chunked() if chunked else self.rfile.read(length)
        if kind in ("slowdown", "internal", "refused"):
            status, code, message = _ERRORS["internal" if kind == "internal" else "slowdown"]
            error = (
                b""
                if self.command == "HEAD"
                else _error_body(code, message, url.path, proxy.request_id())
            )
            self.send_response(status)
            self.send_header("Content-Type", "application/xml")
            self.send_header("Content-Length", str(len(error)))
            self.end_headers()
            self.wfile.write(error)
            return
        if kind == "drop":
            self._hang_up()
            return
        status, reason, headers, data = self._forward(proxy, body)
        if kind == "lost_reply":
            self._hang_up()
            return
        self.send_response_only(status, reason)
        for name, value in headers:
            if name.lower() not in _HOP_BY_HOP and name.lower() != "content-length":
                self.send_header(name, value)
        if self.command == "HEAD":
            self.send_header("Content-Length", dict(headers).get("Content-Length", "0"))
        elif status not in (204, 304):
            self.send_header("Content-Length", str(len(data)))
        self.end_headers()
        if kind == "truncate" and len(data) > 1:
            self.wfile.write(data[: len(data) // 2])
            self._hang_up()
            return
        if self.command != "HEAD":
            self.wfile.write(data)
        proxy.record(op, key, status, {k.lower(): v for k, v in headers}, data)

    def _read_chunked(self) -> bytes:
        out = bytearray()
        while True:
            size = int(self.rfile.readline().split(b";")[0].strip() or b"0", 16)
            if size == 0:
                while self.rfile.readline() not in (b"\r\n", b"\n", b""):
                    pass  # trailers
                return bytes(out)
            out += self.rfile.read(size)
            self.rfile.readline()

    def _forward(
        self, proxy: FaultProxy, body: bytes
    ) -> tuple[int, str, list[tuple[str, str]], bytes]:
        conn = http.client.HTTPConnection(*proxy.upstream, timeout=60)
        try:
            conn.putrequest(self.command, self.path, skip_host=True, skip_accept_encoding=True)
            for name, value in self.headers.items():
                if name.lower() not in _HOP_BY_HOP and name.lower() != "content-length":
                    conn.putheader(name, value)
            if body or self.command in ("PUT", "POST"):
                conn.putheader("Content-Length", str(len(body)))
            conn.endheaders(body or None)
            response = conn.getresponse()
            data = response.read()
            return response.status, response.reason, response.getheaders(), data
        finally:
            conn.close()

    def _hang_up(self) -> None:
        """Close the connection now, whatever the client is sending or waiting for."""
        self.close_connection = True
        try:
            self.wfile.flush()
            self.connection.shutdown(socket.SHUT_RDWR)
        except OSError:
            pass

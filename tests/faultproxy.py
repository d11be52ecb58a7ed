"""An HTTP/1.1 server in front of the moto server that misbehaves on request.

It listens on 127.0.0.1 (a real socket, in a thread) and forwards each request
to the upstream unchanged, unless a behaviour was scripted for it::

    with FaultProxy(upstream=moto_url) as proxy:
        proxy.script(answer(200, b"{}"), reset())   # the next two requests
        proxy.always(truncated())                   # every one after those
        client.configure(endpoint_url=proxy.url, ...)

Only :func:`forward` and :func:`partial` reach the upstream: the other
behaviours store nothing, so a retry cannot duplicate. Every request is kept
in :attr:`FaultProxy.requests`, in arrival order.
"""

from __future__ import annotations

import base64
import contextlib
import http.client
import http.server
import json
import socket
import struct
import threading
from typing import Any, Callable, Iterable, Iterator, List, NamedTuple, Set, Tuple
from urllib.parse import urlsplit

__all__ = ["FaultProxy", "Seen", "answer", "forward", "partial", "reset", "trickle", "truncated"]

JSON = "application/x-amz-json-1.1"
THROTTLED = {"ErrorCode": "ServiceUnavailableException", "ErrorMessage": "Slow down (injected)"}
HOP_BY_HOP = {"connection", "keep-alive", "transfer-encoding", "content-length"}

#: A behaviour answers one request: ``behaviour(handler, seen)``.
Behaviour = Callable[["_Handler", "Seen"], None]


class Seen(NamedTuple):
    """One request as received: ``target`` is its ``X-Amz-Target`` header (such as
    ``Firehose_20150804.PutRecordBatch``), ``body`` its JSON body parsed (or None)."""

    method: str
    path: str
    target: str
    body: Any
    raw: bytes
    headers: List[Tuple[str, str]]

    @property
    def records(self) -> List[bytes]:
        """The decoded ``Data`` of a PutRecordBatch request (empty for other calls)."""
        entries = self.body.get("Records", []) if isinstance(self.body, dict) else []
        return [base64.b64decode(entry["Data"]) for entry in entries]


def forward() -> Behaviour:
    """Send the request to the upstream and its answer back, unchanged."""
    def run(handler: _Handler, seen: Seen) -> None:
        handler.reply(*handler.proxy.upstream_call(seen))
    return run


def answer(status: int, body: bytes, content_type: str = JSON) -> Behaviour:
    """A canned answer; the upstream never sees the request."""
    def run(handler: _Handler, seen: Seen) -> None:
        handler.reply(status, [("Content-Type", content_type)], body)
    return run


def truncated() -> Behaviour:
    """A 200 that announces more bytes than it sends, then closes the connection."""
    def run(handler: _Handler, seen: Seen) -> None:
        body = b'{"Encrypted": false, "FailedPutCount": 0, "RequestResponses": [{"Rec'
        handler.wfile.write(_head(200, [("Content-Type", JSON)], len(body) + 100) + body)
        handler.hang_up()
    return run


def trickle(body: bytes, interval: float) -> Behaviour:
    """A valid-looking 200, head and body, a byte every ``interval`` seconds, until it is
    all sent, the client goes away or the proxy closes."""
    def run(handler: _Handler, seen: Seen) -> None:
        data = _head(200, [("Content-Type", JSON)], len(body)) + body
        with contextlib.suppress(OSError):
            for index in range(len(data)):
                if handler.proxy.closing.wait(interval if index else 0):
                    break
                handler.wfile.write(data[index:index + 1])
        handler.hang_up()
    return run


def reset() -> Behaviour:
    """Read the request, then reset the connection without a word."""
    def run(handler: _Handler, seen: Seen) -> None:
        handler.connection.setsockopt(socket.SOL_SOCKET, socket.SO_LINGER, struct.pack("ii", 1, 0))
        handler.hang_up()
    return run


def partial(failed_indexes: Iterable[int]) -> Behaviour:
    """A PutRecordBatch whose entries at ``failed_indexes`` are answered as throttled and
    not sent upstream (the service stores nothing for a failed entry); the others are."""
    failed = set(failed_indexes)

    def run(handler: _Handler, seen: Seen) -> None:
        entries = seen.body["Records"]
        kept = [entry for index, entry in enumerate(entries) if index not in failed]
        ids: Iterator[Any] = iter([])
        if kept:
            raw = json.dumps(dict(seen.body, Records=kept)).encode()
            status, headers, body = handler.proxy.upstream_call(seen._replace(raw=raw))
            if status != 200:
                return handler.reply(status, headers, body)
            ids = iter(json.loads(body)["RequestResponses"])
        results = [THROTTLED if index in failed else next(ids) for index in range(len(entries))]
        reply = {"Encrypted": False, "FailedPutCount": len(entries) - len(kept),
                 "RequestResponses": results}
        handler.reply(200, [("Content-Type", JSON)], json.dumps(reply).encode())
    return run


def _head(status: int, headers: List[Tuple[str, str]], length: int) -> bytes:
    lines = [f"HTTP/1.1 {status} {http.client.responses.get(status, 'Status')}"]
    lines += [f"{name}: {value}" for name, value in headers]
    lines += [f"Content-Length: {length}", "", ""]
    return "\r\n".join(lines).encode("latin-1")


class _Handler(http.server.BaseHTTPRequestHandler):
    protocol_version = "HTTP/1.1"
    server: _Server

    @property
    def proxy(self) -> FaultProxy:
        return self.server.proxy

    def setup(self) -> None:
        super().setup()
        with self.proxy._changed:
            self.proxy._sockets.add(self.connection)

    def finish(self) -> None:
        with self.proxy._changed:
            self.proxy._sockets.discard(self.connection)
        super().finish()

    def do_request(self) -> None:
        raw = self.rfile.read(int(self.headers.get("Content-Length") or 0))
        body = None
        with contextlib.suppress(ValueError):
            body = json.loads(raw) if raw else None
        seen = Seen(self.command, self.path, self.headers.get("X-Amz-Target", ""), body, raw,
                    list(self.headers.items()))
        self.proxy._next(seen)(self, seen)

    do_GET = do_POST = do_PUT = do_DELETE = do_HEAD = do_request

    def reply(self, status: int, headers: List[Tuple[str, str]], body: bytes) -> None:
        kept = [(name, value) for name, value in headers if name.lower() not in HOP_BY_HOP]
        self.wfile.write(_head(status, kept, len(body)) + body)

    def hang_up(self) -> None:
        self.close_connection = True
        self.connection.close()

    def log_message(self, format: str, *args: Any) -> None:
        """Quiet: the test reads :attr:`FaultProxy.requests` instead."""


class _Server(http.server.ThreadingHTTPServer):
    proxy: FaultProxy


class FaultProxy:
    """The proxy; a context manager that starts it and closes it (see module doc)."""

    def __init__(self, upstream: str) -> None:
        self.upstream = upstream.rstrip("/")
        self.requests: List[Seen] = []
        self.closing = threading.Event()
        self._queue: List[Behaviour] = []
        self._then: Behaviour = forward()
        self._changed = threading.Condition()
        self._sockets: Set[socket.socket] = set()
        self._server = _Server(("127.0.0.1", 0), _Handler)
        self._server.proxy = self
        self.url = f"http://127.0.0.1:{self._server.server_address[1]}"
        self._thread = threading.Thread(
            target=self._server.serve_forever, args=(0.05,), name="faultproxy", daemon=True
        )

    def script(self, *behaviours: Behaviour) -> None:
        """Queue behaviours for the next requests, one each, in order."""
        with self._changed:
            self._queue.extend(behaviours)

    def always(self, behaviour: Behaviour) -> None:
        """What every request gets once the queue is empty (:func:`forward` at first)."""
        with self._changed:
            self._then = behaviour

    def calls(self, operation: str = "PutRecordBatch") -> List[Seen]:
        """The requests whose target names ``operation``."""
        with self._changed:
            return [seen for seen in self.requests if seen.target.endswith(f".{operation}")]

    def wait(self, count: int, timeout: float = 10.0) -> bool:
        """Wait until ``count`` requests have arrived; False at the timeout."""
        with self._changed:
            return self._changed.wait_for(lambda: len(self.requests) >= count, timeout)

    def upstream_call(self, seen: Seen) -> Tuple[int, List[Tuple[str, str]], bytes]:
        """Send ``seen`` to the upstream; its status, headers and body."""
        connection = http.client.HTTPConnection(urlsplit(self.upstream).netloc, timeout=30)
        try:
            headers = {k: v for k, v in seen.headers if k.lower() not in HOP_BY_HOP}
            connection.request(seen.method, seen.path, seen.raw, headers)
            response = connection.getresponse()
            return response.status, response.getheaders(), response.read()
        finally:
            connection.close()

    def _next(self, seen: Seen) -> Behaviour:
        with self._changed:
            self.requests.append(seen)
            self._changed.notify_all()
            return self._queue.pop(0) if self._queue else self._then

    def __enter__(self) -> FaultProxy:
        self._thread.start()
        return self

    def __exit__(self, *exc: object) -> None:
        self.close()

    def close(self) -> None:
        """Stop serving, end every open connection (and trickle) and join the threads."""
        self.closing.set()
        if self._thread.is_alive():
            self._server.shutdown()
        with self._changed:
            sockets = list(self._sockets)
        for sock in sockets:  # idle keep-alive connections would block server_close()
            with contextlib.suppress(OSError):
                sock.shutdown(socket.SHUT_RDWR)
        self._server.server_close()
        self._thread.join(10)

"""An HTTP/1.1 server in front of the moto server that misbehaves on request.

It listens on 127.0.0.1 (a real socket, in a thread) and forwards each request
to the upstream unchanged, unless a behaviour was scripted for it::

    with FaultProxy(upstream=moto_url) as proxy:
        proxy.script(answer(200, b"{}"), reset())   # the next two requests
        proxy.always(truncated())                   # every one after those
        client.configure(endpoint_url=proxy.url, ...)

An outage in time, for processes that run through it::

    proxy.timeline([(0.0, refuse()), (4.0, throttled()), (6.0, forward())])

from then on every request gets ``refuse()`` (nothing listens on the port:
connections are refused), from 4 s ``throttled()``, from 6 s it is forwarded.
:attr:`FaultProxy.switches` says when each step took effect.

Only :func:`forward`, :func:`partial`, :func:`throttle_entries` and
:func:`slow` reach the upstream: the other behaviours store nothing, so a retry
cannot duplicate (:func:`slow` can, when the client gives up before it
forwards). Every request is kept in :attr:`FaultProxy.requests`, in arrival
order.
"""

from __future__ import annotations

import base64
import contextlib
import errno
import http.client
import http.server
import json
import random
import socket
import struct
import threading
import time
from typing import (
    Any,
    Callable,
    Iterable,
    Iterator,
    List,
    NamedTuple,
    Optional,
    Sequence,
    Set,
    Tuple,
)
from urllib.parse import urlsplit

__all__ = [
    "FaultProxy", "Seen", "answer", "empty", "failure", "forward", "mixed", "partial", "refuse",
    "reset", "slow", "throttle_entries", "throttled", "trickle", "truncated",
]

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
        _fail_entries(handler, seen, failed)
    return run


def throttle_entries(fraction: float, seed: Optional[int] = None) -> Behaviour:
    """:func:`partial` with each entry of each PutRecordBatch failed with probability
    ``fraction`` (other calls are forwarded)."""
    rng = random.Random(seed)
    lock = threading.Lock()

    def run(handler: _Handler, seen: Seen) -> None:
        entries = seen.body.get("Records") if isinstance(seen.body, dict) else None
        if not entries:
            return forward()(handler, seen)
        with lock:
            failed = {index for index in range(len(entries)) if rng.random() < fraction}
        _fail_entries(handler, seen, failed)
    return run


def _fail_entries(handler: _Handler, seen: Seen, failed: Set[int]) -> None:
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


def failure(status: int = 500, code: str = "", message: str = "injected") -> Behaviour:
    """An error answer as AWS's JSON protocol writes one: ``status`` with
    ``{"__type": code, "message": message}`` (``code`` by default: ``InternalFailure`` for
    a 500, ``ServiceUnavailableException`` for a 503, else ``InternalFailure``)."""
    code = code or {503: "ServiceUnavailableException"}.get(status, "InternalFailure")
    return answer(status, json.dumps({"__type": code, "message": message}).encode())


def throttled(message: str = "Rate exceeded (injected)") -> Behaviour:
    """The call as a whole refused as throttled: HTTP 400, ``ThrottlingException``."""
    return failure(400, "ThrottlingException", message)


def empty(body: bytes = b"{}") -> Behaviour:
    """A 200 with no result per record (``{}``, or ``{"FailedPutCount": 0}``): it proves
    nothing was delivered, and nothing was."""
    return answer(200, body)


def slow(seconds: float, then: Optional[Behaviour] = None) -> Behaviour:
    """Wait ``seconds`` (less if the proxy closes), then ``then`` (:func:`forward`)."""
    after = then or forward()

    def run(handler: _Handler, seen: Seen) -> None:
        if not handler.proxy.closing.wait(seconds):
            after(handler, seen)
    return run


def mixed(*weighted: Tuple[float, Behaviour], seed: Optional[int] = None) -> Behaviour:
    """Each request gets one of the behaviours, drawn by weight: ``mixed((3, throttled()),
    (1, forward()))`` throttles about three calls in four."""
    rng = random.Random(seed)
    lock = threading.Lock()
    weights = [weight for weight, _ in weighted]
    choices = [behaviour for _, behaviour in weighted]

    def run(handler: _Handler, seen: Seen) -> None:
        with lock:
            behaviour = rng.choices(choices, weights)[0]
        behaviour(handler, seen)
    return run


def refuse() -> Behaviour:
    """Nothing listens on the proxy's port: every connection is refused (and those open are
    closed) until another behaviour is set with :meth:`FaultProxy.always` or a timeline.
    It answers no request, so it cannot be :meth:`FaultProxy.script`-ed."""
    def run(handler: _Handler, seen: Seen) -> None:  # a request let in as the port closed
        reset()(handler, seen)
    run.refuses = True  # type: ignore[attr-defined]
    return run


def _refuses(behaviour: Behaviour) -> bool:
    return bool(getattr(behaviour, "refuses", False))


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
    request_queue_size = 64  # a pool of clients connecting at once after an outage

    def handle_error(self, request: Any, client_address: Any) -> None:
        """Quiet about connections the proxy closed under a handler (refuse, close)."""
        if not self.proxy.closing.is_set() and not self.proxy.refusing:
            super().handle_error(request, client_address)


class FaultProxy:
    """The proxy; a context manager that starts it and closes it (see module doc)."""

    def __init__(self, upstream: str) -> None:
        self.upstream = upstream.rstrip("/")
        self.requests: List[Seen] = []
        #: ``(time.monotonic(), behaviour)`` for each :meth:`always`, timelines' steps included.
        self.switches: List[Tuple[float, Behaviour]] = []
        self.closing = threading.Event()
        self._queue: List[Behaviour] = []
        self._then: Behaviour = forward()
        self._changed = threading.Condition()
        self._sockets: Set[socket.socket] = set()
        self._listening = threading.Lock()  # held while the server starts or stops
        self._timelines: List[threading.Thread] = []
        self._generation = 0
        self._server: Optional[_Server] = self._bind(0)
        self.port = self._server.server_address[1]
        self.url = f"http://127.0.0.1:{self.port}"
        self._thread: Optional[threading.Thread] = None
        self._started = False

    @property
    def refusing(self) -> bool:
        """Whether the port is closed (:func:`refuse`)."""
        return _refuses(self._then)

    def script(self, *behaviours: Behaviour) -> None:
        """Queue behaviours for the next requests, one each, in order."""
        if any(map(_refuses, behaviours)):
            raise ValueError("refuse() answers no request: use always() or timeline()")
        with self._changed:
            self._queue.extend(behaviours)

    def always(self, behaviour: Behaviour) -> None:
        """What every request gets once the queue is empty (:func:`forward` at first);
        :func:`refuse` closes the port, any other behaviour opens it again."""
        with self._listening:
            with self._changed:
                self._then = behaviour
                self.switches.append((time.monotonic(), behaviour))
            if self.closing.is_set() or not self._started:
                return  # not started, or closed: nothing to open or shut
            if _refuses(behaviour):
                self._stop_serving()
            elif self._server is None:
                self._server = self._bind(self.port)
                self._serve()

    def timeline(self, steps: Sequence[Tuple[float, Behaviour]]) -> threading.Event:
        """Set each behaviour with :meth:`always` at its offset in seconds from now; steps at
        0 (or before) take effect before this returns. Returns an event set once the last
        step took effect. A new timeline cancels the steps of the previous one not yet taken."""
        ordered = sorted(steps, key=lambda step: step[0])
        with self._changed:
            self._generation += 1
            generation = self._generation
        started = time.monotonic()
        finished = threading.Event()
        while ordered and ordered[0][0] <= 0:
            self.always(ordered.pop(0)[1])

        def run() -> None:
            for offset, behaviour in ordered:
                if self.closing.wait(max(0.0, started + offset - time.monotonic())):
                    return
                with self._changed:
                    if generation != self._generation:
                        return
                self.always(behaviour)
            finished.set()

        if ordered:
            thread = threading.Thread(target=run, name="faultproxy-timeline", daemon=True)
            self._timelines.append(thread)
            thread.start()
        else:
            finished.set()
        return finished

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

    def _bind(self, port: int) -> _Server:
        """A server on ``port`` (0: any); the port of a closed one may still be taken for a
        moment by a connection of ours, so binding it again is retried for a few seconds."""
        deadline = time.monotonic() + 5
        while True:
            try:
                server = _Server(("127.0.0.1", port), _Handler)
            except OSError as exc:
                if exc.errno != errno.EADDRINUSE or time.monotonic() > deadline:
                    raise
                time.sleep(0.05)
                continue
            server.proxy = self
            return server

    def _serve(self) -> None:
        assert self._server is not None
        self._thread = threading.Thread(
            target=self._server.serve_forever, args=(0.05,), name="faultproxy", daemon=True
        )
        self._thread.start()

    def _stop_serving(self) -> None:
        """Stop accepting, close the listening socket and every open connection."""
        server, thread, self._server = self._server, self._thread, None
        if server is None:
            return
        if thread is not None and thread.is_alive():
            server.shutdown()
        with self._changed:
            sockets = list(self._sockets)
        for sock in sockets:  # idle keep-alive connections would block server_close()
            with contextlib.suppress(OSError):
                sock.shutdown(socket.SHUT_RDWR)
        server.server_close()
        if thread is not None:
            thread.join(10)

    def __enter__(self) -> FaultProxy:
        with self._listening:
            self._started = True
            if self.refusing:
                self._stop_serving()
            else:
                self._serve()
        return self

    def __exit__(self, *exc: object) -> None:
        self.close()

    def close(self) -> None:
        """Stop serving, end every open connection (and trickle) and join the threads."""
        self.closing.set()
        with self._listening:
            self._stop_serving()
        for thread in self._timelines:
            thread.join(10)

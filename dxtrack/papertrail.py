"""A best-effort copy of every record to Papertrail, as syslog lines over UDP.

``configure(papertrail_hostport="logsN.papertrailapp.com:XXXXX")`` adds one
:class:`PapertrailForwarder` to the pipeline. The caller's path only appends
the record's serialized body (the same bytes object the buffer holds) to a
bounded deque; a daemon thread, ``dxtrack-papertrail``, parses it and emits
syslog messages through a ``SysLogHandler`` on a private logger. That logger
is built directly, not through ``logging.getLogger``: it is not in logging's
hierarchy, so the root logger, its level and every logger a program owns stay
exactly as they were.

What is sent, one datagram per message (RFC 3164, facility user)::

    <14>Nov 27 06:00:01 w3 scraper[42]: metric products=120.0 stage=prod run_id=r1 metadata={"a":1}
    <11>Nov 27 06:00:02 w3 scraper[42]: error KeyError: 'sku' stage=prod run_id=r1 metadata={"a":1}
    <11>Nov 27 06:00:02 w3 scraper[42]: Traceback (most recent call last):
    <11>Nov 27 06:00:02 w3 scraper[42]:   File "scrape.py", line 12, in <module>
    ...

The header is the local time (as RFC 3164 asks), the host name and a tag made
of the context (:func:`syslog_tag`) with the process id; then ``metric`` or
``error``, the stage and run id, and the metadata as compact JSON.

Metrics are severity info, errors severity err: the error's summary first,
then one message per line of its traceback, which is how Papertrail expects
multi-line text. Papertrail accepts UDP datagrams of at most 1024 bytes (the
RFC 3164 limit), so every datagram is cut to fit (the cut is marked), and an
error sends at most :data:`MAX_TRACEBACK_LINES` traceback lines (its head and
its tail, the middle marked).

Best effort, like UDP itself: when the queue is full, copies are dropped;
when Papertrail's name does not resolve or a send fails, the copy counts as
failed and the forwarder waits a little (1 s, doubling up to a minute)
before trying again. All of it is counted in ``stats()`` and logged at most
once a minute, never raised, and the Firehose records are not affected.
"""

from __future__ import annotations

import collections
import logging
import logging.handlers
import os
import re
import socket
import sys
import threading
import time
import weakref
from typing import Any, Callable, Deque, Dict, List, Optional, Tuple, Union

import orjson

from ._logging import RateLimitedLog
from .processes import block_signals_in_this_thread
from .records import ERROR

__all__ = ["MAX_DATAGRAM_BYTES", "MAX_TRACEBACK_LINES", "PapertrailForwarder"]

#: Largest datagram sent: Papertrail's (and RFC 3164's) limit for syslog over UDP.
MAX_DATAGRAM_BYTES = 1024
#: Traceback lines sent per error at most: the first and the last ones, the middle marked.
MAX_TRACEBACK_LINES = 100
_TRACEBACK_HEAD = 20

_RETRY_FIRST = 1.0      # seconds without sending after a failure; doubles up to _RETRY_MAX
_RETRY_MAX = 60.0
_RESOLVE_EVERY = 600.0  # seconds before the host name is resolved again
_IDLE_WAKE = 1.0        # an idle thread looks at its queue this often even if nobody woke it

_MAX_TEXT_BYTES = MAX_DATAGRAM_BYTES - len("<191>")  # after the longest priority prefix
_MAX_TAG_CHARS = 32     # RFC 3164
_MONTHS = ("Jan", "Feb", "Mar", "Apr", "May", "Jun", "Jul", "Aug", "Sep", "Oct", "Nov", "Dec")
_UNSAFE_IN_TAG = re.compile(r"[^A-Za-z0-9_.-]+")
_UNSAFE_IN_HOSTNAME = re.compile(r"[^\x21-\x7e]+")  # printable ASCII, no space

_Item = Union[Tuple[str, bytes], threading.Event]  # a record, or a flush's marker

_live: weakref.WeakSet[PapertrailForwarder] = weakref.WeakSet()


class PapertrailForwarder:
    """Sends a syslog copy of each record it is given to one Papertrail destination.

    :param hostport: ``"host:port"``, already validated by the config.
    :param context: the client's context; it becomes the syslog tag.
    :param log: where problems are reported, rate-limited.
    :param max_queued: records waiting at most; more are dropped and counted.
    :param timer: monotonic seconds, for the retry delays (tests inject one).
    """

    def __init__(
        self,
        hostport: str,
        context: str,
        log: RateLimitedLog,
        max_queued: int = 10_000,
        *,
        timer: Callable[[], float] = time.monotonic,
    ) -> None:
        host, _, port = hostport.rpartition(":")
        self.hostport = hostport
        self._host = host[1:-1] if host.startswith("[") and host.endswith("]") else host
        self._port = int(port)
        self._tag = syslog_tag(context)
        self._log = log
        self._limit = max_queued
        self._timer = timer
        self._closed = False
        self._reset()
        _live.add(self)

    def _reset(self) -> None:
        """Fresh queue, locks, thread state, handler and counters (at creation, after fork)."""
        self._queue: Deque[_Item] = collections.deque()
        self._max_queued = 0 if self._closed else self._limit
        self._lock = threading.Lock()          # starting the thread, closing
        self._inline_lock = threading.Lock()   # sending from a caller when no thread can run
        self._wakeup = threading.Event()
        self._idle = True  # the thread is waiting (or not started): put() must wake it
        self._thread: Optional[threading.Thread] = None
        self._stopping = False   # the thread returns once the queue is empty
        self._abandoned = False  # the thread returns after the record at hand
        self._logger = _private_logger()
        self._handler: Optional[_SyslogHandler] = None
        self._retry_at = 0.0     # no handler is made before this time (after a failure)
        self._retry_delay = _RETRY_FIRST
        self._resolve_at = 0.0   # the handler is made again (the name resolved) after this time
        self._count_lock = threading.Lock()  # callers count their drops concurrently
        self._sent = 0
        self._failed = 0
        self._dropped = 0

    # -- the caller's path -------------------------------------------------------
    def put(self, stream: str, body: bytes) -> None:
        """Queue one open record body (see :mod:`dxtrack.records`) of ``stream``."""
        queue = self._queue
        if len(queue) < self._max_queued:
            queue.append((stream, body))
            if self._idle:
                self._wake()
        else:
            self._refuse()

    def _refuse(self) -> None:
        with self._count_lock:
            self._dropped += 1
        if not self._closed:
            self._log.warning(
                "papertrail-full",
                "dxtrack's Papertrail queue is full (%d records): copies are being dropped "
                "(see stats()['papertrail_dropped']); Firehose delivery is not affected",
                self._limit,
            )

    def _wake(self) -> None:
        if self._thread is None:
            self._start()
        self._wakeup.set()

    def _start(self) -> None:
        with self._lock:
            if self._thread is not None or self._closed:
                return
            thread = threading.Thread(target=self._run, name="dxtrack-papertrail", daemon=True)
            self._thread = thread
            try:
                thread.start()
            except RuntimeError:  # interpreter shutdown: flush() and close() send inline
                self._thread = None

    # -- checkpoints and lifecycle -------------------------------------------------
    def flush(self, timeout: Optional[float]) -> bool:
        """Wait until every record queued before the call is sent, failed or dropped.

        False when ``timeout`` seconds passed first. Never waits on itself.
        """
        if self._closed:
            return True
        if threading.current_thread() is self._thread:
            return False
        marker = threading.Event()
        self._queue.append(marker)
        self._wake()
        if self._thread is None:  # no thread could be started
            self._send_inline(timeout)
            return marker.is_set()
        return marker.wait(timeout)

    def close(self, timeout: float) -> None:
        """Send what is queued within ``timeout`` seconds, then stop; idempotent.

        What is still queued at the bound counts as dropped.
        """
        with self._lock:
            if self._closed:
                return
            self._closed = True
            self._max_queued = 0  # put() from now on only counts what it refuses
            thread = self._thread
        self._stopping = True
        self._wakeup.set()
        if thread is not None and thread is not threading.current_thread():
            thread.join(max(0.0, timeout))
            if thread.is_alive():
                self._abandoned = True  # stuck (a slow DNS answer): it closes its handler
        elif thread is None:
            self._send_inline(timeout)
        if thread is None or not thread.is_alive():
            self._close_handler()
        self._discard_queue()

    def stats(self) -> Dict[str, int]:
        return {
            "papertrail_sent": self._sent,
            "papertrail_dropped": self._dropped,
            "papertrail_failed": self._failed,
        }

    def after_fork_in_child(self) -> None:
        """The parent's queue and thread are the parent's: start empty (no logging here)."""
        handler = self._handler
        sock = getattr(handler, "socket", None)
        if sock is not None:
            sock.close()  # the child's copy of the descriptor; no lock taken
        self._reset()

    def __repr__(self) -> str:
        return f"PapertrailForwarder({self.hostport!r}, tag={self._tag!r})"

    # -- the sending side --------------------------------------------------------------
    def _run(self) -> None:
        try:
            block_signals_in_this_thread()
            self._idle = False
            self._drain(deadline=None, wait=True)
        finally:
            self._idle = True
            self._thread = None
            if self._closed:
                self._close_handler()

    def _send_inline(self, timeout: Optional[float]) -> None:
        """Last resort when no thread can be started (interpreter shutdown)."""
        deadline = None if timeout is None else time.monotonic() + timeout
        if self._inline_lock.acquire(timeout=-1 if timeout is None else max(0.0, timeout)):
            try:
                self._drain(deadline, wait=False)
            finally:
                self._inline_lock.release()

    def _drain(self, deadline: Optional[float], wait: bool) -> None:
        """Send queued records in order; wait for more when ``wait``, else return when empty."""
        queue = self._queue
        while not self._abandoned:
            try:
                item = queue.popleft()
            except IndexError:
                if not wait or self._stopping:
                    return
                # Say "idle" before looking once more: a put() after this look sees it.
                self._wakeup.clear()
                self._idle = True
                if not queue and not self._stopping:
                    self._wakeup.wait(_IDLE_WAKE)
                self._idle = False
                continue
            if isinstance(item, threading.Event):
                item.set()
            else:
                self._forward(*item)
            if deadline is not None and time.monotonic() >= deadline:
                return

    def _forward(self, stream: str, body: bytes) -> None:
        try:
            messages = syslog_messages(stream, orjson.loads(body + b"}"))
        except Exception as exc:  # pragma: no cover - bodies come from RecordBuilder
            self._failed += 1
            self._log.error("papertrail-format", "dxtrack could not format a record: %r", exc)
            return
        handler = self._current_handler()
        if handler is None:
            self._failed += 1  # backing off after a failure
            return
        level = logging.ERROR if stream == ERROR else logging.INFO
        logger = self._logger
        failures = handler.failures
        for message in messages:
            # handle(), not log(): logging.disable() is for the program's logs, not these.
            logger.handle(logger.makeRecord(logger.name, level, __file__, 0, message, (), None))
            if handler.failures != failures:
                break
        if handler.failures == failures:
            self._sent += 1
            self._retry_delay = _RETRY_FIRST
            return
        self._failed += 1
        self._log.warning(
            "papertrail-send", "dxtrack could not send to Papertrail at %s: %r; retrying in %g s",
            self.hostport, handler.last_error, self._retry_delay,
        )
        self._close_handler()  # made again, the name resolved again, after the delay
        self._back_off()

    def _current_handler(self) -> Optional[_SyslogHandler]:
        handler = self._handler
        now = self._timer()
        if handler is not None and now < self._resolve_at:
            return handler
        if handler is None and now < self._retry_at:
            return None
        try:
            fresh = _SyslogHandler(_resolve(self._host, self._port), self._tag)
        except Exception as exc:  # OSError (DNS, sockets), UnicodeError (an odd host name)
            if handler is not None:  # keep the address that worked; try again later
                self._resolve_at = now + _RETRY_MAX
                return handler
            self._log.warning(
                "papertrail-connect",
                "dxtrack cannot reach Papertrail at %s: %r; copies of records are not sent, "
                "retrying in %g s", self.hostport, exc, self._retry_delay,
            )
            self._back_off()
            return None
        self._close_handler()
        self._handler = fresh
        self._logger.addHandler(fresh)
        self._resolve_at = now + _RESOLVE_EVERY
        return fresh

    def _back_off(self) -> None:
        self._retry_at = self._timer() + self._retry_delay
        self._retry_delay = min(self._retry_delay * 2.0, _RETRY_MAX)

    def _close_handler(self) -> None:
        handler, self._handler = self._handler, None
        if handler is not None:
            self._logger.removeHandler(handler)
            handler.close()

    def _discard_queue(self) -> None:
        queue = self._queue
        while True:
            try:
                item = queue.popleft()
            except IndexError:
                return
            if isinstance(item, threading.Event):
                item.set()  # its flush is over
            else:
                with self._count_lock:
                    self._dropped += 1


class _SyslogHandler(logging.handlers.SysLogHandler):
    """UDP syslog to a resolved address; a failed send is counted, not printed."""

    append_nul = False  # RFC 3164 has no NUL terminator

    def __init__(self, address: Tuple[str, int], tag: str) -> None:
        self.failures = 0
        self.last_error: Optional[BaseException] = None
        super().__init__(address, facility=self.LOG_USER, socktype=socket.SOCK_DGRAM)
        self.setFormatter(_SyslogFormatter(_hostname(), tag))

    def handleError(self, record: logging.LogRecord) -> None:  # noqa: N802 (logging's name)
        self.failures += 1
        self.last_error = sys.exc_info()[1]


class _SyslogFormatter(logging.Formatter):
    """``Mmm dd hh:mm:ss host tag[pid]: message``, at most one datagram long."""

    def __init__(self, hostname: str, tag: str) -> None:
        super().__init__()
        self._host_and_tag = f"{hostname} {tag}"
        self._second = -1  # the header is the same for every record of one second
        self._header = ""

    def format(self, record: logging.LogRecord) -> str:
        second = int(record.created)
        if second != self._second:
            t = time.localtime(second)
            self._header = (
                f"{_MONTHS[t.tm_mon - 1]} {t.tm_mday:2d} {t.tm_hour:02d}:{t.tm_min:02d}:"
                f"{t.tm_sec:02d} {self._host_and_tag}[{os.getpid()}]: "
            )
            self._second = second
        return fit(self._header + record.getMessage(), _MAX_TEXT_BYTES)


def syslog_messages(stream: str, record: Dict[str, Any]) -> List[str]:
    """The syslog message texts (without header) for one parsed record."""
    labels = f"stage={record.get('stage')} run_id={record.get('run_id')}"
    metadata = record.get("metadata")
    if metadata:
        labels += " metadata=" + orjson.dumps(metadata).decode()
    if stream != ERROR:
        return [_one_line(f"metric {record.get('metric_name')}={record.get('value')!r} {labels}")]
    exception = record.get("exception") or {}
    summary = f"error {exception.get('type')}: {exception.get('value')} {labels}"
    text = str(exception.get("traceback", ""))
    if "Traceback (most recent call last):" not in text:
        return [_one_line(summary)]  # no frames (errors() of unraised exceptions): nothing to add
    lines = [line for line in text.splitlines() if line.strip()]
    if len(lines) > MAX_TRACEBACK_LINES:
        tail = MAX_TRACEBACK_LINES - _TRACEBACK_HEAD
        cut = len(lines) - MAX_TRACEBACK_LINES
        lines = [
            *lines[:_TRACEBACK_HEAD],
            f"[... {cut:,} traceback lines cut by dxtrack ...]",
            *lines[-tail:],
        ]
    return [_one_line(summary), *lines]


def syslog_tag(context: str) -> str:
    """The context as an RFC 3164 tag: safe characters only, at most 32 of them."""
    return _UNSAFE_IN_TAG.sub("-", context).strip("-")[:_MAX_TAG_CHARS].strip("-") or "dxtrack"


def fit(text: str, limit: int) -> str:
    """``text``, cut at the end (and marked) so that its UTF-8 encoding is at most ``limit``."""
    if len(text) <= limit // 4:  # at most 4 bytes a character: no need to encode
        return text
    encoded = text.encode("utf-8", "backslashreplace")
    if len(encoded) <= limit:
        return text
    mark = f" [... cut by dxtrack: {len(encoded):,} bytes in all]"
    keep = max(0, limit - len(mark))
    return encoded[:keep].decode("utf-8", "ignore") + mark


def _one_line(text: str) -> str:
    if "\n" in text or "\r" in text:
        return text.replace("\r", "\\r").replace("\n", "\\n")
    return text


def _resolve(host: str, port: int) -> Tuple[str, int]:
    """The address to send to, resolved once: ``sendto`` with a name would ask DNS every time."""
    *_, address = socket.getaddrinfo(host, port, 0, socket.SOCK_DGRAM)[0]
    return str(address[0]), int(address[1])


def _hostname() -> str:
    try:
        name = socket.gethostname()
    except OSError:  # pragma: no cover
        name = ""
    return _UNSAFE_IN_HOSTNAME.sub("-", name) or "localhost"


def _private_logger() -> logging.Logger:
    """A logger outside logging's hierarchy: nothing reaches it, it reaches nothing else."""
    private = logging.Logger("dxtrack.papertrail", logging.INFO)
    private.propagate = False
    return private


def _after_fork_in_child() -> None:
    # No logging here: the logging lock may have been held at fork time.
    for forwarder in list(_live):
        forwarder.after_fork_in_child()


if hasattr(os, "register_at_fork"):
    os.register_at_fork(after_in_child=_after_fork_in_child)

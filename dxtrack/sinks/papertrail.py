"""A best-effort sink: each record as RFC 3164 syslog datagrams to Papertrail, over UDP.

An error is its summary, then one message per traceback line. Each copy is sent once; after
a failure, copies fail at once for a while. The pipeline feeds it when ``papertrail_hostport``
is set. The format and its limits: docs/errors-and-integrations.md.
"""

from __future__ import annotations

import os
import re
import socket
import time
from typing import Any, Callable, Dict, List, Optional, Sequence, Tuple

import orjson

from .._logging import RateLimitedLog
from ..records import ERROR
from .base import DELIVERED, SendResult, Sink

__all__ = ["MAX_DATAGRAM_BYTES", "MAX_TRACEBACK_LINES", "PapertrailSink", "fit", "syslog_tag"]

#: Largest datagram sent, cut (and marked) to fit: Papertrail's and RFC 3164's limit over UDP.
MAX_DATAGRAM_BYTES = 1024
#: Traceback lines sent per error at most: the first 20 and the last ones, the middle marked.
MAX_TRACEBACK_LINES = 100
_TRACEBACK_HEAD = 20

_RETRY_FIRST = 1.0      # seconds of failing fast after a failure; doubles up to _RETRY_MAX
_RETRY_MAX = 60.0
_RESOLVE_EVERY = 600.0  # seconds before the host name is looked up again

_MAX_TEXT_BYTES = MAX_DATAGRAM_BYTES - len("<191>")  # after the longest priority prefix
_MAX_TAG_CHARS = 32     # RFC 3164
_MONTHS = ("Jan", "Feb", "Mar", "Apr", "May", "Jun", "Jul", "Aug", "Sep", "Oct", "Nov", "Dec")
_UNSAFE_IN_TAG = re.compile(r"[^A-Za-z0-9_.-]+")
_UNSAFE_IN_HOSTNAME = re.compile(r"[^\x21-\x7e]+")  # printable ASCII, no space


class PapertrailSink(Sink):
    """Sends each line it is given as syslog datagrams to ``hostport`` (validated by the
    config; IPv6 as ``"[addr]:port"``). ``timer`` (monotonic seconds) paces the backoff and
    the next lookup; ``resolve(host, port) -> (address, port)`` is the lookup itself."""

    max_batch_lines = 1_000
    #: It logs its own failures: the worker and the pipeline do not report them as lost.
    best_effort = True

    def __init__(self, hostport: str, context: str, log: RateLimitedLog, *,
                 timer: Callable[[], float] = time.monotonic,
                 resolve: Optional[Callable[[str, int], Tuple[str, int]]] = None) -> None:
        host, _, port = hostport.rpartition(":")
        self.hostport, self._port = hostport, int(port)
        self._host = host[1:-1] if host.startswith("[") and host.endswith("]") else host
        self._host_and_tag = f"{_hostname()} {syslog_tag(context)}"
        self._log, self._timer, self._resolve = log, timer, resolve or _resolve
        self._to: Optional[Tuple[socket.socket, Tuple[str, int]]] = None
        self._resolve_at = 0.0  # the name is looked up again from this time on
        self._retry_at = 0.0    # copies fail at once until this time (after a failure)
        self._delay = _RETRY_FIRST
        self._header, self._second = "", -1  # the cached header, and its second

    def send(self, stream: str, lines: Sequence[bytes]) -> SendResult:
        """Send each line once; those that could not be sent count as failed."""
        priority = b"<11>" if stream == ERROR else b"<14>"  # user.err, user.info
        to = self._destination()
        for done, line in enumerate(lines):
            if to is None:
                return SendResult(failed=len(lines) - done, error="failing fast after a failure")
            sock, address = to
            header = self._current_header()
            try:
                for message in syslog_messages(stream, orjson.loads(line)):
                    text = fit(header + message, _MAX_TEXT_BYTES)
                    sock.sendto(priority + text.encode("utf-8", "backslashreplace"), address)
            except Exception as exc:  # OSError; anything else would be a formatting bug
                self._log.warning("papertrail-send", "dxtrack could not send to Papertrail at "
                                  "%s: %r; retrying in %g s", self.hostport, exc, self._delay)
                self._back_off()  # the rest of the batch fails fast too
                return SendResult(failed=len(lines) - done, error=repr(exc))
        self._delay = _RETRY_FIRST
        return DELIVERED

    def close(self) -> None:
        to, self._to = self._to, None
        if to is not None:
            to[0].close()

    def after_fork(self) -> None:
        """A new header (it has the process id); the parent's backoff is not the child's."""
        self._second, self._retry_at, self._delay = -1, 0.0, _RETRY_FIRST

    def _destination(self) -> Optional[Tuple[socket.socket, Tuple[str, int]]]:
        """The socket and address to send to; None while failing fast."""
        now = self._timer()
        if now < self._retry_at:
            return None
        if now >= self._resolve_at:
            try:
                address = self._resolve(self._host, self._port)
                family = socket.AF_INET6 if ":" in address[0] else socket.AF_INET
                if self._to is None or self._to[0].family != family:
                    self.close()
                    self._to = (socket.socket(family, socket.SOCK_DGRAM), address)
                self._to, self._resolve_at = (self._to[0], address), now + _RESOLVE_EVERY
            except Exception as exc:  # OSError (DNS, sockets), UnicodeError (an odd name)
                if self._to is not None:  # keep the address that worked; look again later
                    self._resolve_at = now + _RETRY_MAX
                    return self._to
                self._log.warning("papertrail-connect", "dxtrack cannot reach Papertrail at %s: "
                                  "%r; copies of records are not sent, retrying in %g s",
                                  self.hostport, exc, self._delay)
                self._back_off()
        return self._to

    def _back_off(self) -> None:
        self._retry_at = self._timer() + self._delay
        self._delay = min(self._delay * 2.0, _RETRY_MAX)

    def _current_header(self) -> str:
        """``Mmm dd hh:mm:ss host tag[pid]: ``, the same for every message of one second."""
        second = int(time.time())
        if second != self._second:
            t = time.localtime(second)
            self._header = (f"{_MONTHS[t.tm_mon - 1]} {t.tm_mday:2d} {time.strftime('%H:%M:%S', t)}"
                            f" {self._host_and_tag}[{os.getpid()}]: ")
            self._second = second
        return self._header


def syslog_messages(stream: str, record: Dict[str, Any]) -> List[str]:
    """The syslog message texts (without header) for one parsed record."""
    labels = f"stage={record.get('stage')} run_id={record.get('run_id')}"
    metadata = record.get("metadata")
    if metadata:
        labels += " metadata=" + orjson.dumps(metadata).decode()
    if stream != ERROR:
        return [_one_line(f"metric {record.get('metric_name')}={record.get('value')!r} {labels}")]
    exception = record.get("exception") or {}
    summary = _one_line(f"error {exception.get('type')}: {exception.get('value')} {labels}")
    text = str(exception.get("traceback", ""))
    if "Traceback (most recent call last):" not in text:
        return [summary]  # no frames (errors() of unraised exceptions): nothing to add
    lines = [line for line in text.splitlines() if line.strip()]
    if len(lines) > MAX_TRACEBACK_LINES:
        cut = f"[... {len(lines) - MAX_TRACEBACK_LINES:,} traceback lines cut by dxtrack ...]"
        lines = [*lines[:_TRACEBACK_HEAD], cut, *lines[_TRACEBACK_HEAD - MAX_TRACEBACK_LINES:]]
    return [summary, *lines]


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
    return encoded[:max(0, limit - len(mark))].decode("utf-8", "ignore") + mark


def _one_line(text: str) -> str:
    return text.replace("\r", "\\r").replace("\n", "\\n") if "\n" in text or "\r" in text else text


def _resolve(host: str, port: int) -> Tuple[str, int]:
    """The address to send to, looked up once: ``sendto`` with a name would ask DNS each time."""
    *_, address = socket.getaddrinfo(host, port, 0, socket.SOCK_DGRAM)[0]
    return str(address[0]), int(address[1])


def _hostname() -> str:
    return _UNSAFE_IN_HOSTNAME.sub("-", socket.gethostname()) or "localhost"

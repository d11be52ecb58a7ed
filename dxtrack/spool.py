"""The disk spool: records that could not be delivered in time, kept on disk until a client
(this one, a later one, another process) or ``dxtrack replay`` delivers them.

A spool is a directory per stage (``<spool_dir>/<stage>``, mode 0700) of *segments*: files of
finished JSON lines of one stream (mode 0600), named so that sorting them puts the oldest
first. A segment is written to a ``.tmp`` name, fsynced, then renamed: a ``.jsonl`` segment
is complete. A writer that died leaves its ``.tmp``; once no process holds it, it is taken in,
and a line it did not finish (or any line that is not JSON) is counted and dropped, never sent.

Whoever replays a segment *claims* it with an exclusive ``flock`` on it, held until the
segment is deleted (all of it delivered) or given back. The kernel releases the lock of a
process that dies, so its claim passes to the next one; two processes never hold one segment.
"""

from __future__ import annotations

import contextlib
import errno
import fcntl
import itertools
import os
import queue
import stat
import threading
import time
from dataclasses import dataclass
from typing import Callable, Dict, Iterator, List, NamedTuple, Optional, Sequence, Tuple, Union

import orjson

from .records import ERROR, METRIC, finalize
from .signals import block_signals_in_this_thread

__all__ = ["Claim", "Spiller", "Spool", "Written", "replay_all"]

#: A ``.tmp`` segment this old, that nobody holds, was left by a writer that died.
ABANDONED_AFTER = 30.0
_STREAMS = (METRIC, ERROR)
_SUFFIX, _PARTIAL, _REWRITE = ".jsonl", ".tmp", ".replacing"
_numbers = itertools.count()


@dataclass
class Claim:
    """A segment this process holds (its ``fd`` carries the lock), and its lines."""

    path: str
    fd: int
    stream: str
    lines: List[bytes]


class Written(NamedTuple):
    """A segment :meth:`Spool.write` made ("" if none), and how many lines it holds."""

    path: str
    lines: int


def _read_all(fd: int) -> bytes:
    chunks, offset = [], 0
    while chunk := os.pread(fd, 1 << 20, offset):
        chunks.append(chunk)
        offset += len(chunk)
    return b"".join(chunks)


def _newest_within(lines: Sequence[bytes], max_bytes: int) -> List[bytes]:
    """The newest of ``lines`` that fit in ``max_bytes``, in order."""
    kept: List[bytes] = []
    size = 0
    for line in reversed(lines):
        size += len(line)
        if size > max_bytes:
            break
        kept.append(line)
    kept.reverse()
    return kept


def _stream_of(name: str) -> Optional[str]:
    stream = name.split("-", 1)[0]
    return stream if stream in _STREAMS else None


class Spool:
    """One stage's spool directory. Thread-safe; the counts are this process's."""

    def __init__(self, directory: Union[str, os.PathLike[str]], stage: str, max_bytes: int) -> None:
        self.path = os.path.join(os.path.abspath(os.fspath(directory)), stage)
        self.max_bytes = max_bytes
        self._lock = threading.Lock()
        self._held: Dict[str, int] = {}  # segments this process holds: path -> fd
        self._claims: Dict[int, str] = {}  # descriptors of the claims open now: fd -> path
        self._mine: Dict[str, int] = {}  # segments this object wrote: path -> lines
        #: Records in held segments: counted as spooled, still pending for the buffer.
        self.held_lines = 0
        self.counts = {"spooled": 0, "replayed": 0, "spool_full": 0, "spool_torn": 0,
                       "spool_failed": 0}

    # -- writing ---------------------------------------------------------------------
    def write(self, stream: str, lines: Sequence[bytes], *, hold: bool = False) -> Written:
        """Put ``lines`` (finished, newline-terminated) in a new segment, on disk (fsynced)
        before this returns; with ``hold``, this process keeps it claimed (see
        :meth:`settle_held`). Lines more than ``max_bytes`` in all lose their oldest, counted
        as ``spool_full``; raises ``OSError`` when the disk refuses."""
        data = b"".join(lines)
        if len(data) > self.max_bytes:
            kept = _newest_within(lines, self.max_bytes)
            with self._lock:
                self.counts["spool_full"] += len(lines) - len(kept)
            if not kept:
                return Written("", 0)
            lines, data = kept, b"".join(kept)
        self._make_room(len(data))
        self.make_directory()
        name = f"{stream}-{time.time_ns():020d}-{os.getpid()}-{next(_numbers)}"
        final = os.path.join(self.path, name + _SUFFIX)
        partial = os.path.join(self.path, name + _PARTIAL)
        fd = os.open(partial, os.O_WRONLY | os.O_CREAT | os.O_EXCL | os.O_CLOEXEC, 0o600)
        try:
            if hold:  # locked before it has its final name: nobody claims it in between
                fcntl.flock(fd, fcntl.LOCK_EX)
            view = memoryview(data)
            while view:
                view = view[os.write(fd, view):]
            os.fsync(fd)
            os.rename(partial, final)
            self._sync_directory()
        except BaseException:
            os.close(fd)
            with contextlib.suppress(OSError):
                os.unlink(partial)
            raise
        with self._lock:
            self.counts["spooled"] += len(lines)
            self._mine[final] = len(lines)
            if hold:
                self._held[final] = fd
                self.held_lines += len(lines)
                return Written(final, len(lines))
        os.close(fd)
        return Written(final, len(lines))

    def settle_held(self, path: str, undelivered: Sequence[bytes]) -> None:
        """A segment written with ``hold`` whose lines were sent after all: keep only the
        ``undelivered`` ones (none: delete it), then let it go."""
        with self._lock:
            fd = self._held.pop(path, None)
            if fd is not None:
                written = self._mine.get(path, 0)
                self.held_lines -= written
                self.counts["spooled"] -= written - len(undelivered)
                self._mine[path] = len(undelivered)
        if fd is None:
            return
        try:
            if undelivered:
                self._replace(path, undelivered)
            else:
                with contextlib.suppress(FileNotFoundError):
                    os.unlink(path)
        finally:
            os.close(fd)

    def make_directory(self) -> None:
        """``<spool_dir>/<stage>``, a directory of this user's, readable by this user only
        (a symbolic link, or another user's directory, is refused)."""
        os.makedirs(self.path, mode=0o700, exist_ok=True)
        found = os.lstat(self.path)
        if not stat.S_ISDIR(found.st_mode) or found.st_uid != os.getuid():
            raise OSError(errno.EPERM, "the spool must be a directory of this user's, not a "
                          "link", self.path)
        if found.st_mode & 0o077:
            os.chmod(self.path, 0o700)

    def _make_room(self, size: int) -> None:
        """Delete the oldest segments nobody holds until ``size`` more bytes fit; their lines
        count as ``spool_full``."""
        segments = self._segments(with_sizes=True)
        total = sum(size_ for _, size_ in segments)
        for path, segment_size in segments:
            if total + size <= self.max_bytes:
                return
            claim = self._claim(path)
            if claim is None:
                continue
            with self._lock:
                self.counts["spool_full"] += len(claim.lines)
                # Ours: they were counted as spooled, and are dropped now.
                self.counts["spooled"] -= min(self._mine.pop(path, 0), len(claim.lines))
            self.done(claim)
            total -= segment_size

    # -- reading ---------------------------------------------------------------------
    def claim_oldest(self) -> Optional[Claim]:
        """The oldest segment no process holds, claimed; None when there is none."""
        self._adopt_abandoned()
        for path, _ in self._segments():
            claim = self._claim(path)
            if claim is not None:
                if claim.lines:
                    return claim
                self.done(claim)  # nothing left that can be sent
        return None

    def done(self, claim: Claim) -> None:
        """Every line of the claimed segment was delivered (or dropped): delete it."""
        try:
            with contextlib.suppress(FileNotFoundError):
                os.unlink(claim.path)
        finally:
            with self._lock:
                self._mine.pop(claim.path, None)
            self._let_go(claim.fd)

    def give_back(self, claim: Claim, undelivered: Optional[Sequence[bytes]] = None) -> None:
        """Release a claim; with ``undelivered``, the segment keeps only those lines."""
        try:
            if undelivered is not None and len(undelivered) < len(claim.lines):
                if undelivered:
                    self._replace(claim.path, undelivered)
                else:
                    with contextlib.suppress(FileNotFoundError):
                        os.unlink(claim.path)
        finally:
            self._let_go(claim.fd)

    def _let_go(self, fd: int) -> None:
        with self._lock:
            self._claims.pop(fd, None)
        os.close(fd)

    def count_replayed(self, lines: int, failed: int = 0) -> None:
        """``lines`` of a claimed segment were delivered; ``failed`` were refused for good
        (a line no attempt will ever deliver), dropped as ``spool_failed``."""
        with self._lock:
            self.counts["replayed"] += lines
            self.counts["spool_failed"] += failed

    def contents(self) -> Tuple[int, int, int, Optional[float]]:
        """Segments, records and bytes in the spool, and the oldest one's time (unix)."""
        segments = self._segments(with_sizes=True)
        records = 0
        for path, _ in segments:
            with contextlib.suppress(OSError):
                records += self._count_lines(path)
        oldest = None
        if segments:
            oldest = int(os.path.basename(segments[0][0]).split("-")[1]) / 1e9
        return len(segments), records, sum(size for _, size in segments), oldest

    def has_segments(self) -> bool:
        try:
            return any(entry.name.endswith((_SUFFIX, _PARTIAL)) for entry in os.scandir(self.path))
        except OSError:
            return False

    def after_fork_in_child(self) -> None:
        """The parent's claims are the parent's: forget them without releasing its locks
        (closing our copy of the descriptor does not release a flock held by the parent's)."""
        self._lock = threading.Lock()
        held, self._held = self._held, {}
        claims, self._claims = self._claims, {}
        for fd in [*held.values(), *claims]:
            with contextlib.suppress(OSError):
                os.close(fd)
        self._mine, self.held_lines = {}, 0
        self.counts = dict.fromkeys(self.counts, 0)

    # -- the files -------------------------------------------------------------------
    def _segments(self, with_sizes: bool = False) -> List[Tuple[str, int]]:
        """Complete segments, oldest first, with their sizes when asked."""
        try:
            names = sorted((entry.name.split("-", 1)[1], entry.name)
                           for entry in os.scandir(self.path)
                           if entry.name.endswith(_SUFFIX) and _stream_of(entry.name))
        except FileNotFoundError:
            return []
        found = []
        for _, name in names:
            path = os.path.join(self.path, name)
            size = 0
            if with_sizes:
                try:
                    size = os.stat(path).st_size
                except FileNotFoundError:
                    continue
            found.append((path, size))
        return found

    def _claim(self, path: str) -> Optional[Claim]:
        if path in self._held:
            return None
        try:
            fd = os.open(path, os.O_RDONLY | os.O_CLOEXEC)
        except FileNotFoundError:
            return None
        try:
            fcntl.flock(fd, fcntl.LOCK_EX | fcntl.LOCK_NB)
            # Still the file of that name? (it may have been delivered and deleted, or
            # replaced, between our open and our lock)
            if os.fstat(fd).st_nlink == 0 or os.stat(path).st_ino != os.fstat(fd).st_ino:
                raise BlockingIOError
            data = _read_all(fd)  # through this descriptor: no other one to close
            lines = self._valid_lines(data)
            if sum(map(len, lines)) < len(data):  # torn: counted once, so the file loses them
                self._rewrite_in_place(path, lines)
        except OSError:  # held by another process (BlockingIOError), gone, or unwritable
            os.close(fd)
            return None
        with self._lock:
            self._claims[fd] = path
        return Claim(path, fd, _stream_of(os.path.basename(path)) or METRIC, lines)

    @staticmethod
    def _rewrite_in_place(path: str, lines: Sequence[bytes]) -> None:
        """Make the claimed segment hold ``lines``, in the same file (the claim's lock is on
        it: a new file under that name would be free for anyone to claim)."""
        fd = os.open(path, os.O_WRONLY | os.O_CLOEXEC)
        try:
            data = b"".join(lines)
            os.write(fd, data)
            os.ftruncate(fd, len(data))
            os.fsync(fd)
        finally:
            os.close(fd)

    def _valid_lines(self, data: bytes) -> List[bytes]:
        """The lines of a segment that are whole JSON objects: a line cut short by a crash,
        or garbage a lost write left, is counted as ``spool_torn`` and dropped."""
        lines, torn = [], 0
        for line in data.splitlines(keepends=True):
            try:
                if not line.endswith(b"\n") or not isinstance(orjson.loads(line), dict):
                    raise ValueError
            except ValueError:
                torn += 1
                continue
            lines.append(line)
        if torn:
            with self._lock:
                self.counts["spool_torn"] += torn
        return lines

    def _adopt_abandoned(self) -> None:
        """Take in ``.tmp`` segments whose writer died: old (a writer takes milliseconds), and
        not held. A rewrite's ``.replacing`` file left behind is deleted: the segment it was
        to replace is still whole."""
        try:
            entries = [e for e in os.scandir(self.path) if e.name.endswith((_PARTIAL, _REWRITE))]
        except FileNotFoundError:
            return
        for entry in entries:
            try:
                if time.time() - entry.stat().st_mtime < ABANDONED_AFTER:
                    continue
                if entry.name.endswith(_REWRITE):
                    os.unlink(entry.path)
                    continue
                fd = os.open(entry.path, os.O_RDONLY | os.O_CLOEXEC)
            except OSError:
                continue
            try:
                fcntl.flock(fd, fcntl.LOCK_EX | fcntl.LOCK_NB)
                os.rename(entry.path, entry.path[: -len(_PARTIAL)] + _SUFFIX)
            except OSError:
                pass
            finally:
                os.close(fd)

    def _replace(self, path: str, lines: Sequence[bytes]) -> None:
        """Atomically make the segment at ``path`` hold only ``lines``."""
        partial = f"{path}.{os.getpid()}{_REWRITE}"
        fd = os.open(partial, os.O_WRONLY | os.O_CREAT | os.O_TRUNC | os.O_CLOEXEC
                     | os.O_NOFOLLOW, 0o600)
        try:
            os.write(fd, b"".join(lines))
            os.fsync(fd)
        finally:
            os.close(fd)
        os.replace(partial, path)
        self._sync_directory()

    def _sync_directory(self) -> None:
        fd = os.open(self.path, os.O_RDONLY | os.O_CLOEXEC)
        try:
            os.fsync(fd)
        finally:
            os.close(fd)

    @staticmethod
    def _count_lines(path: str) -> int:
        with open(path, "rb") as f:
            return sum(chunk.count(b"\n") for chunk in iter(lambda: f.read(1 << 20), b""))


def replay_all(spool: Spool, send: Callable[[str, List[bytes]], Tuple[List[bytes], int]],
               stop: Callable[[], bool] = lambda: False) -> Iterator[Tuple[Claim, int]]:
    """Claim segments oldest first and ``send`` their lines (``send`` returns the lines to
    keep for later, and how many failed for good); yields each claim with how many were
    delivered, until the spool has none that is free, a segment is not delivered whole, or
    ``stop()`` says so (it is asked before each segment)."""
    while not stop():
        claim = spool.claim_oldest()
        if claim is None:
            return
        try:
            undelivered, failed = send(claim.stream, claim.lines)
        except BaseException:
            spool.give_back(claim)
            raise
        delivered = len(claim.lines) - len(undelivered) - failed
        spool.count_replayed(delivered, failed)
        if undelivered:
            spool.give_back(claim, undelivered)
            yield claim, delivered
            return
        spool.done(claim)
        yield claim, delivered


class Spiller:
    """``on_full="spool"``: records that do not fit the buffer, handed over by the caller
    (a queue put, never the disk) and written by a thread of its own, in segments. At most
    ``max_bytes`` wait for it; more are refused (and dropped by the caller)."""

    def __init__(self, spool: Spool, written: Callable[[int, bool], None],
                 max_bytes: int) -> None:
        self.spool, self.written, self.max_bytes = spool, written, max_bytes
        self.after_fork_in_child()

    def after_fork_in_child(self) -> None:
        self._queue: queue.SimpleQueue[Optional[Tuple[str, bytes]]] = queue.SimpleQueue()
        self._lock = threading.Lock()
        self._bytes = 0
        self._thread: Optional[threading.Thread] = None

    def put(self, stream: str, body: bytes) -> bool:
        with self._lock:
            if self._bytes + len(body) > self.max_bytes:
                return False
            self._bytes += len(body)
            if self._thread is None:
                thread = threading.Thread(target=self._run, name="dxtrack-spool", daemon=True)
                try:
                    thread.start()
                except RuntimeError:  # interpreter shutdown: no new threads
                    self._bytes -= len(body)
                    return False
                self._thread = thread
        self._queue.put((stream, body))
        return True

    def _run(self) -> None:
        block_signals_in_this_thread()
        while True:
            item = self._queue.get()
            if item is None:
                return
            batch = [item]
            with contextlib.suppress(queue.Empty):
                while len(batch) < 10_000:
                    next_item = self._queue.get(timeout=0.05)
                    if next_item is None:
                        self._queue.put(None)
                        break
                    batch.append(next_item)
            for stream in _STREAMS:
                bodies = [body for s, body in batch if s == stream]
                if bodies:
                    self._write(stream, bodies)

    def _write(self, stream: str, bodies: List[bytes]) -> None:
        try:
            ok = self.spool.write(stream, [finalize(body) for body in bodies]).lines > 0
        except OSError:
            ok = False
        with self._lock:
            self._bytes -= sum(len(body) for body in bodies)
        self.written(len(bodies), ok)

    def close(self, timeout: Optional[float]) -> None:
        """Write what waits, within ``timeout`` seconds, and end the thread."""
        thread = self._thread
        if thread is not None:
            self._queue.put(None)
            thread.join(timeout)

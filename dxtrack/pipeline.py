"""One client's delivery pipeline: buffer, worker, sink, and their lifecycle.

It owns the delivery modes (how long a caller waits), starts the worker on the first
record and again if it dies, runs flush and close within their deadlines, and resets in
a forked child (:mod:`dxtrack.forks`); :mod:`dxtrack.exits` closes it at the end. With
``papertrail_hostport``, a route of its own (:class:`_Copies`) carries a best-effort copy.
"""

from __future__ import annotations

import dataclasses
import functools
import threading
import time
from typing import Callable, Dict, Optional, cast

from . import exits, forks
from ._logging import RateLimitedLog, logger
from .buffer import CLOSED, DROPPED, StreamBuffer
from .clock import Clock
from .config import Config
from .records import ERROR, METRIC, finalize
from .signals import block_signals_in_this_thread
from .sinks.base import Sink
from .sinks.papertrail import PapertrailSink
from .spool import Spiller, Spool
from .worker import DEFAULT_RETRY, RetryPolicy, Worker, in_delivery_thread, quantity, spool_failed

__all__ = ["Pipeline"]

_MAX_COPIES = 10_000  # Papertrail copies waiting at most; more are dropped
_SEGMENT_LINES = 5_000  # records per spool segment written at close
_SPILL_MIN_WAIT = 2.0  # seconds close() gives the spill writer, even out of time
_SPOOL_JOIN = 0.5  # ... and a stopped worker, to spool the batch it gives up


class Pipeline:
    """Moves the records of one configuration to one sink.

    ``tracked=False``: a route run by another pipeline (the Papertrail copies),
    which closes it and resets it after a fork; the process's exit does not.
    """

    def __init__(self, config: Config, sink: Sink, clock: Clock, log: RateLimitedLog,
                 retry: RetryPolicy = DEFAULT_RETRY, *, tracked: bool = True) -> None:
        self.config, self.retry, self.sink, self.clock, self.log = config, retry, sink, clock, log
        # Delivery modes: does a record wake the worker, does the caller wait for it?
        self.metric_urgent = not config.buffer_metrics
        self.metric_waits = self.metric_urgent and not config.use_async_requests
        self.error_waits = not config.use_async_requests
        #: The disk spool (``spool_dir``) and, with ``on_full="spool"``, its writer for
        #: records that do not fit the buffer.
        self.spool: Optional[Spool] = None
        self.spiller: Optional[Spiller] = None
        if config.spool_dir is not None:
            self.spool = Spool(config.spool_dir, config.stage, config.spool_max_bytes)
        self.buffer = StreamBuffer(
            max_records=config.max_buffer_records, max_bytes=config.max_buffer_bytes,
            on_full=config.on_full, block_timeout=config.block_timeout,
            flush_interval=config.flush_interval, batch_lines=sink.max_batch_lines,
            batch_bytes=sink.max_batch_bytes, clock=clock, start_worker=self._start_worker,
            spill=self._spill if config.on_full == "spool" else None,
            offer_urgent=self.metric_urgent)
        if self.spool is not None and config.on_full == "spool":
            self.spiller = Spiller(self.spool, self.buffer.spilled, config.max_buffer_bytes)
        #: The caller's entry point: ``put(stream, body, urgent) -> sequence number``.
        self.put: Callable[[str, bytes, bool], int] = self.buffer.put
        #: A best-effort syslog copy of every record, when ``papertrail_hostport`` is set.
        self.copies: Optional[_Copies] = None
        if config.papertrail_hostport is not None:
            self.copies = _Copies(config, clock, log, self.buffer.put)
            self.put = self.copies.put
        #: ``metric()``'s entry point, ``offer(body) -> put()'s answer``: without the lock
        #: where it can (StreamBuffer.offer), when nobody waits for the record's number and
        #: nothing copies it.
        self.offer_ok = not self.metric_waits and self.copies is None
        self.offer: Callable[[bytes], int] = (
            self.buffer.offer if not self.metric_waits and self.copies is None
            else functools.partial(self.put, METRIC, urgent=self.metric_urgent))
        self._closed_ok: Optional[bool] = None
        self._reset()
        self._tracked = tracked
        if tracked:
            forks.register(self)
            exits.track(self)
            exits.prepare(config.handle_sigterm)

    def _reset(self) -> None:
        """No worker and fresh locks (at creation and in a forked child)."""
        self.worker_thread: Optional[threading.Thread] = None
        self.worker: Optional[Worker] = None
        self._start_lock = threading.Lock()
        self._close_lock = threading.Lock()
        self._closing: Optional[threading.Event] = None  # the close under way; set when done

    def wait_for(self, stream: str, seq: int) -> bool:
        """Block until record ``seq`` of ``stream`` is settled, at most ``sync_timeout``. Not
        at all while the sink is failing (the record waits for its retries, the caller goes on),
        nor from a delivery thread (a log handler called back from a sink would wait for itself).
        """
        if in_delivery_thread():
            return False
        return self.buffer.wait_settled({stream: seq}, self.config.sync_timeout, False)

    def _start_worker(self) -> bool:
        with self._start_lock:
            buffer = self.buffer
            if buffer.worker_running:
                return True
            if self.worker is not None:
                self.worker.close()  # one that died: its sender thread goes with it
            worker = self.worker = Worker(
                buffer, self.sink, retry_deadline=self.config.retry_deadline, log=self.log,
                retry=self.retry, spool=self.spool)
            thread = threading.Thread(target=self._run_worker, args=(worker,),
                                      name="dxtrack-worker", daemon=True)
            # Said before start(): a worker that dies at once must be able to say it ended,
            # and one that calls back into dxtrack at once must be recognised.
            buffer.worker_started()
            self.worker_thread = thread
            try:
                thread.start()
            except RuntimeError:  # interpreter shutting down: no new threads
                buffer.worker_ended()
                self.worker_thread = None
                return False
        if self._tracked:
            exits.prepare(self.config.handle_sigterm)
        return True

    def _spill(self, stream: str, body: bytes) -> bool:
        return self.spiller is not None and self.spiller.put(stream, body)

    def _run_worker(self, worker: Worker) -> None:
        try:
            block_signals_in_this_thread()
            worker.run()
        finally:
            if self.buffer.worker_ended():  # records were left waiting: a new worker
                self._start_worker()

    def flush(self, timeout: Optional[float]) -> bool:
        """Send everything accepted so far and wait at most ``timeout`` real seconds.

        True when nothing recorded since the last flush that completed was lost (dropped,
        evicted or failed) and all of it was delivered in time; one that times out leaves the
        same records to the next. Papertrail copies share the ``timeout``, never the verdict.
        """
        started = time.monotonic()
        ok = self._flush_buffer(timeout)
        if self.copies is not None:  # from a delivery thread, this returns at once
            self.copies.route.flush(_left(timeout, started))
        return ok

    def _flush_buffer(self, timeout: Optional[float]) -> bool:
        buffer = self.buffer
        checkpoint = buffer.request_flush()
        if checkpoint.pending:
            if in_delivery_thread():
                return False  # called back from the sink: the worker cannot wait for itself
            if not buffer.worker_running and not self._start_worker():
                self._deliver_inline(timeout)
            if not buffer.wait_settled(checkpoint.targets, timeout):
                return False
        return buffer.verdict(checkpoint)

    def close(self, timeout: Optional[float] = None) -> bool:
        """Flush within ``timeout`` seconds, stop the worker, release the sink. Idempotent:
        later calls return the first verdict, or wait for the close under way within their own
        ``timeout``. A close cut short by an exception (Ctrl-C) leaves the next call to redo it.
        """
        timeout = self.config.shutdown_timeout if timeout is None else timeout
        mine: Optional[threading.Event] = None
        try:
            with self._close_lock:  # only decides who closes: never held while closing
                other = self._closing
                if other is None:
                    mine = self._closing = threading.Event()
            if other is not None:
                other.wait(timeout + 1.0)  # the other close is bounded by its own timeout
                return bool(self._closed_ok)
            self._closed_ok = self._close(timeout)
            return self._closed_ok
        finally:
            if mine is not None:
                if self._closed_ok is None:
                    with self._close_lock:
                        self._closing = None
                mine.set()

    def _close(self, timeout: float) -> bool:
        """close() proper: flush, stop the worker and the sender, release the sink."""
        started = time.monotonic()
        ok = self.flush(timeout)
        self.buffer.close()
        thread = self.worker_thread
        if thread is not None and thread is not threading.current_thread():
            thread.join(_left(timeout, started))
        self.buffer.stop()
        if self.spool is not None and thread is not None and (
                thread is not threading.current_thread()):
            thread.join(_SPOOL_JOIN)  # a worker woken from its backoff spools its batch itself
        if self.spiller is not None:  # what it was handed is written, whatever the verdict
            self.spiller.close(max(_left(timeout, started) or 0.0, _SPILL_MIN_WAIT))
        rescued = self._spool_the_rest() if not ok else {}
        if self.worker is not None:
            self.worker.close()  # its sender thread, if any, ends once its call returns
        if thread is None or not thread.is_alive():
            self._close_sink()
        if self.copies is not None:
            self.copies.close(_left(timeout, started))
        if not ok and not self.sink.best_effort:  # copies are not records
            self._say_what_was_not_delivered(rescued)
        if self._tracked:
            exits.untrack(self)
        return ok

    def _say_what_was_not_delivered(self, rescued: Dict[str, int]) -> None:
        """The last word of a close that did not deliver everything: what is lost or still
        pending, and what is safe in the spool (``rescued``: in flight, written there now)."""
        s, lost = self.stats(), self.buffer.undelivered()
        for stream, count in rescued.items():
            lost[stream] -= count
        spooled = cast(int, s["spooled"])
        safe = ""
        if self.spool is not None and spooled:
            safe = (f"; {spooled:,} records are safe in the spool {self.spool.path} and will "
                    "be sent later")
        if lost[METRIC] or lost[ERROR]:
            logger.error(
                "dxtrack closed with records not delivered (%s, %s): %s pending, %s failed, "
                "%s dropped (%r)%s", quantity(lost[METRIC], METRIC), quantity(lost[ERROR], ERROR),
                f"{s['pending']:,}", f"{s['failed']:,}",
                f"{sum(cast(Dict[str, int], s['dropped']).values()):,}", self.sink, safe)
        elif spooled:
            logger.warning("dxtrack closed before every record was delivered%s", safe)

    def _spool_the_rest(self) -> Dict[str, int]:
        """Out of time at close: what is still queued, and the batch in flight, go to the
        spool; returns how many records of the batch in flight, by stream, went there."""
        spool = self.spool
        if spool is None:
            return {}
        rescued = self.worker.rescue() if self.worker is not None else {}
        for stream, bodies, first in self.buffer.drain():
            written = 0
            try:
                for start in range(0, len(bodies), _SEGMENT_LINES):
                    part = bodies[start:start + _SEGMENT_LINES]
                    spool.write(stream, [finalize(body) for body in part])
                    written += len(part)  # spooled, or dropped there as spool_full
            except OSError as exc:
                spool_failed(self.log, spool, exc)
            self.buffer.settle_drained(stream, first, len(bodies), written)
        return rescued

    def _close_sink(self) -> None:
        try:
            self.sink.close()
        except Exception as exc:
            self.log.warning("sink-close", "dxtrack could not close %r: %r", self.sink, exc)

    def _deliver_inline(self, timeout: Optional[float]) -> None:
        """Last resort when no thread can be started (interpreter shutdown): no retries, no new
        batch after ``timeout`` (one already sent is bounded by the sink's own timeouts)."""
        self.buffer.close()
        worker = Worker(self.buffer, self.sink, retry_deadline=0.0, log=self.log, retry=self.retry,
                        spool=self.spool)
        worker.run(None if timeout is None else time.monotonic() + timeout)

    def finished(self) -> bool:
        """Closed, with no worker left: its counters will not change again."""
        return self._closed_ok is not None and not self.buffer.worker_running

    def stats(self) -> Dict[str, object]:
        snapshot = self.buffer.snapshot()
        counts = self.spool.counts if self.spool is not None else {}
        snapshot["spooled"] = counts.get("spooled", 0)
        snapshot["replayed"] = counts.get("replayed", 0)
        if self.spool is not None:  # a batch close() spooled while its attempt is under way
            snapshot["pending"] = cast(int, snapshot["pending"]) - self.spool.held_lines
        dropped = cast(Dict[str, int], snapshot["dropped"])
        for reason in ("spool_full", "spool_torn", "spool_failed"):
            if counts.get(reason):
                dropped[reason] = counts[reason]
        snapshot.update(self.sink.stats())
        if self.copies is not None:
            snapshot.update(self.copies.stats())
        return snapshot

    def after_fork_in_child(self) -> None:
        """The parent's queue, locks and thread are the parent's: start afresh (a closed
        pipeline stays closed). The log too: a pipeline may outlive the client that shares it."""
        self.buffer.after_fork_in_child()
        if self._closed_ok is not None:
            self.buffer.stop()
        self._reset()
        self.log.after_fork_in_child()
        self.sink.after_fork()
        if self.spool is not None:
            self.spool.after_fork_in_child()
        if self.spiller is not None:
            self.spiller.after_fork_in_child()
        if self.copies is not None:
            self.copies.after_fork_in_child()


class _Copies:
    """The route of the Papertrail copies: a pipeline of their own (at most 10,000 records
    queued, no retries, nobody waiting), flushed and closed by its parent within the parent's
    bounds. Copies refused once it closed, or still queued when it closed, count as dropped."""

    def __init__(self, config: Config, clock: Clock, log: RateLimitedLog,
                 put: Callable[[str, bytes, bool], int]) -> None:
        sink = PapertrailSink(cast(str, config.papertrail_hostport), config.context, log,
                              timer=clock.monotonic)
        self.route = Pipeline(dataclasses.replace(
            config, papertrail_hostport=None, max_buffer_records=_MAX_COPIES,
            on_full="drop_newest", block_timeout=0.0, retry_deadline=0.0,
        ), sink, clock, log, tracked=False)
        self.parent_put, self.log = put, log
        self.refused = self.left = 0

    def put(self, stream: str, body: bytes, urgent: bool) -> int:
        """The parent's ``put``, then a copy, sent at once whatever the mode; but none of a
        record the parent refused as closed (the client gives it to the next pipeline)."""
        seq = self.parent_put(stream, body, urgent)
        if seq != CLOSED:
            copied = self.route.put(stream, body, True)
            if copied == CLOSED:
                self.refused += 1
            elif copied == DROPPED:
                self.log.warning(
                    "papertrail-full", "dxtrack's Papertrail queue is full (%d records): copies "
                    "are being dropped (see stats()['papertrail_dropped']); Firehose delivery "
                    "is not affected", _MAX_COPIES)
        return seq

    def close(self, timeout: Optional[float]) -> None:
        self.route.close(timeout)  # then stopped: what is queued stays there
        self.left = self.route.buffer.queued()

    def stats(self) -> Dict[str, int]:
        s = self.route.stats()
        dropped = sum(cast(Dict[str, int], s["dropped"]).values()) + self.refused + self.left
        return {"papertrail_sent": cast(int, s["delivered"]), "papertrail_dropped": dropped,
                "papertrail_failed": cast(int, s["failed"])}

    def after_fork_in_child(self) -> None:
        self.route.after_fork_in_child()
        self.refused = self.left = 0


def _left(timeout: Optional[float], started: float) -> Optional[float]:
    """What is left of ``timeout`` seconds since ``started`` (None: no bound)."""
    return None if timeout is None else max(0.0, timeout - (time.monotonic() - started))

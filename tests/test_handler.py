"""DXTrackHandler: logged exceptions become error records; nothing else does."""

from __future__ import annotations

import logging
import threading
from typing import Any, Callable, Iterator, Tuple

import pytest

from dxtrack import DXTrack, DXTrackHandler, MemorySink

MakeClient = Callable[..., DXTrack]


class ParseError(Exception):
    pass


@pytest.fixture
def wired(make_client: MakeClient) -> Iterator[Tuple[logging.Logger, MemorySink, DXTrack]]:
    """A logger of the application's with the handler on it, and where records land."""
    sink = MemorySink()
    client = make_client(sink=sink)
    logger = logging.getLogger("shop.scraper")
    handler = DXTrackHandler(client)
    logger.addHandler(handler)
    try:
        yield logger, sink, client
    finally:
        logger.removeHandler(handler)


class TestLoggedExceptions:
    """``logger.exception()`` and ``logger.error(..., exc_info=True)`` report to dxtrack."""

    def test_logger_exception_becomes_an_error_record(self, wired: Any) -> None:
        logger, sink, _ = wired
        try:
            raise ParseError("no price on page 7")
        except ParseError:
            logger.exception("page %d could not be parsed", 7)
        (record,) = sink.records("error")
        assert record["exception"]["type"].endswith("ParseError")
        assert record["exception"]["value"] == "no price on page 7"
        assert "raise ParseError" in record["exception"]["traceback"]
        assert record["metadata"] == {
            "logger": "shop.scraper", "level": "ERROR", "message": "page 7 could not be parsed",
        }

    def test_critical_with_an_exception_object_is_recorded(self, wired: Any) -> None:
        logger, sink, _ = wired
        logger.critical("giving up", exc_info=ValueError("bad row"))
        (record,) = sink.records("error")
        assert record["exception"]["value"] == "bad row"
        assert record["metadata"]["level"] == "CRITICAL"

    def test_records_without_an_exception_or_below_error_are_ignored(self, wired: Any) -> None:
        logger, sink, client = wired
        logger.error("plain error, no exception")
        try:
            raise ParseError("only a warning")
        except ParseError:
            logger.warning("retrying", exc_info=True)
        logger.error("explicitly none", exc_info=False)
        assert sink.records("error") == [] and client.stats()["enqueued"] == 0

    def test_a_lower_level_can_be_chosen(self, make_client: MakeClient) -> None:
        sink = MemorySink()
        logger = logging.getLogger("shop.lenient")
        handler = DXTrackHandler(make_client(sink=sink), level=logging.WARNING)
        logger.addHandler(handler)
        try:
            try:
                raise ParseError("soft")
            except ParseError:
                logger.warning("retrying", exc_info=True)
        finally:
            logger.removeHandler(handler)
        assert [r["metadata"]["level"] for r in sink.records("error")] == ["WARNING"]

    def test_the_ready_made_client_is_the_default(self) -> None:
        from dxtrack import dxtrack

        assert DXTrackHandler().client is dxtrack


class TestNoLoops:
    """dxtrack's own log lines never come back as records, even from the root logger."""

    def test_dxtrack_logging_an_exception_is_not_recorded(self, wired: Any) -> None:
        _, sink, client = wired
        root_handler = DXTrackHandler(client)
        root = logging.getLogger()
        root.addHandler(root_handler)
        try:
            try:
                raise RuntimeError("inside dxtrack")
            except RuntimeError:
                logging.getLogger("dxtrack").exception("dxtrack failed")
                logging.getLogger("dxtrack.sinks").exception("dxtrack failed")
        finally:
            root.removeHandler(root_handler)
        assert sink.records("error") == []

    def test_a_message_that_cannot_be_formatted_goes_to_handle_error(
        self, make_client: MakeClient
    ) -> None:
        """Like any handler: logging's handleError deals with it, nothing is raised or recorded."""
        sink = MemorySink()
        handled = []

        class Watched(DXTrackHandler):
            def handleError(self, record: logging.LogRecord) -> None:  # noqa: N802
                handled.append(record.msg)

        logger = logging.getLogger("shop.badformat")
        logger.propagate = False
        handler = Watched(make_client(sink=sink))
        logger.addHandler(handler)
        try:
            try:
                raise ParseError("x")
            except ParseError:
                logger.exception("two args %s %s", "only one")
        finally:
            logger.removeHandler(handler)
            logger.propagate = True
        assert handled == ["two args %s %s"] and sink.records("error") == []


class BlockedSink(MemorySink):
    """A sink whose send() waits until released: an endpoint that hangs."""

    def __init__(self) -> None:
        super().__init__()
        self.release = threading.Event()

    def send(self, stream: str, lines: Any) -> Any:
        self.release.wait(30)
        return super().send(stream, lines)


class TestNeverStallsTheApplication:
    """Logging calls return at once, whatever the endpoint and the delivery mode do."""

    def test_logging_does_not_wait_for_delivery_in_the_default_mode(
        self, make_client: MakeClient
    ) -> None:
        sink = BlockedSink()
        client = make_client(sink=sink, sync_timeout=30)  # default mode: error() would wait
        logger = logging.getLogger("shop.slow")
        handler = DXTrackHandler(client)
        logger.addHandler(handler)
        returned = threading.Event()

        def log_a_failure() -> None:
            try:
                raise ParseError("endpoint hangs")
            except ParseError:
                logger.exception("while the endpoint hangs")
            returned.set()

        try:
            threading.Thread(target=log_a_failure, daemon=True).start()
            assert returned.wait(10), "logger.exception() waited for the hanging endpoint"
            assert client.stats()["pending"] == 1
        finally:
            logger.removeHandler(handler)
            sink.release.set()
        assert client.flush_metrics_buffer(10)
        assert [r["exception"]["value"] for r in sink.records("error")] == ["endpoint hangs"]

    def test_dxtrack_records_never_wait_for_the_handler_lock(self, make_client: MakeClient) -> None:
        """The worker logging a failure must not queue behind a thread inside the handler."""
        handler = DXTrackHandler(make_client(sink=MemorySink()))
        holding, done = threading.Event(), threading.Event()

        def hold_the_lock() -> None:
            with handler.lock:  # type: ignore[union-attr]
                holding.set()
                done.wait(10)

        holder = threading.Thread(target=hold_the_lock)
        holder.start()
        assert holding.wait(10)
        try:
            record = logging.LogRecord("dxtrack", logging.ERROR, __file__, 1, "send failed",
                                       None, (ParseError, ParseError("x"), None))
            finished = threading.Event()
            caller = threading.Thread(target=lambda: (handler.handle(record), finished.set()))
            caller.start()
            assert finished.wait(5), "a dxtrack record waited for the handler's lock"
        finally:
            done.set()
            holder.join(10)

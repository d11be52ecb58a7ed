"""Short runs of the chaos harness (tests/chaos.py; ``make chaos`` runs every scenario, longer).

Real processes through real sockets: jobs are subprocesses that record through a
:class:`FaultProxy` in front of the session's moto server, with a disk spool,
``retry_deadline=2`` and ``shutdown_timeout=2``. What they emitted (keys they
wrote once each call returned) is compared with what landed in the bucket.

- An outage twice as long as ``retry_deadline``: what passed its deadline is
  spooled, then replayed once a delivery succeeds; every record lands once.
- A job that exits during an outage spools what its exit flush could not send;
  the next job with the same spool replays it.
- A job killed with SIGKILL during an outage loses at most what was in memory;
  what was spooled before is delivered by ``dxtrack replay``.
"""

from __future__ import annotations

from typing import Iterator

import pytest
from chaos import Harness, Landed, run_scenario


@pytest.fixture(scope="module")
def harness(moto_url: str) -> Iterator[Harness]:
    with Harness(moto_url=moto_url) as harness:
        yield harness


class TestTheSpoolThroughChaos:
    """Each scenario lands every record once, or declares what it may lose and why."""

    def test_an_outage_twice_the_deadline_then_recovery(self, harness: Harness) -> None:
        outcome = run_scenario(harness, "outage", quick=True)
        assert outcome.passed, outcome.report()
        assert outcome.spooled > 0, outcome.report()  # the deadline passed: the spool was used
        # The job replayed it all itself, in the background: nothing was left for the command.
        assert outcome.swept == 0 and outcome.in_spool == 0, outcome.report()
        assert outcome.replayed == outcome.spooled, outcome.report()
        assert outcome.landed == outcome.emitted == 300

    def test_a_job_exiting_in_an_outage_is_replayed_by_the_next(self, harness: Harness) -> None:
        outcome = run_scenario(harness, "exit-in-outage", quick=True)
        assert outcome.passed, outcome.report()
        assert outcome.spooled > 0 and outcome.replayed >= outcome.spooled, outcome.report()
        assert outcome.landed == outcome.emitted == 400 and outcome.in_spool == 0

    def test_sigkill_loses_at_most_what_was_in_memory(self, harness: Harness) -> None:
        outcome = run_scenario(harness, "sigkill", quick=True)
        assert outcome.passed, outcome.report()
        assert outcome.emitted == 250 and outcome.in_spool == 0, outcome.report()
        assert outcome.lost <= outcome.unavoidable <= 50, outcome.report()


class TestTheHarnessCounts:
    """What the harness calls a duplicate: an id seen twice, or a record under two ids."""

    def test_duplicates_by_id_and_by_key(self) -> None:
        landed = Landed.__new__(Landed)
        landed.ids, landed.keys, landed.broken = {}, {}, 0

        def line(seq: int, rid: str) -> bytes:
            return b'{"metadata":{"job":"j","worker":0,"seq":%d},"id":"%b"}' % (seq, rid.encode())

        landed._take(b"\n".join([line(0, "a"), line(1, "b"), b"not json"]) + b"\n")
        assert (landed.duplicates(), landed.broken) == (0, 1)
        landed._take(line(0, "a") + b"\n")  # the same line again
        assert landed.duplicates() == 1
        landed._take(line(1, "c") + b"\n")  # the same record under another id
        assert landed.duplicates() == 2
        assert sorted(landed.keys) == ["j/0/0", "j/0/1"]

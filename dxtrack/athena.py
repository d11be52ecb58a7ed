"""``dxtrack query --athena``: the same SQL run by Athena over the stage's Glue tables.

One query is started in the database ``dxtrack_<stage>`` (:attr:`dxtrack.landing.Landing.
database`) with its results written under ``s3://<bucket>/athena-results/`` (or a location
given), polled until it ends or a deadline passes (then stopped), and its rows read page by
page into a :class:`~dxtrack.results.Result`, typed by the columns' Athena types.
"""

from __future__ import annotations

import time
from typing import Any, Callable, Dict, Optional

import botocore.config
import botocore.exceptions

from .config import DEFAULT_REGION, Config
from .landing import Landing
from .results import Result
from .sinks.firehose import session_for

__all__ = ["AthenaError", "run"]

#: How long a query may run before it is stopped, and how often its state is read.
TIMEOUT, POLL = 300.0, 1.0
CONNECT_TIMEOUT, READ_TIMEOUT = 5.0, 30.0
RESULTS_FOLDER = "athena-results/"
_ENDED = ("SUCCEEDED", "FAILED", "CANCELLED")
_INTEGER = ("tinyint", "smallint", "integer", "int", "bigint")
_REAL = ("double", "float", "real", "decimal")


class AthenaError(Exception):
    """A query Athena refused, failed or did not finish; ``usage`` when the fault is the
    query's (Athena's error category 2, "user")."""

    def __init__(self, message: str, usage: bool = False) -> None:
        super().__init__(message)
        self.usage = usage


def run(config: Config, sql: str, *, output: Optional[str] = None, bucket: Optional[str] = None,
        workgroup: Optional[str] = None, timeout: float = TIMEOUT, poll: float = POLL,
        session: Any = None, sleep: Callable[[float], None] = time.sleep,
        clock: Callable[[], float] = time.monotonic) -> Result:
    """Run ``sql`` in Athena against the stage's Glue database and return its rows.

    ``output`` is the S3 location of Athena's result files; without it, ``athena-results/``
    in ``bucket``, which defaults to the stage's bucket as setup names it.
    """
    try:
        session = session or session_for(config)
        region = session.region_name or DEFAULT_REGION
        settings = botocore.config.Config(connect_timeout=CONNECT_TIMEOUT,
                                          read_timeout=READ_TIMEOUT,
                                          retries={"mode": "standard", "total_max_attempts": 3})

        def client(service: str) -> Any:
            return session.client(service, region_name=region,
                                  endpoint_url=config.endpoint_url, config=settings)

        account = "*"
        if output is None and bucket is None:
            account = client("sts").get_caller_identity()["Account"]
        landing = Landing.of(config, account, region, bucket=bucket)
        output = output or f"s3://{landing.bucket}/{RESULTS_FOLDER}"
        athena = client("athena")
        start: Dict[str, Any] = {
            "QueryString": sql, "QueryExecutionContext": {"Database": landing.database},
            "ResultConfiguration": {"OutputLocation": output}}
        if workgroup:
            start["WorkGroup"] = workgroup
        query_id = athena.start_query_execution(**start)["QueryExecutionId"]
        execution = _wait(athena, query_id, timeout, poll, sleep, clock)
        return _rows(athena, query_id, header=execution.get("StatementType") == "DML")
    except botocore.exceptions.ClientError as exc:
        error = exc.response.get("Error", {})
        usage = error.get("Code") == "InvalidRequestException"  # a query Athena cannot parse
        raise AthenaError(f"Athena: {error.get('Code', 'error')}: {error.get('Message') or exc}",
                          usage) from None
    except botocore.exceptions.BotoCoreError as exc:
        raise AthenaError(f"Athena: {type(exc).__name__}: {exc}") from None


def _wait(athena: Any, query_id: str, timeout: float, poll: float,
          sleep: Callable[[float], None], clock: Callable[[], float]) -> Dict[str, Any]:
    """The query's execution once it succeeded; an error if it failed or took too long."""
    deadline = clock() + timeout
    while True:
        execution = athena.get_query_execution(QueryExecutionId=query_id)["QueryExecution"]
        status = execution.get("Status", {})
        state = status.get("State", "")
        if state == "SUCCEEDED":
            return dict(execution)
        if state in _ENDED:
            reason = status.get("StateChangeReason") or state.lower()
            category = status.get("AthenaError", {}).get("ErrorCategory")
            raise AthenaError(f"Athena query {query_id} {state.lower()}: {reason}",
                              usage=category == 2)
        if clock() + poll > deadline:
            athena.stop_query_execution(QueryExecutionId=query_id)
            raise AthenaError(f"Athena query {query_id} did not finish within {timeout:g} s "
                              "and was stopped (--athena-timeout gives it longer)")
        sleep(poll)


def _rows(athena: Any, query_id: str, header: bool) -> Result:
    """Every page of the results; a SELECT's first row repeats the column names."""
    result = Result([])
    first = True
    for page in athena.get_paginator("get_query_results").paginate(QueryExecutionId=query_id):
        result_set = page.get("ResultSet", {})
        rows = [[cell.get("VarCharValue") for cell in row.get("Data", [])]
                for row in result_set.get("Rows", [])]
        if first:
            info = result_set.get("ResultSetMetadata", {}).get("ColumnInfo", [])
            result.columns = [column.get("Name", "") for column in info]
            result.types = [str(column.get("Type", "varchar")).lower() for column in info]
            if header and rows and rows[0] == result.columns:
                rows = rows[1:]
            first = False
        result.rows.extend([_typed(value, kind) for value, kind in zip(row, result.types)]
                           for row in rows)
    return result


def _typed(value: Optional[str], kind: str) -> Any:
    """An Athena cell (always text) as the value its column's type says."""
    if value is None:
        return None
    try:
        if kind in _INTEGER:
            return int(value)
        if kind.startswith(_REAL):
            return float(value)
    except ValueError:
        return value
    if kind == "boolean":
        return value == "true"
    return value

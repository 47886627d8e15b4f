"""A psycopg connection that the store's SQL runs on unchanged: `?` placeholders, rows read by
name or position, explicit BEGIN/COMMIT (autocommit otherwise), reconnecting between
transactions when the server dropped it."""

from __future__ import annotations

import functools
import logging
import re
from collections.abc import Callable, Iterable, Iterator, Mapping, Sequence
from typing import Any

import psycopg
from psycopg.pq import TransactionStatus

log = logging.getLogger("aip.store")

CONNECT_TIMEOUT_S = 10


class Row:
    """One result row: row["column"] and row[0] both work, as with sqlite3.Row."""

    __slots__ = ("_index", "_values")

    def __init__(self, values: Sequence[Any], index: dict[str, int]) -> None:
        self._values = values
        self._index = index

    def __getitem__(self, key: int | str) -> Any:
        return self._values[self._index[key] if isinstance(key, str) else key]

    def keys(self) -> list[str]:
        return list(self._index)

    def __iter__(self) -> Iterator[Any]:
        return iter(self._values)

    def __len__(self) -> int:
        return len(self._values)

    def __repr__(self) -> str:
        return f"Row({dict(zip(self._index, self._values, strict=True))})"


def _rows(cursor: Any) -> Callable[[Sequence[Any]], Any]:
    if cursor.description is None:
        return tuple
    index = {column.name: i for i, column in enumerate(cursor.description)}
    return functools.partial(Row, index=index)


_NAMED = re.compile(r"(?<![:\w]):([A-Za-z_]\w*)")


@functools.lru_cache(maxsize=1024)
def placeholders(sql: str) -> str:
    """sqlite3's placeholders in psycopg's style, outside string literals: `?` becomes `%s`
    and `:name` becomes `%(name)s` (a `::` cast stays); a literal `%` becomes `%%` (psycopg
    reads every `%` of a query that has parameters)."""
    parts = re.split(r"('(?:[^']|'')*')", sql)  # odd parts are string literals
    for i, part in enumerate(parts):
        part = part.replace("%", "%%")
        if i % 2 == 0:
            part = _NAMED.sub(r"%(\1)s", part.replace("?", "%s"))
        parts[i] = part
    return "".join(parts)


def _value(value: Any) -> Any:
    # Flags are integer columns on both backends; psycopg would send a bool as boolean.
    if isinstance(value, bool):
        return int(value)
    if isinstance(value, str) and ("\x00" in value or "\\u0000" in value):
        # PostgreSQL's text holds no NUL, nor its JSON one written as an escape: what a model
        # generated keeps its place as U+FFFD (requests with a NUL are refused at the edge).
        return value.replace("\x00", "\ufffd").replace("\\u0000", "\\ufffd")
    return value


def _values(parameters: Sequence[Any] | Mapping[str, Any]) -> Any:
    if isinstance(parameters, Mapping):
        return {name: _value(v) for name, v in parameters.items()}
    return tuple(_value(v) for v in parameters)


class PgConnection:
    """The writer's connection: autocommit, so that BEGIN ... COMMIT are the caller's."""

    def __init__(self, url: str) -> None:
        self.url = url
        self._open = False  # inside a transaction this connection began
        self._conn = self._connect()

    def _connect(self) -> psycopg.Connection[Any]:
        return psycopg.connect(
            self.url,
            autocommit=True,
            row_factory=_rows,
            connect_timeout=CONNECT_TIMEOUT_S,
            application_name="aip",
        )

    @property
    def raw(self) -> psycopg.Connection[Any]:
        return self._conn

    @property
    def in_transaction(self) -> bool:
        return self._conn.info.transaction_status != TransactionStatus.IDLE

    def execute(self, sql: str, parameters: Sequence[Any] | Mapping[str, Any] = (), /) -> Any:
        if sql.startswith("BEGIN"):
            self._reconnect_if_lost()
            self._open = True
            return self._conn.execute("BEGIN")
        if sql in ("COMMIT", "ROLLBACK"):
            self._open = False
        elif not self._open:
            self._reconnect_if_lost()  # a read outside any transaction
        if not parameters:
            return self._conn.execute(sql)
        return self._conn.execute(placeholders(sql), _values(parameters))

    def _reconnect_if_lost(self) -> None:
        """Between transactions only: inside one, the error belongs to its caller."""
        if self._conn.closed or self._conn.broken:
            log.warning("the database connection was lost; connecting again")
            self._conn = self._connect()

    def executemany(self, sql: str, seq_of_parameters: Iterable[Sequence[Any]], /) -> Any:
        cursor = self._conn.cursor()
        cursor.executemany(placeholders(sql), [_values(p) for p in seq_of_parameters])
        return cursor

    def close(self) -> None:
        self._conn.close()

"""What the store's SQL runs on: the part of a DB-API connection both backends give (sqlite3
as it is, PostgreSQL through store/postgres/connection.py): `?` or `:name` placeholders, rows
read by column name or position."""

from __future__ import annotations

from collections.abc import Iterable, Iterator, Mapping, Sequence
from typing import Any, Protocol


class Cursor(Protocol):
    @property
    def rowcount(self) -> int: ...

    def fetchone(self) -> Any: ...

    def fetchall(self) -> list[Any]: ...

    def __iter__(self) -> Iterator[Any]: ...


class Db(Protocol):
    @property
    def in_transaction(self) -> bool: ...

    def execute(
        self, sql: str, parameters: Sequence[Any] | Mapping[str, Any] = ..., /
    ) -> Cursor: ...

    def executemany(self, sql: str, seq_of_parameters: Iterable[Sequence[Any]], /) -> Cursor: ...

    def close(self) -> None: ...

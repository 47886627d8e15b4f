"""The one place where the store's SQL differs between SQLite and PostgreSQL: small functions of
the dialect's name ("sqlite" or "postgresql", as `conn.dialect.name` or `Queue.dialect` give it)
returning SQLAlchemy expressions or SQL text; every other query is written once for both."""

from __future__ import annotations

from collections.abc import Sequence
from typing import Any

from sqlalchemy import ColumnElement, Float, TableValuedAlias, case, cast, func, literal, text
from sqlalchemy.dialects.postgresql import JSONB
from sqlmodel import col

from service.store.tables import JobRow

SQLITE = "sqlite"
POSTGRESQL = "postgresql"


def _check(dialect: str) -> str:
    if dialect not in (SQLITE, POSTGRESQL):
        raise ValueError(f"no SQL for the {dialect!r} dialect")
    return dialect


def fts5_query(terms: Sequence[str]) -> str:
    """SQLite's FTS5 query: every term a quoted phrase (never FTS syntax), all required."""
    return " ".join('"' + t.replace('"', '""') + '"' for t in terms)


def tsquery(terms: Sequence[str]) -> str:
    """The same query for PostgreSQL's to_tsquery: every term a quoted lexeme (so no user text
    is tsquery syntax; a term the parser splits into words becomes a phrase, as in FTS5), all
    required (&)."""
    quoted = ("'" + t.replace("\\", "\\\\").replace("'", "''") + "'" for t in terms)
    return " & ".join(quoted)


# PostgreSQL's text search configuration (migrations/postgres/0004): case and diacritics folded
# as FTS5's unicode61 folds them; documents and queries must both go through it.
SEARCH_CONFIG = "aip_search"


def full_text(dialect: str, terms: Sequence[str]) -> ColumnElement[bool]:
    """Jobs whose prompt, reasoning or follow-ups hold every term, case and diacritics
    ignored on both backends."""
    if _check(dialect) == SQLITE:
        matches = text("SELECT rowid FROM jobs_fts WHERE jobs_fts MATCH :fts").bindparams(
            fts=fts5_query(terms)
        )
    else:
        matches = text(
            f"SELECT job_id FROM job_search WHERE document @@ to_tsquery('{SEARCH_CONFIG}', :tsq)"
        ).bindparams(tsq=tsquery(terms))
    return col(JobRow.id).in_(matches)


def utc_day(dialect: str, epoch_seconds: Any) -> ColumnElement[str]:
    """The UTC calendar day (YYYY-MM-DD) of a column of Unix seconds."""
    if _check(dialect) == SQLITE:
        return func.date(epoch_seconds, "unixepoch")
    return func.to_char(
        func.timezone("UTC", func.to_timestamp(epoch_seconds)), literal("YYYY-MM-DD")
    )


def json_number(dialect: str, column: Any, key: str) -> ColumnElement[float]:
    """The number under top-level `key` of a text column holding a JSON object."""
    if _check(dialect) == SQLITE:
        return func.json_extract(column, f"$.{key}")
    return cast(cast(column, JSONB).op("->>")(literal(key)), Float)


def object_keys(dialect: str, column: Any, path: Sequence[str] = ()) -> TableValuedAlias:
    """A table (column `key`) of the keys of the JSON object at `path` in a text column, to
    join to that column's table: no rows where the value there is missing or not an object."""
    if _check(dialect) == SQLITE:
        where = "$" + "".join(f".{p}" for p in path)
        found = func.json_type(column, where) == "object"
        keys = func.json_each(case((found, column)), where)
        return keys.table_valued("key")
    doc: Any = cast(column, JSONB)
    for key in path:
        doc = doc.op("->", return_type=JSONB)(literal(key))
    obj = case((func.jsonb_typeof(doc) == "object", doc))
    # A set-returning function's column is named by the alias: AS anon_1(key).
    return func.jsonb_object_keys(obj).table_valued("key").render_derived()


def json_text_sql(dialect: str, column: str, key: str) -> str:
    """SQL text: the value under top-level `key` of a text column holding a JSON object, as SQL
    text for PostgreSQL and as SQLite's json_extract gives it (false is 0 there, 'false' here)."""
    if _check(dialect) == SQLITE:
        return f"json_extract({column}, '$.{key}')"
    return f"({column}::jsonb ->> '{key}')"


def is_false_sql(dialect: str, column: str, key: str) -> str:
    """SQL text: the JSON object in a text column holds false (or 0) under `key`."""
    if _check(dialect) == SQLITE:
        return f"{json_text_sql(dialect, column, key)} = 0"
    return f"{json_text_sql(dialect, column, key)} IN ('false', '0')"


def distinct_from_sql(dialect: str) -> str:
    """The null-safe inequality operator (SQLite before 3.39 knows only IS NOT)."""
    return "IS NOT" if _check(dialect) == SQLITE else "IS DISTINCT FROM"


def skip_locked_sql(dialect: str) -> str:
    """What a claim's row select ends with: PostgreSQL's nodes pass over rows another node is
    taking; on SQLite the writer's transaction already excludes every other writer."""
    return "" if _check(dialect) == SQLITE else " FOR UPDATE SKIP LOCKED"


def bytewise(dialect: str, expression: Any) -> Any:
    """`expression` compared byte by byte, as SQLite's BINARY collation does, whatever the
    PostgreSQL database's locale."""
    return expression if _check(dialect) == SQLITE else expression.collate("C")


def bytewise_sql(dialect: str) -> str:
    """SQL text to follow a text expression in ORDER BY or a comparison: `bytewise`."""
    return "" if _check(dialect) == SQLITE else ' COLLATE "C"'

"""History filters: one validated JobFilter turned into SQL conditions, shared by the job list,
statistics and exports; and the opaque cursor for stable keyset pagination."""

from __future__ import annotations

import base64
import json
import math
import re
from dataclasses import dataclass, fields
from datetime import UTC, datetime
from typing import Any

from sqlalchemy import ColumnElement, and_, exists, func, or_, select
from sqlmodel import col

from service.errors import InvalidInput
from service.store.dialect import bytewise, fts5_query, full_text
from service.store.queue import STATUSES
from service.store.tables import DetectionRow, ImageRow, JobRow, ResultRow

SORTS = ("created", "finished")
SOURCES = ("api", "path", "inbox")
MAX_TEXT = 1000  # the longest text filter: a label, a folder, a source or the words of q
_CONTROL = re.compile(r"[\x00-\x1f\x7f]")


def parse_time(value: str, name: str) -> float:
    """ISO 8601 date or date-time (naive means UTC), or Unix seconds."""
    wrong = InvalidInput(
        f"{name}={value!r} is not a date or time (use e.g. 2026-11-23 or 2026-11-23T08:00:00Z)",
        code="invalid_filter",
    )
    try:
        seconds = float(value)
    except ValueError:
        pass
    else:
        # nan and inf parse as floats but name no moment; SQLite would read nan as NULL.
        if not math.isfinite(seconds):
            raise wrong
        return seconds
    try:
        moment = datetime.fromisoformat(value)
        if moment.tzinfo is None:
            moment = moment.replace(tzinfo=UTC)
        return moment.timestamp()
    except (ValueError, OverflowError):
        raise wrong from None


def parse_local_time(value: str, name: str) -> str:
    """Capture times are the camera's local time: compared as ISO text, no zone."""
    try:
        return datetime.fromisoformat(value).replace(tzinfo=None).isoformat()
    except ValueError:
        raise InvalidInput(
            f"{name}={value!r} is not a date or time", code="invalid_filter"
        ) from None


def fts_query(words: str) -> str:
    """Every word must appear (quoted, so user text can never be FTS syntax): SQLite's FTS5
    query, which JobFilter keeps as `q`. Control characters separate words: SQLite's FTS
    parser ends a query at NUL."""
    if len(words) > MAX_TEXT:
        raise InvalidInput(f"q is longer than {MAX_TEXT} characters", code="invalid_filter")
    terms = [w for w in _CONTROL.sub(" ", words).split() if w.strip()]
    if not terms:
        raise InvalidInput("q must contain at least one word", code="invalid_filter")
    return fts5_query(terms)


_QUOTED = re.compile(r'"((?:[^"]|"")*)"')


def fts_terms(query: str) -> list[str]:
    """The words of an `fts_query`, for the other backend's full text."""
    return [t.replace('""', '"') for t in _QUOTED.findall(query)]


def parse_bbox(value: str) -> tuple[float, float, float, float]:
    """`minlon,minlat,maxlon,maxlat` in degrees (WGS84); a box across the antimeridian has
    minlon > maxlon."""
    try:
        west, south, east, north = (float(part) for part in value.split(","))
    except ValueError:
        west = math.nan
    if not (
        -180 <= west <= 180 and -180 <= east <= 180 and -90 <= south <= north <= 90
    ):  # NaN fails every comparison
        raise InvalidInput(
            f"bbox={value[:100]!r} is not minlon,minlat,maxlon,maxlat in degrees "
            "(e.g. bbox=-0.13,51.50,-0.11,51.51)",
            code="invalid_filter",
        )
    return (west, south, east, north)


def parse_size(value: str) -> float:
    try:
        size = float(value)
    except ValueError:
        size = math.nan
    if not 0 <= size <= 100_000:
        raise InvalidInput(
            f"min_size_m={value[:100]!r} must be a size in metres, 0..100000",
            code="invalid_filter",
        )
    return size


def _overlaps(bbox: tuple[float, float, float, float]) -> list[ColumnElement[bool]]:
    """The frame's stored ground box overlaps `bbox`."""
    west, south, east, north = bbox
    lon_w, lon_e = col(ResultRow.west), col(ResultRow.east)
    lats = [col(ResultRow.south) <= north, col(ResultRow.north) >= south]
    if west <= east:
        return [lon_w <= east, lon_e >= west, *lats]
    return [or_(lon_e >= west, lon_w <= east), *lats]  # across the antimeridian


@dataclass(frozen=True)
class JobFilter:
    status: str | None = None
    source: str | None = None
    created_after: float | None = None
    created_before: float | None = None
    captured_after: str | None = None
    captured_before: str | None = None
    folder: str | None = None
    label: str | None = None
    min_count: int | None = None
    q: str | None = None
    bbox: tuple[float, float, float, float] | None = None  # west, south, east, north
    min_size_m: float | None = None
    flight: str | None = None
    # A flight grouped by capture time has no column to match: its jobs, resolved by the
    # caller (service/flights.py); they stand in for `flight`.
    job_ids: tuple[int, ...] | None = None
    no_flight: bool = False  # only jobs without a given flight (grouping by capture time)

    @classmethod
    def parse(cls, **raw: str | int | None) -> JobFilter:
        """From query-string values; anything malformed is a 422 with the reason."""
        given = {k: v for k, v in raw.items() if v not in (None, "")}
        status = given.get("status")
        if status is not None and status not in STATUSES:
            raise InvalidInput(
                f"unknown status {status!r}; use one of {', '.join(STATUSES)}",
                code="invalid_filter",
            )
        source = given.get("source")
        if source is not None and source not in SOURCES:
            raise InvalidInput(
                f"unknown source {str(source)[:100]!r}; use one of {', '.join(SOURCES)}",
                code="invalid_filter",
            )
        for name, value in given.items():  # q's control characters separate its words
            if name != "q" and isinstance(value, str) and "\x00" in value:
                raise InvalidInput(f"{name} holds a NUL character", code="invalid_filter")
        for name in ("folder", "label", "flight"):
            if len(str(given.get(name, ""))) > MAX_TEXT:
                raise InvalidInput(
                    f"{name} is longer than {MAX_TEXT} characters", code="invalid_filter"
                )
        min_count = given.get("min_count")
        if min_count is not None:
            if not isinstance(min_count, int) or not 1 <= min_count <= 1_000_000:
                raise InvalidInput(
                    "min_count must be a whole number 1..1000000", code="invalid_filter"
                )
            if "label" not in given and "min_size_m" not in given:
                raise InvalidInput(
                    "min_count needs a label or a min_size_m to count", code="invalid_filter"
                )
        values: dict[str, Any] = {
            "status": status,
            "source": source,
            # "/" or "" is the whole inbox: no folder condition.
            "folder": str(given["folder"]).strip("/") + "/"
            if str(given.get("folder", "")).strip("/")
            else None,
            "label": given.get("label"),
            "min_count": min_count,
            "q": fts_query(str(given["q"])) if "q" in given else None,
            "bbox": parse_bbox(str(given["bbox"])) if "bbox" in given else None,
            "min_size_m": parse_size(str(given["min_size_m"])) if "min_size_m" in given else None,
            "flight": str(given["flight"]) if "flight" in given else None,
        }
        for name in ("created_after", "created_before"):
            if name in given:
                values[name] = parse_time(str(given[name]), name)
        for name in ("captured_after", "captured_before"):
            if name in given:
                values[name] = parse_local_time(str(given[name]), name)
        return cls(**values)

    def as_query(self) -> dict[str, Any]:
        return {
            f.name: getattr(self, f.name)
            for f in fields(self)
            if getattr(self, f.name) and f.name not in ("job_ids", "no_flight")
        }

    def conditions(self, dialect: str) -> list[ColumnElement[bool]]:
        """Conditions over JobRow (ImageRow joined when capture time is asked for), in the SQL
        of `dialect` (service/store/dialect.py)."""
        where: list[ColumnElement[bool]] = []
        if self.status:
            where.append(col(JobRow.status) == self.status)
        if self.source:
            where.append(col(JobRow.source) == self.source)
        if self.created_after is not None:
            where.append(col(JobRow.created_at) >= self.created_after)
        if self.created_before is not None:
            where.append(col(JobRow.created_at) < self.created_before)
        if self.folder:
            # A range on the indexed column rather than LIKE: no escaping, uses the index.
            path = bytewise(dialect, col(JobRow.source_path))
            where.append(and_(path >= self.folder, path < self.folder[:-1] + "0"))
        if self.captured_after or self.captured_before:
            captured_at = bytewise(dialect, col(ImageRow.captured_at))
            captured = select(col(ImageRow.sha256)).where(col(ImageRow.captured_at).is_not(None))
            if self.captured_after:
                captured = captured.where(captured_at >= self.captured_after)
            if self.captured_before:
                captured = captured.where(captured_at < self.captured_before)
            where.append(col(JobRow.image_sha256).in_(captured))
        # Detections counted or required: of the label, at least min_size_m across.
        wanted = [col(DetectionRow.job_id) == col(JobRow.id)]
        if self.label:
            wanted.append(col(DetectionRow.label) == self.label)
        if self.min_size_m is not None:
            wanted.append(col(DetectionRow.size_m) >= self.min_size_m)
        if self.min_count:
            where.append(select(func.count()).where(*wanted).scalar_subquery() >= self.min_count)
        elif len(wanted) > 1:
            where.append(exists().where(*wanted))
        if self.bbox is not None:
            # Uncorrelated: the page's own query joins results, which would swallow its FROM.
            ground = select(col(ResultRow.job_id)).where(*_overlaps(self.bbox)).correlate(None)
            where.append(col(JobRow.id).in_(ground))
        if self.job_ids is not None:
            where.append(col(JobRow.id).in_(self.job_ids))
        elif self.flight:
            where.append(col(JobRow.flight) == self.flight)
        if self.no_flight:
            where.append(col(JobRow.flight).is_(None))
        if self.q:
            where.append(full_text(dialect, fts_terms(self.q)))
        return where


@dataclass(frozen=True)
class Cursor:
    """Where the previous page ended: the sort key and id of its last job."""

    sort: str
    key: float
    id: int

    def encode(self) -> str:
        raw = json.dumps([self.sort, self.key, self.id]).encode()
        return base64.urlsafe_b64encode(raw).decode().rstrip("=")

    @classmethod
    def decode(cls, value: str, sort: str) -> Cursor:
        try:
            raw = base64.urlsafe_b64decode(value + "=" * (-len(value) % 4))
            kind, key, job_id = json.loads(raw)
            cursor = cls(str(kind), float(key), int(job_id))
            if not (math.isfinite(cursor.key) and 0 < cursor.id < 2**63):
                raise ValueError
        except (ValueError, TypeError, OverflowError):
            raise InvalidInput(
                "cursor is not one this service issued", code="invalid_cursor"
            ) from None
        if cursor.sort != sort:
            raise InvalidInput("cursor belongs to another sort order", code="invalid_cursor")
        return cursor


def sort_column(sort: str) -> Any:
    if sort not in SORTS:
        raise InvalidInput(f"sort must be one of {', '.join(SORTS)}", code="invalid_filter")
    return col(JobRow.finished_at) if sort == "finished" else col(JobRow.created_at)


def after_cursor(sort: str, cursor: Cursor) -> ColumnElement[bool]:
    """Strictly after the cursor in (key desc, id desc) order."""
    key = sort_column(sort)
    return or_(key < cursor.key, and_(key == cursor.key, col(JobRow.id) < cursor.id))

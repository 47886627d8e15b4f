"""Read models: a job as the API shows it, and pages of jobs; reads only, never writes.

Each read runs whole on a read thread, in one transaction (one snapshot): one hop from the
event loop. It is SQLAlchemy Core over a blocking twin of the read engine, selecting the
columns a view needs as plain rows (no ORM objects), in as few statements as the view
allows: a job with its image and result in one, its detections, its attempts; a page is one
statement for its jobs and one for all their detections."""

from __future__ import annotations

import asyncio
import json
import math
from collections.abc import AsyncIterator, Callable, Sequence
from concurrent.futures import ThreadPoolExecutor
from datetime import UTC, datetime
from functools import partial
from types import SimpleNamespace
from typing import Any, TypeVar

from sqlalchemy import (
    Connection,
    Engine,
    Row,
    Select,
    bindparam,
    create_engine,
    event,
    join,
    select,
    text,
    true,
    union,
)
from sqlalchemy.ext.asyncio import AsyncEngine
from sqlmodel import col

from service.errors import InvalidInput, NotFound
from service.store.dialect import object_keys
from service.store.followups import FOLLOWUP_COLUMNS
from service.store.followups import view as followup_view
from service.store.history import Cursor, JobFilter, after_cursor, sort_column
from service.store.sqlite import BUSY_TIMEOUT_MS
from service.store.tables import (
    AttemptRow,
    DetectionRow,
    ImageColumns,
    ImageRow,
    JobRow,
    ResultRow,
)
from service.store.webhooks import COLUMNS as WEBHOOK_COLUMNS
from service.store.webhooks import view as webhook_view

MAX_PAGE = 200
# Exports read larger pages than a client may ask for: each page costs a hop, a statement's
# construction and its result set-up, whatever its size; at this size that is a few percent.
EXPORT_PAGE = 1000

# What a job's view shows, in one row: the job, its image and (when there is one) its result.
_VIEW_COLUMNS: tuple[Any, ...] = (
    col(JobRow.id),
    col(JobRow.status),
    col(JobRow.source),
    col(JobRow.source_path),
    col(JobRow.attempts),
    col(JobRow.max_attempts),
    col(JobRow.cancel_requested),
    col(JobRow.created_at),
    col(JobRow.started_at),
    col(JobRow.finished_at),
    col(JobRow.input_name),
    col(JobRow.params),
    col(JobRow.timings),
    col(JobRow.models),
    col(JobRow.error_code),
    col(JobRow.error_message),
    col(JobRow.flight),
    col(ImageRow.sha256),
    col(ImageRow.bytes),
    col(ImageRow.width),
    col(ImageRow.height),
    col(ImageRow.format),
    col(ImageRow.captured_at),
    col(ImageRow.exif),
    col(ImageRow.pruned_at),
    col(ResultRow.job_id).label("result_of"),
    col(ResultRow.reasoning),
    col(ResultRow.geo),
    # Last, so that a view without them (`_PLAIN_VIEWS`) keeps every other column's place.
    col(ResultRow.answer),
    col(ResultRow.citations),
    col(ResultRow.planned_queries),
    col(ResultRow.tiling),
)
_EXTRAS = 4  # the result's columns besides its text: not every projection reads them
# A view row's positions by column name, for readers that take a few columns of it.
_AT = SimpleNamespace(**{column.key: i for i, column in enumerate(_VIEW_COLUMNS)})
_DETECTION_COLUMNS: tuple[Any, ...] = (
    col(DetectionRow.job_id),
    col(DetectionRow.idx),
    col(DetectionRow.label),
    col(DetectionRow.x1),
    col(DetectionRow.y1),
    col(DetectionRow.x2),
    col(DetectionRow.y2),
    col(DetectionRow.mask),
    col(DetectionRow.geo),
    col(DetectionRow.size_m),
)


class JobImage(ImageColumns):
    """A job's stored image, with what decides which copy of it may be handed out: the
    classes the job redacts, and its redacted copy once written."""

    redacted_path: str | None = None  # relative to the data directory
    redact: tuple[str, ...] = ()
    job_status: str = ""


def _views(columns: Sequence[Any] = _VIEW_COLUMNS) -> Select[Any]:
    """The view's row for every job; callers add the conditions and the order."""
    return (
        select(*columns)
        .join_from(JobRow, ImageRow, col(ImageRow.sha256) == col(JobRow.image_sha256))
        .outerjoin(ResultRow, col(ResultRow.job_id) == col(JobRow.id))
    )


_ONE_JOB = _views().where(col(JobRow.id) == bindparam("id"))
_ALL_VIEWS = _views()  # statements are immutable: a page adds its conditions to a copy
_PLAIN_VIEWS = _views(_VIEW_COLUMNS[:-_EXTRAS])  # for projections in `_PLAIN`


def iso(ts: float | None) -> str | None:
    if ts is None:
        return None
    return datetime.fromtimestamp(ts, UTC).isoformat(timespec="milliseconds").replace("+00:00", "Z")


def _box(x1: float, y1: float, x2: float, y2: float) -> list[float]:
    return [round(x1, 2), round(y1, 2), round(x2, 2), round(y2, 2)]


def _mask(mask: str | None) -> Any:
    return json.loads(mask) if mask is not None else None


def _exif(exif: str | None) -> dict[str, Any] | None:
    return finite(json.loads(exif)) if exif else None


def _json(value: str | None) -> Any:
    return json.loads(value) if value is not None else None


def _detection_view(row: Sequence[Any], width: int, height: int) -> dict[str, Any]:
    _job_id, number, label, x1, y1, x2, y2, mask, geo, _size = row  # _DETECTION_COLUMNS
    out: dict[str, Any] = {
        "number": number,
        "label": label,
        "box": _box(x1, y1, x2, y2),
        "box_normalized": [
            round(x1 / width, 6),
            round(y1 / height, 6),
            round(x2 / width, 6),
            round(y2 / height, 6),
        ],
    }
    if mask is not None:
        out["mask"] = _mask(mask)
    if geo is not None:
        out["geo"] = _json(geo)
    return out


def finite(value: Any) -> Any:
    """`value` without NaN or infinities: dropped from objects, null in arrays. Intake no
    longer stores them, but rows written by older versions may hold them."""
    if isinstance(value, float):
        return value if math.isfinite(value) else None
    if isinstance(value, dict):
        return {
            k: finite(v)
            for k, v in value.items()
            if not (isinstance(v, float) and not math.isfinite(v))
        }
    if isinstance(value, list):
        return [finite(v) for v in value]
    return value


def job_view(
    row: Sequence[Any],
    detections: Sequence[Sequence[Any]],
    attempts: Sequence[Any] | None = None,
    followups: Sequence[Any] | None = None,
    webhooks: Sequence[Any] | None = None,
) -> dict[str, Any]:
    """A job as the API shows it, from its `_views()` row, its detection rows (in order) and,
    for a single job, its attempt rows and webhook deliveries; and its follow-up rows."""
    # _VIEW_COLUMNS, in order: unpacking is several times cheaper than `row.name` lookups.
    (
        job_id, status, source, source_path, attempts_so_far, max_attempts, cancel_requested,
        created_at, started_at, finished_at, input_name, params, timings, models, error_code,
        error_message, flight, sha256, size, width, height, image_format, captured_at, exif,
        pruned_at, result_of, reasoning, geo, answer, citations, planned_queries, tiling,
    ) = row  # fmt: skip
    view: dict[str, Any] = {
        "id": job_id,
        "status": status,
        "source": source,
        "source_path": source_path,
        "attempts": attempts_so_far,
        "max_attempts": max_attempts,
        "cancel_requested": bool(cancel_requested),
        "created_at": iso(created_at),
        "started_at": iso(started_at),
        "finished_at": iso(finished_at),
        "flight": flight,
        "input": {
            "name": input_name,
            "sha256": sha256,
            "bytes": size,
            "width": width,
            "height": height,
            "format": image_format,
            "captured_at": captured_at,
            "exif": _exif(exif),
            "stored": pruned_at is None,
        },
        "params": json.loads(params),
        "timings_ms": {k: round(v, 1) for k, v in json.loads(timings).items()} if timings else {},
        "models": json.loads(models) if models else {},
        "result": None,
        "error": {"code": error_code, "message": error_message} if error_code else None,
        "links": {"self": f"/v1/jobs/{job_id}", "image": f"/v1/jobs/{job_id}/image"},
    }
    if result_of is not None:
        view["result"] = {
            "detections": [_detection_view(d, width, height) for d in detections],
            "reasoning": reasoning,
            "answer": _json(answer),
            "citations": _json(citations) or [],  # jobs before citations were kept: none
            "planned_queries": _json(planned_queries),
            "tiling": _json(tiling),
            "geo": _json(geo),
        }
    if attempts is not None:
        view["attempt_history"] = [
            {
                "attempt": a.attempt,
                "worker": a.worker,
                "started_at": iso(a.started_at),
                "finished_at": iso(a.finished_at),
                "outcome": a.outcome or "running",
                "error": {"code": a.error_code, "message": a.error_message}
                if a.error_code
                else None,
            }
            for a in attempts
        ]
    if followups is not None:
        view["followups"] = [followup_view(job_id, f) for f in followups]
    if webhooks is not None:
        view["webhooks"] = [webhook_view(w) for w in webhooks]
    return view


# Projections: the parts of a job's view one reader writes, every value built by the same
# helpers as in `job_view`, so it is the view's own. An export builds only what it writes:
# the full view is most of an export's time (timestamps, JSON columns, normalised boxes).
Projection = Callable[[Sequence[Any], Sequence[Sequence[Any]]], dict[str, Any] | None]


def listed_view(row: Sequence[Any], detections: Sequence[Sequence[Any]]) -> dict[str, Any]:
    """The job, its input with EXIF, and its result's numbered, labelled boxes with where they
    are on the ground, reasoning and structured answer: no parameters, timings, models,
    normalised boxes, masks, citations, planned queries, tiling, attempts or follow-ups."""
    width, height = row[_AT.width], row[_AT.height]
    view: dict[str, Any] = {
        "id": row[_AT.id],
        "status": row[_AT.status],
        "source": row[_AT.source],
        "source_path": row[_AT.source_path],
        "created_at": iso(row[_AT.created_at]),
        "finished_at": iso(row[_AT.finished_at]),
        "input": {
            "name": row[_AT.input_name],
            "width": width,
            "height": height,
            "captured_at": row[_AT.captured_at],
            "exif": _exif(row[_AT.exif]),
        },
        "result": None,
    }
    if row[_AT.result_of] is not None:
        view["result"] = {
            "detections": [
                {
                    "number": d[1],
                    "label": d[2],
                    "box": _box(d[3], d[4], d[5], d[6]),
                    "geo": _json(d[8]),
                }
                for d in detections
            ],
            "reasoning": row[_AT.reasoning],
            "answer": _json(row[_AT.answer]),
        }
    return view


def located_view(row: Sequence[Any], detections: Sequence[Sequence[Any]]) -> dict[str, Any] | None:
    """A job whose EXIF holds a GPS position: its name, status, flight, capture time, EXIF,
    and its result's numbered labels with where they are on the ground, the frame's ground
    geometry and reasoning; None for any other job."""
    input_exif = _exif(row[_AT.exif])
    if not (input_exif and input_exif.get("gps")):
        return None
    view: dict[str, Any] = {
        "id": row[_AT.id],
        "status": row[_AT.status],
        "flight": row[_AT.flight],
        "input": {
            "name": row[_AT.input_name],
            "captured_at": row[_AT.captured_at],
            "exif": input_exif,
        },
        "result": None,
    }
    if row[_AT.result_of] is not None:
        view["result"] = {
            "detections": [{"number": d[1], "label": d[2], "geo": _json(d[8])} for d in detections],
            "reasoning": row[_AT.reasoning],
            "geo": _json(row[_AT.geo]),
        }
    return view


def flown_view(row: Sequence[Any], detections: Sequence[Sequence[Any]]) -> dict[str, Any] | None:
    """What grouping into flights reads of a job with a flight or a capture time: its flight,
    capture time and EXIF, its detections' labels and ground sizes, and the frame's ground
    geometry; None for any other job."""
    if row[_AT.flight] is None and row[_AT.captured_at] is None:
        return None
    view: dict[str, Any] = {
        "id": row[_AT.id],
        "status": row[_AT.status],
        "flight": row[_AT.flight],
        "input": {"captured_at": row[_AT.captured_at], "exif": _exif(row[_AT.exif])},
        "result": None,
    }
    if row[_AT.result_of] is not None:
        view["result"] = {
            "detections": [{"label": d[2], "size_m": d[9]} for d in detections],
            "geo": _json(row[_AT.geo]),
        }
    return view


def annotated_view(
    row: Sequence[Any], detections: Sequence[Sequence[Any]]
) -> dict[str, Any] | None:
    """A job with a result: its source path, input name and size, and its result's labelled
    boxes with their masks; None for a job without one."""
    if row[_AT.result_of] is None:
        return None
    found = []
    for d in detections:
        detection = {"label": d[2], "box": _box(d[3], d[4], d[5], d[6])}
        if d[7] is not None:
            detection["mask"] = _mask(d[7])
        found.append(detection)
    return {
        "id": row[_AT.id],
        "source_path": row[_AT.source_path],
        "input": {"name": row[_AT.input_name], "width": row[_AT.width], "height": row[_AT.height]},
        "result": {"detections": found},
    }


# Projections that read none of the result's extra columns: their pages select without them.
_PLAIN: frozenset[Projection] = frozenset({located_view, annotated_view, flown_view})

# One job's rows; the view row itself is _ONE_JOB.
_ITS_DETECTIONS = (
    select(*_DETECTION_COLUMNS)
    .where(col(DetectionRow.job_id) == bindparam("id"))
    .order_by(col(DetectionRow.idx))
)
_THEIR_DETECTIONS = (
    select(*_DETECTION_COLUMNS)
    .where(col(DetectionRow.job_id).in_(bindparam("ids", expanding=True)))
    .order_by(col(DetectionRow.job_id), col(DetectionRow.idx))
)
_ITS_ATTEMPTS = (
    select(
        col(AttemptRow.attempt),
        col(AttemptRow.worker),
        col(AttemptRow.started_at),
        col(AttemptRow.finished_at),
        col(AttemptRow.outcome),
        col(AttemptRow.error_code),
        col(AttemptRow.error_message),
    )
    .where(col(AttemptRow.job_id) == bindparam("id"))
    .order_by(col(AttemptRow.id))
)
_ITS_IMAGE: Select[Any] = (
    select(
        *(col(getattr(ImageRow, name)) for name in ImageRow.model_fields),
        col(ResultRow.redacted_path),
        col(JobRow.params),
        col(JobRow.status).label("job_status"),
    )
    .join_from(JobRow, ImageRow, col(ImageRow.sha256) == col(JobRow.image_sha256))
    .outerjoin(ResultRow, col(ResultRow.job_id) == col(JobRow.id))
    .where(col(JobRow.id) == bindparam("id"))
)
# Counts in the claim's order (store/queue.py `claim`: run_after, then id).
_QUEUE_POSITION = text(
    "SELECT count(*) FROM jobs AS me JOIN jobs AS ahead"
    " ON ahead.status = 'queued' AND (ahead.run_after < me.run_after"
    "  OR (ahead.run_after = me.run_after AND ahead.id <= me.id))"
    " WHERE me.id = :id AND me.status = 'queued'"
)

T = TypeVar("T")
# The view row, its detections, attempts, follow-ups and webhook deliveries.
JobRows = tuple[Any, Sequence[Any], Sequence[Any], Sequence[Any], Sequence[Any]]
_ITS_FOLLOWUPS = text(f"SELECT {FOLLOWUP_COLUMNS} FROM followups WHERE job_id = :id ORDER BY n")
_ITS_WEBHOOKS = text(
    f"SELECT {WEBHOOK_COLUMNS} FROM webhook_deliveries WHERE job_id = :id ORDER BY created_at, id"
)
_THEIR_FOLLOWUPS = text(
    f"SELECT job_id, {FOLLOWUP_COLUMNS} FROM followups WHERE job_id IN :ids ORDER BY job_id, n"
).bindparams(bindparam("ids", expanding=True))
READ_THREADS = 4


def blocking_twin(engine: AsyncEngine, *, pool_size: int = READ_THREADS) -> Engine:
    """A blocking engine on `engine`'s database, through its backend's default driver, for
    reads run whole on a read thread. On SQLite the driver begins no transaction before a
    SELECT, so the engine sends BEGIN itself (SQLAlchemy's documented pysqlite recipe): a
    read of several statements is one snapshot, which WAL mode does not give otherwise."""
    backend = engine.url.get_backend_name()
    # SQLite's async driver wraps the blocking one; psycopg 3 is both (its name stays).
    url = engine.url.set(drivername=backend) if backend == "sqlite" else engine.url
    twin = create_engine(url, pool_size=pool_size, pool_pre_ping=backend != "sqlite")
    if backend == "sqlite":

        @event.listens_for(twin, "connect")
        def _connect(dbapi_conn: Any, _record: Any) -> None:
            dbapi_conn.isolation_level = None
            dbapi_conn.execute(f"PRAGMA busy_timeout={BUSY_TIMEOUT_MS}")
            dbapi_conn.execute("PRAGMA query_only=ON")

        @event.listens_for(twin, "begin")
        def _begin(conn: Connection) -> None:
            conn.exec_driver_sql("BEGIN")

    return twin


class Reader:
    """Runs a read function on one of a few read threads, in one transaction: one hop from
    the event loop per read, however many statements it makes."""

    def __init__(self, engine: Engine, threads: int = READ_THREADS) -> None:
        self.engine = engine
        self._threads = ThreadPoolExecutor(threads, thread_name_prefix="aip-db-read")

    async def run(self, fn: Callable[[Connection], T]) -> T:
        def read() -> T:
            with self.engine.connect() as conn:  # begins at the first statement
                return fn(conn)  # leaving rolls the read-only transaction back

        return await asyncio.get_running_loop().run_in_executor(self._threads, read)

    async def close(self) -> None:
        await asyncio.to_thread(self._threads.shutdown)
        self.engine.dispose()


def _job_rows(conn: Connection, job_id: int) -> JobRows:
    row = conn.execute(_ONE_JOB, {"id": job_id}).first()
    if row is None:
        raise NotFound(f"job {job_id} does not exist", code="job_not_found")
    detections = conn.execute(_ITS_DETECTIONS, {"id": job_id}).all() if row.result_of else ()
    attempts = conn.execute(_ITS_ATTEMPTS, {"id": job_id}).all()
    followups = conn.execute(_ITS_FOLLOWUPS, {"id": job_id}).all()
    return row, detections, attempts, followups, conn.execute(_ITS_WEBHOOKS, {"id": job_id}).all()


class Reads:
    def __init__(self, engine: AsyncEngine) -> None:
        self.engine = engine  # statistics (store/stats.py) aggregate through it
        self._reader = Reader(blocking_twin(engine))

    async def close(self) -> None:
        await self._reader.close()
        await self.engine.dispose()

    @staticmethod
    async def _job_and_image(reader: Reader, job_id: int) -> JobRows:
        """The job's view row (job, image, result), its detections, its attempts, its
        follow-ups and its webhook deliveries: one read, one snapshot."""
        return await reader.run(partial(_job_rows, job_id=job_id))

    async def job(self, job_id: int) -> dict[str, Any]:
        return job_view(*await self._job_and_image(self._reader, job_id))

    async def image_of(self, job_id: int) -> JobImage:
        def read(conn: Connection) -> Row[Any] | None:
            return conn.execute(_ITS_IMAGE, {"id": job_id}).first()

        row = await self._reader.run(read)
        if row is None:
            raise NotFound(f"job {job_id} does not exist", code="job_not_found")
        fields = dict(row._mapping)
        params = json.loads(fields.pop("params"))
        return JobImage.model_validate({**fields, "redact": params.get("redact") or ()})

    async def stream(
        self,
        where: JobFilter,
        *,
        sort: str = "created",
        batch: int = EXPORT_PAGE,
        project: Projection | None = None,
    ) -> AsyncIterator[list[dict[str, Any]]]:
        """Every matching job, newest first, as pages of views (one query for the jobs and one
        for their detections per page), or of what `project` builds of each job, leaving out
        jobs it gives None for. The first page is read before this returns, so a query the
        database refuses fails here, while an export can still answer with an error status
        rather than a body cut short."""
        first = await self.page(where, sort=sort, limit=batch, project=project, largest=batch)

        async def pages() -> AsyncIterator[list[dict[str, Any]]]:
            page = first
            while True:
                if page["jobs"]:
                    yield page["jobs"]
                if page["next_cursor"] is None:
                    return
                page = await self.page(
                    where, sort=sort, cursor=page["next_cursor"], limit=batch, project=project,
                    largest=batch,
                )  # fmt: skip

        return pages()

    async def page(
        self,
        where: JobFilter | None = None,
        *,
        sort: str = "created",
        cursor: str | None = None,
        limit: int = 50,
        project: Projection | None = None,
        largest: int = MAX_PAGE,
    ) -> dict[str, Any]:
        """Newest first by created or finished time. Keyset pagination on (time, id): jobs
        arriving or finishing while a client pages land before its first page, so pages
        never skip or repeat a job. With `project`, the page holds what it builds of each
        job instead of its full view (see `Projection`). A client's `limit` is at most
        MAX_PAGE; `largest` lets an export read larger pages."""
        if not 1 <= limit <= largest:
            raise InvalidInput(f"limit must be 1..{largest}", code="invalid_filter")
        key = sort_column(sort)
        query = _PLAIN_VIEWS if project in _PLAIN else _ALL_VIEWS
        for condition in (where or JobFilter()).conditions(self.engine.dialect.name):
            query = query.where(condition)
        if sort == "finished":
            query = query.where(key.is_not(None))
        if cursor is not None:
            query = query.where(after_cursor(sort, Cursor.decode(cursor, sort)))
        query = query.order_by(key.desc(), col(JobRow.id).desc()).limit(limit + 1)

        def read(conn: Connection) -> dict[str, Any]:
            rows = conn.execute(query).all()
            more = len(rows) > limit
            rows = rows[:limit]
            detections: dict[int, list[Any]] = {}
            with_result = [row.id for row in rows if row.result_of is not None]
            if with_result:
                # One prepared statement, fetched whole: building an IN of a page of ids
                # and fetching row by row cost more than the rows themselves.
                for d in conn.execute(_THEIR_DETECTIONS, {"ids": with_result}).all():
                    detections.setdefault(d[0], []).append(d)
            next_cursor = None
            if more and rows:
                last = rows[-1]
                last_key = last.finished_at if sort == "finished" else last.created_at
                next_cursor = Cursor(sort, float(last_key or 0), int(last.id)).encode()
            # Built on the read thread too: a page of 200 views is milliseconds of Python
            # the event loop need not spend.
            if project is not None:
                built = [project(row, detections.get(row.id, ())) for row in rows]
                return {"jobs": [b for b in built if b is not None], "next_cursor": next_cursor}
            asked: dict[int, list[Any]] = {row.id: [] for row in rows}
            if asked:
                for f in conn.execute(_THEIR_FOLLOWUPS, {"ids": list(asked)}):
                    asked[f[0]].append(f[1:])
            jobs = [job_view(row, detections.get(row.id, ()), None, asked[row.id]) for row in rows]
            return {"jobs": jobs, "next_cursor": next_cursor}

        return await self._reader.run(read)

    async def answer_fields(self, where: JobFilter) -> list[str]:
        """The top-level fields of the structured answers of the matching jobs, sorted: those
        stored, and those the schemas of jobs not finished yet name, which an export that
        runs while they finish may meet. One snapshot; JSON parsed only for jobs with an
        answer and for unfinished ones."""
        dialect = self.engine.dialect.name
        conditions = where.conditions(dialect)
        answers = object_keys(dialect, col(ResultRow.answer))
        stored = (
            select(answers.c.key)
            .select_from(
                join(JobRow, ResultRow, col(ResultRow.job_id) == col(JobRow.id)).join(
                    answers, true()
                )
            )
            .where(col(ResultRow.answer).is_not(None), *conditions)
        )
        pending = object_keys(dialect, col(JobRow.params), ("response_schema", "properties"))
        promised = (
            select(pending.c.key)
            .select_from(join(JobRow, pending, true()))
            .where(col(JobRow.status).in_(("queued", "running")), *conditions)
        )
        query = union(stored, promised)

        def read(conn: Connection) -> list[str]:
            return sorted(str(key) for key in conn.execute(query).scalars())  # code points

        return await self._reader.run(read)

    async def run(self, fn: Callable[[Connection], T]) -> T:
        """`fn` on a read thread, in one snapshot: reads other store modules define."""
        return await self._reader.run(fn)

    async def queue_position(self, job_id: int) -> int | None:
        """1 for the job the worker claims next; None unless the job is queued."""

        def read(conn: Connection) -> int:
            return int(conn.execute(_QUEUE_POSITION, {"id": job_id}).scalar_one())

        return await self._reader.run(read) or None

"""Read models: a job as the API shows it, and pages of jobs; reads only, never writes."""

from __future__ import annotations

import json
import math
from collections.abc import AsyncIterator, Sequence
from datetime import UTC, datetime
from typing import Any

from sqlalchemy import text
from sqlalchemy.ext.asyncio import AsyncEngine
from sqlmodel import col, select
from sqlmodel.ext.asyncio.session import AsyncSession

from service.errors import InvalidInput, NotFound
from service.store.history import Cursor, JobFilter, after_cursor, sort_column
from service.store.tables import AttemptRow, DetectionRow, ImageRow, JobRow, ResultRow

MAX_PAGE = 200


def iso(ts: float | None) -> str | None:
    if ts is None:
        return None
    return datetime.fromtimestamp(ts, UTC).isoformat(timespec="milliseconds").replace("+00:00", "Z")


def _detection_view(row: DetectionRow, image: ImageRow) -> dict[str, Any]:
    box = [row.x1, row.y1, row.x2, row.y2]
    out: dict[str, Any] = {
        "number": row.idx,
        "label": row.label,
        "box": [round(v, 2) for v in box],
        "box_normalized": [
            round(box[0] / image.width, 6),
            round(box[1] / image.height, 6),
            round(box[2] / image.width, 6),
            round(box[3] / image.height, 6),
        ],
    }
    if row.mask is not None:
        out["mask"] = json.loads(row.mask)
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
    job: JobRow,
    image: ImageRow,
    result: ResultRow | None,
    detections: Sequence[DetectionRow],
    attempts: Sequence[AttemptRow] | None = None,
) -> dict[str, Any]:
    view: dict[str, Any] = {
        "id": job.id,
        "status": job.status,
        "source": job.source,
        "source_path": job.source_path,
        "attempts": job.attempts,
        "max_attempts": job.max_attempts,
        "cancel_requested": bool(job.cancel_requested),
        "created_at": iso(job.created_at),
        "started_at": iso(job.started_at),
        "finished_at": iso(job.finished_at),
        "input": {
            "name": job.input_name,
            "sha256": image.sha256,
            "bytes": image.bytes,
            "width": image.width,
            "height": image.height,
            "format": image.format,
            "captured_at": image.captured_at,
            "exif": finite(json.loads(image.exif)) if image.exif else None,
            "stored": image.pruned_at is None,
        },
        "params": json.loads(job.params),
        "timings_ms": {k: round(v, 1) for k, v in json.loads(job.timings or "{}").items()},
        "models": json.loads(job.models or "{}"),
        "result": None,
        "error": (
            {"code": job.error_code, "message": job.error_message} if job.error_code else None
        ),
        "links": {"self": f"/v1/jobs/{job.id}", "image": f"/v1/jobs/{job.id}/image"},
    }
    if result is not None:
        view["result"] = {
            "detections": [_detection_view(d, image) for d in detections],
            "reasoning": result.reasoning,
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
    return view


async def _snapshot(session: AsyncSession) -> None:
    """Make the session's reads one transaction: in WAL mode each statement outside one sees
    the latest commit, so a job row and its attempts read a moment apart could disagree."""
    await session.execute(text("BEGIN"))


class Reads:
    def __init__(self, engine: AsyncEngine) -> None:
        self.engine = engine

    async def close(self) -> None:
        await self.engine.dispose()

    @staticmethod
    async def _job_and_image(session: AsyncSession, job_id: int) -> tuple[JobRow, ImageRow]:
        job = await session.get(JobRow, job_id)
        if job is None:
            raise NotFound(f"job {job_id} does not exist", code="job_not_found")
        image = await session.get(ImageRow, job.image_sha256)
        assert image is not None  # a foreign key guarantees it
        return job, image

    async def job(self, job_id: int) -> dict[str, Any]:
        async with AsyncSession(self.engine) as session:
            await _snapshot(session)
            job, image = await self._job_and_image(session, job_id)
            result = await session.get(ResultRow, job_id)
            detections = (
                await session.exec(
                    select(DetectionRow)
                    .where(DetectionRow.job_id == job_id)
                    .order_by(col(DetectionRow.idx))
                )
            ).all()
            attempts = (
                await session.exec(
                    select(AttemptRow)
                    .where(AttemptRow.job_id == job_id)
                    .order_by(col(AttemptRow.id))
                )
            ).all()
            return job_view(job, image, result, detections, attempts)

    async def image_of(self, job_id: int) -> ImageRow:
        async with AsyncSession(self.engine) as session:
            return (await self._job_and_image(session, job_id))[1]

    async def stream(
        self, where: JobFilter, *, sort: str = "created", batch: int = 200
    ) -> AsyncIterator[dict[str, Any]]:
        """Every matching job, newest first, read a page at a time. The first page is read
        before this returns, so a query the database refuses fails here, while an export can
        still answer with an error status rather than a body cut short."""
        first = await self.page(where, sort=sort, limit=batch)

        async def jobs() -> AsyncIterator[dict[str, Any]]:
            page = first
            while True:
                for job in page["jobs"]:
                    yield job
                if page["next_cursor"] is None:
                    return
                page = await self.page(where, sort=sort, cursor=page["next_cursor"], limit=batch)

        return jobs()

    async def page(
        self,
        where: JobFilter | None = None,
        *,
        sort: str = "created",
        cursor: str | None = None,
        limit: int = 50,
    ) -> dict[str, Any]:
        """Newest first by created or finished time. Keyset pagination on (time, id): jobs
        arriving or finishing while a client pages land before its first page, so pages
        never skip or repeat a job."""
        if not 1 <= limit <= MAX_PAGE:
            raise InvalidInput(f"limit must be 1..{MAX_PAGE}", code="invalid_filter")
        key = sort_column(sort)
        query = (
            select(JobRow, ImageRow, ResultRow)
            .join(ImageRow, col(ImageRow.sha256) == col(JobRow.image_sha256))
            .outerjoin(ResultRow, col(ResultRow.job_id) == col(JobRow.id))
        )
        for condition in (where or JobFilter()).conditions():
            query = query.where(condition)
        if sort == "finished":
            query = query.where(key.is_not(None))
        if cursor is not None:
            query = query.where(after_cursor(sort, Cursor.decode(cursor, sort)))
        query = query.order_by(key.desc(), col(JobRow.id).desc()).limit(limit + 1)
        async with AsyncSession(self.engine) as session:
            await _snapshot(session)
            rows = (await session.exec(query)).all()
            more = len(rows) > limit
            rows = rows[:limit]
            ids = [job.id for job, _, _ in rows]
            detections: dict[int, list[DetectionRow]] = {}
            if ids:
                found = await session.exec(
                    select(DetectionRow)
                    .where(col(DetectionRow.job_id).in_(ids))
                    .order_by(col(DetectionRow.job_id), col(DetectionRow.idx))
                )
                for d in found.all():
                    detections.setdefault(d.job_id, []).append(d)
        jobs = [
            job_view(job, image, result, detections.get(job.id or 0, []))
            for job, image, result in rows
        ]
        next_cursor = None
        if more and rows:
            last = rows[-1][0]
            last_key = last.finished_at if sort == "finished" else last.created_at
            next_cursor = Cursor(sort, float(last_key or 0), int(last.id or 0)).encode()
        return {"jobs": jobs, "next_cursor": next_cursor}

    async def queue_position(self, job_id: int) -> int | None:
        """1 for the job the worker claims next; None unless the job is queued. Counts in
        the claim's order (store/queue.py `claim`: run_after, then id)."""
        async with AsyncSession(self.engine) as session:
            found = await session.execute(
                text(
                    "SELECT count(*) FROM jobs AS me JOIN jobs AS ahead"
                    " ON ahead.status = 'queued' AND (ahead.run_after < me.run_after"
                    "  OR (ahead.run_after = me.run_after AND ahead.id <= me.id))"
                    " WHERE me.id = :id AND me.status = 'queued'"
                ),
                {"id": job_id},
            )
            position = int(found.scalar_one())
        return position or None

"""Statistics over the jobs a JobFilter selects: by status, per day, per label, stage timings."""

from __future__ import annotations

from typing import Any

from sqlalchemy import func, select
from sqlalchemy.ext.asyncio import AsyncEngine
from sqlmodel import col

from service.store.dialect import bytewise, json_number, utc_day
from service.store.history import JobFilter
from service.store.tables import DetectionRow, JobRow

STAGES = ("queue_wait", "decode", "detect", "reason", "persist", "total")


async def job_stats(engine: AsyncEngine, where: JobFilter) -> dict[str, Any]:
    dialect = engine.dialect.name
    chosen = select(col(JobRow.id))
    for condition in where.conditions(dialect):
        chosen = chosen.where(condition)
    in_chosen = col(JobRow.id).in_(chosen)
    day = utc_day(dialect, col(JobRow.created_at))
    timing_columns = [
        func.avg(json_number(dialect, col(JobRow.timings), stage)).label(stage) for stage in STAGES
    ]
    async with engine.connect() as conn:
        by_status = (
            await conn.execute(
                select(col(JobRow.status), func.count())
                .where(in_chosen)
                .group_by(col(JobRow.status))
            )
        ).all()
        per_day = (
            await conn.execute(
                select(day, func.count()).where(in_chosen).group_by(day).order_by(day)
            )
        ).all()
        labels = (
            await conn.execute(
                select(
                    col(DetectionRow.label),
                    func.count(),
                    func.count(func.distinct(col(DetectionRow.job_id))),
                )
                .where(col(DetectionRow.job_id).in_(chosen))
                .group_by(col(DetectionRow.label))
                .order_by(func.count().desc(), bytewise(dialect, col(DetectionRow.label)))
            )
        ).all()
        timings = (
            await conn.execute(
                select(*timing_columns).where(in_chosen, col(JobRow.status) == "succeeded")
            )
        ).one()
    statuses = {status: count for status, count in by_status}
    return {
        "filter": where.as_query(),
        "jobs": sum(statuses.values()),
        "by_status": statuses,
        "per_day": [{"day": d, "jobs": n} for d, n in per_day],
        "detections_per_label": {
            label: {"detections": n, "jobs": jobs} for label, n, jobs in labels
        },
        "mean_timings_ms": {
            stage: round(value, 1)
            for stage, value in zip(STAGES, timings, strict=True)
            if value is not None
        },
    }

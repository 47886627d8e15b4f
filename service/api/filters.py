"""The history filters as query parameters, shared by the job list, statistics and exports."""

from __future__ import annotations

from fastapi import Query

from service.store.history import JobFilter


def job_filter(
    status: str | None = Query(None, description="queued|running|succeeded|failed|cancelled"),
    source: str | None = Query(None, description="api|path|inbox"),
    created_after: str | None = Query(None, description="ISO 8601 date/time (UTC) or Unix s"),
    created_before: str | None = Query(None, description="ISO 8601 date/time (UTC) or Unix s"),
    captured_after: str | None = Query(None, description="EXIF capture time (camera local)"),
    captured_before: str | None = Query(None, description="EXIF capture time (camera local)"),
    folder: str | None = Query(None, description="inbox subfolder, e.g. flights/2026-11-17"),
    label: str | None = Query(None, description="jobs with a detection of this label"),
    min_count: int | None = Query(None, description="... at least this many of them"),
    q: str | None = Query(None, description="words that must all appear in prompt or reasoning"),
) -> JobFilter:
    return JobFilter.parse(
        status=status,
        source=source,
        created_after=created_after,
        created_before=created_before,
        captured_after=captured_after,
        captured_before=captured_before,
        folder=folder,
        label=label,
        min_count=min_count,
        q=q,
    )

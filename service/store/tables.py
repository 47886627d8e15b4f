"""SQLModel mirrors of the tables that `migrations/` creates, for typed reads (never DDL)."""

from __future__ import annotations

from sqlmodel import Field, SQLModel


class ImageColumns(SQLModel):
    """The images table's columns, for views that add to them (store/reads.py JobImage)."""

    sha256: str = Field(primary_key=True)
    bytes: int
    width: int
    height: int
    format: str
    path: str
    exif: str | None = None
    created_at: float
    captured_at: str | None = None
    pruned_at: float | None = None


class ImageRow(ImageColumns, table=True):
    __tablename__ = "images"


class JobRow(SQLModel, table=True):
    __tablename__ = "jobs"

    id: int | None = Field(default=None, primary_key=True)
    status: str
    source: str
    image_sha256: str = Field(foreign_key="images.sha256")
    input_name: str
    params: str
    attempts: int
    max_attempts: int
    run_after: float
    lease_owner: str | None = None
    lease_until: float | None = None
    created_at: float
    started_at: float | None = None
    finished_at: float | None = None
    error_code: str | None = None
    error_message: str | None = None
    timings: str | None = None
    models: str | None = None
    cancel_requested: int = 0
    idempotency_key: str | None = None
    request_hash: str | None = None
    source_path: str | None = None
    attempt_budget: int | None = None
    queued_at: float | None = None
    flight: str | None = None


class InboxFileRow(SQLModel, table=True):
    __tablename__ = "inbox_files"

    id: int | None = Field(default=None, primary_key=True)
    relative_path: str
    sha256: str | None = None
    size: int
    mtime_ns: int
    outcome: str
    job_id: int | None = Field(default=None, foreign_key="jobs.id")
    error_code: str | None = None
    error_message: str | None = None
    filed_to: str | None = None
    seen_at: float


class ResultRow(SQLModel, table=True):
    __tablename__ = "results"

    job_id: int = Field(primary_key=True, foreign_key="jobs.id")
    reasoning: str
    created_at: float
    answer: str | None = None
    citations: str | None = None
    planned_queries: str | None = None
    tiling: str | None = None
    redacted_path: str | None = None
    geo: str | None = None
    west: float | None = None
    south: float | None = None
    east: float | None = None
    north: float | None = None


class DetectionRow(SQLModel, table=True):
    __tablename__ = "detections"

    job_id: int = Field(primary_key=True, foreign_key="results.job_id")
    idx: int = Field(primary_key=True)
    label: str
    x1: float
    y1: float
    x2: float
    y2: float
    mask: str | None = None
    geo: str | None = None
    size_m: float | None = None


class AttemptRow(SQLModel, table=True):
    __tablename__ = "job_attempts"

    id: int | None = Field(default=None, primary_key=True)
    job_id: int = Field(foreign_key="jobs.id")
    attempt: int
    worker: str
    started_at: float
    finished_at: float | None = None
    outcome: str | None = None
    error_code: str | None = None
    error_message: str | None = None

"""Scheduling decisions as pure functions: retry backoff and which failures are worth a retry."""

from __future__ import annotations

import random

from service.errors import JobFailure


def backoff_seconds(
    attempt: int, *, base: float = 2.0, cap: float = 300.0, rand: random.Random | None = None
) -> float:
    """Exponential backoff with full jitter: uniform in [0, min(cap, base * 2**(attempt-1))]."""
    ceiling = min(cap, base * 2 ** max(attempt - 1, 0))
    return (rand or random).uniform(0.0, ceiling)


def pause_seconds(failures: int, *, base: float = 1.0, cap: float = 60.0) -> float:
    """How long to wait after `failures` failures in a row of something that cannot work until
    the world changes (a full disk): base, 2 x base, 4 x base ... up to `cap`, no jitter."""
    return float(min(cap, base * 2 ** max(failures - 1, 0)))


def classify(exc: BaseException) -> JobFailure:
    """Map an exception raised while running a job to a failure the queue understands."""
    if isinstance(exc, JobFailure):
        return exc
    if isinstance(exc, MemoryError):
        return JobFailure("out_of_memory", "the model ran out of memory", transient=True)
    text = str(exc).strip().splitlines()[0][:500] if str(exc).strip() else ""
    message = f"{type(exc).__name__}: {text}" if text else type(exc).__name__
    if "database is locked" in text or "database is busy" in text:
        return JobFailure("database_busy", message, transient=True)
    return JobFailure("model_error", message, transient=True)

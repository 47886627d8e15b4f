-- Every attempt's outcome is kept; cancellation is requested, then honoured by the worker;
-- submissions may carry an idempotency key.

CREATE TABLE job_attempts (
    id             INTEGER PRIMARY KEY AUTOINCREMENT,
    job_id         INTEGER NOT NULL REFERENCES jobs (id) ON DELETE CASCADE,
    attempt        INTEGER NOT NULL,
    worker         TEXT NOT NULL,
    started_at     REAL NOT NULL,
    finished_at    REAL,
    outcome        TEXT,                -- succeeded | failed | retrying | cancelled | released | lost
    error_code     TEXT,
    error_message  TEXT
);

CREATE INDEX job_attempts_job ON job_attempts (job_id, id);

ALTER TABLE jobs ADD COLUMN cancel_requested INTEGER NOT NULL DEFAULT 0;
ALTER TABLE jobs ADD COLUMN idempotency_key TEXT;
ALTER TABLE jobs ADD COLUMN request_hash TEXT;

CREATE UNIQUE INDEX jobs_idempotency_key ON jobs (idempotency_key)
    WHERE idempotency_key IS NOT NULL;

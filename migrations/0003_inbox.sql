-- The watched inbox: where a job's file came from, and a ledger of every file seen there.
-- One inbox job per content: a second file with the same bytes is recorded as a duplicate.

ALTER TABLE jobs ADD COLUMN source_path TEXT;   -- the original path, relative to the inbox

CREATE INDEX jobs_source ON jobs (source, id);

CREATE TABLE inbox_files (
    id             INTEGER PRIMARY KEY AUTOINCREMENT,
    relative_path  TEXT NOT NULL,
    sha256         TEXT,                 -- NULL when the file could not be read
    size           INTEGER NOT NULL,
    mtime_ns       INTEGER NOT NULL,
    outcome        TEXT NOT NULL
                   CHECK (outcome IN ('queued', 'duplicate', 'rejected', 'pruned')),
    job_id         INTEGER REFERENCES jobs (id),
    error_code     TEXT,
    error_message  TEXT,
    filed_to       TEXT,                 -- where the original went (relative to the inbox)
    seen_at        REAL NOT NULL
);

CREATE UNIQUE INDEX inbox_files_one_job_per_content ON inbox_files (sha256)
    WHERE outcome = 'queued';
CREATE INDEX inbox_files_path ON inbox_files (relative_path, size, mtime_ns);

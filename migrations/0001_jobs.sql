-- Jobs, their input images and their results.
-- Times are Unix epoch seconds (REAL); JSON columns hold UTF-8 JSON text.

CREATE TABLE images (
    sha256      TEXT PRIMARY KEY,
    bytes       INTEGER NOT NULL,
    width       INTEGER NOT NULL,
    height      INTEGER NOT NULL,
    format      TEXT NOT NULL,
    path        TEXT NOT NULL,          -- relative to the data directory
    exif        TEXT,                   -- JSON, when the image carries EXIF
    created_at  REAL NOT NULL
);

CREATE TABLE jobs (
    id            INTEGER PRIMARY KEY AUTOINCREMENT,
    status        TEXT NOT NULL DEFAULT 'queued'
                  CHECK (status IN ('queued', 'running', 'succeeded', 'failed', 'cancelled')),
    source        TEXT NOT NULL DEFAULT 'api',
    image_sha256  TEXT NOT NULL REFERENCES images (sha256),
    input_name    TEXT NOT NULL,
    params        TEXT NOT NULL,        -- JSON: {queries, prompt, options}
    attempts      INTEGER NOT NULL DEFAULT 0,
    max_attempts  INTEGER NOT NULL DEFAULT 3,
    run_after     REAL NOT NULL,
    lease_owner   TEXT,
    lease_until   REAL,
    created_at    REAL NOT NULL,
    started_at    REAL,
    finished_at   REAL,
    error_code    TEXT,
    error_message TEXT,
    timings       TEXT,                 -- JSON: milliseconds per stage
    models        TEXT                  -- JSON: {role: {id, revision}}
);

CREATE INDEX jobs_claim ON jobs (status, run_after, id);
CREATE INDEX jobs_lease ON jobs (lease_until) WHERE status = 'running';

CREATE TABLE results (
    job_id      INTEGER PRIMARY KEY REFERENCES jobs (id) ON DELETE CASCADE,
    reasoning   TEXT NOT NULL,
    created_at  REAL NOT NULL
);

CREATE TABLE detections (
    job_id  INTEGER NOT NULL REFERENCES results (job_id) ON DELETE CASCADE,
    idx     INTEGER NOT NULL,           -- 1-based; the number the reasoning prompt uses
    label   TEXT NOT NULL,
    x1      REAL NOT NULL,
    y1      REAL NOT NULL,
    x2      REAL NOT NULL,
    y2      REAL NOT NULL,
    mask    TEXT,                       -- JSON run-length encoding, when segmentation is on
    PRIMARY KEY (job_id, idx)
);

CREATE INDEX detections_label ON detections (label, job_id);

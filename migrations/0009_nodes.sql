-- Nodes: every process that serves the API or works the queue registers itself at start,
-- heartbeats while it runs and marks when it stopped, so an operator sees who is draining the
-- queue (GET /v1/nodes). Times are the store's clock, not the node's.

CREATE TABLE nodes (
    id            TEXT PRIMARY KEY,     -- random per process start
    host          TEXT NOT NULL,        -- the machine's host name
    pid           INTEGER NOT NULL,     -- the process id on that host
    role          TEXT NOT NULL CHECK (role IN ('serve', 'worker')),
    models        TEXT,                 -- JSON: {role: {id, revision}} it has loaded
    profiles      TEXT,                 -- JSON: the profiles it serves; NULL: every one
    current_job   INTEGER,              -- the job it is running now; no foreign key, so
                                        -- retention may delete a job a stale row still names
    jobs_done     INTEGER NOT NULL DEFAULT 0,
    started_at    REAL NOT NULL,
    heartbeat_at  REAL NOT NULL,
    stopped_at    REAL                  -- NULL while it runs (or until its death is noticed)
);

-- Completion webhooks: one delivery per time a job that names a URL (its `webhook` parameter,
-- resolved at submission from the job, its folder, its profile or AIP_WEBHOOK_URL) reaches a
-- terminal state. The trigger writes the row inside the transaction that ends the job, on
-- every path that ends one (the worker, a cancel, recovery giving up), so a job that ended is
-- a delivery that will be sent, whatever stops the process a moment later.

CREATE TABLE webhook_deliveries (
    id               TEXT PRIMARY KEY,      -- the delivery id (X-AIP-Delivery), random
    job_id           INTEGER NOT NULL REFERENCES jobs (id) ON DELETE CASCADE,
    event            TEXT NOT NULL,         -- job.succeeded | job.failed | job.cancelled
    url              TEXT NOT NULL,
    status           TEXT NOT NULL DEFAULT 'pending'
                     CHECK (status IN ('pending', 'delivered', 'failed')),
    attempts         INTEGER NOT NULL DEFAULT 0,
    last_status      INTEGER,               -- the HTTP status of the last attempt, if answered
    last_error       TEXT,                  -- why the last attempt did not deliver
    created_at       REAL NOT NULL,
    next_attempt_at  REAL,                  -- NULL once delivered or failed
    delivered_at     REAL
);

CREATE INDEX webhook_deliveries_due ON webhook_deliveries (next_attempt_at)
    WHERE status = 'pending';
CREATE INDEX webhook_deliveries_job ON webhook_deliveries (job_id, created_at);

CREATE TRIGGER webhook_on_finish AFTER UPDATE OF status ON jobs
WHEN new.status IN ('succeeded', 'failed', 'cancelled')
 AND old.status NOT IN ('succeeded', 'failed', 'cancelled')
 AND json_extract(new.params, '$.webhook') IS NOT NULL
BEGIN
    INSERT INTO webhook_deliveries (id, job_id, event, url, created_at, next_attempt_at)
    VALUES (
        lower(hex(randomblob(16))),
        new.id,
        'job.' || new.status,
        json_extract(new.params, '$.webhook'),
        (julianday('now') - 2440587.5) * 86400.0,
        (julianday('now') - 2440587.5) * 86400.0
    );
END;

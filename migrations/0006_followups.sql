-- Follow-up questions on a succeeded job: asked over the API, answered by the reasoner over
-- the job's image and its earlier exchange, kept with the job. Their text joins the job's
-- full-text row, so history search finds a job by what was asked about it later. A job holds
-- at most 100 (the service refuses more), so the triggers' group_concat stays small.

CREATE TABLE followups (
    job_id         INTEGER NOT NULL REFERENCES jobs (id) ON DELETE CASCADE,
    n              INTEGER NOT NULL,    -- 1-based, per job, in the order asked
    question       TEXT NOT NULL,
    max_tokens     INTEGER NOT NULL,
    status         TEXT NOT NULL DEFAULT 'queued'
                   CHECK (status IN ('queued', 'running', 'succeeded', 'failed')),
    answer         TEXT,
    error_code     TEXT,
    error_message  TEXT,
    timings        TEXT,                -- JSON: milliseconds per stage
    reasoner       TEXT,                -- JSON: the model that answered, as jobs.models has it
    created_at     REAL NOT NULL,
    started_at     REAL,
    finished_at    REAL,
    PRIMARY KEY (job_id, n)
);

CREATE INDEX followups_waiting ON followups (status, created_at) WHERE status != 'succeeded';

-- FTS5 tables take no new column: rebuilt with one for the follow-ups' text. The triggers on
-- jobs and results name their columns, so they serve the new table unchanged.
DROP TABLE jobs_fts;

CREATE VIRTUAL TABLE jobs_fts USING fts5(prompt, reasoning, followups, tokenize = 'unicode61');

INSERT INTO jobs_fts (rowid, prompt, reasoning, followups)
SELECT jobs.id, coalesce(json_extract(jobs.params, '$.prompt'), ''),
       coalesce(results.reasoning, ''), ''
FROM jobs LEFT JOIN results ON results.job_id = jobs.id;

CREATE TRIGGER followups_fts_insert AFTER INSERT ON followups BEGIN
    UPDATE jobs_fts SET followups = (
        SELECT group_concat(question || ' ' || coalesce(answer, ''), ' ')
        FROM followups WHERE job_id = new.job_id
    ) WHERE rowid = new.job_id;
END;

CREATE TRIGGER followups_fts_answer AFTER UPDATE OF answer ON followups BEGIN
    UPDATE jobs_fts SET followups = (
        SELECT group_concat(question || ' ' || coalesce(answer, ''), ' ')
        FROM followups WHERE job_id = new.job_id
    ) WHERE rowid = new.job_id;
END;

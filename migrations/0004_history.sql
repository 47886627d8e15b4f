-- Results history: capture time to filter by, full-text search over prompts and reasoning,
-- indexes for the common filters, and a mark on images whose stored copy was pruned.

ALTER TABLE images ADD COLUMN captured_at TEXT;   -- EXIF capture time, ISO 8601 local time
ALTER TABLE images ADD COLUMN pruned_at REAL;     -- the stored copy was removed by retention

UPDATE images SET captured_at =
    substr(json_extract(exif, '$.captured_at'), 1, 4) || '-' ||
    substr(json_extract(exif, '$.captured_at'), 6, 2) || '-' ||
    substr(json_extract(exif, '$.captured_at'), 9, 2) || 'T' ||
    substr(json_extract(exif, '$.captured_at'), 12, 8)
WHERE json_extract(exif, '$.captured_at') GLOB '[0-9][0-9][0-9][0-9]:[0-9][0-9]:[0-9][0-9] *';

CREATE INDEX images_captured ON images (captured_at);
CREATE INDEX jobs_created ON jobs (created_at, id);
CREATE INDEX jobs_status_created ON jobs (status, created_at, id);
CREATE INDEX jobs_finished ON jobs (finished_at, id) WHERE finished_at IS NOT NULL;
CREATE INDEX jobs_source_path ON jobs (source_path) WHERE source_path IS NOT NULL;
CREATE INDEX jobs_image ON jobs (image_sha256);
CREATE INDEX inbox_files_job ON inbox_files (job_id);

CREATE VIRTUAL TABLE jobs_fts USING fts5(prompt, reasoning, tokenize = 'unicode61');

INSERT INTO jobs_fts (rowid, prompt, reasoning)
SELECT jobs.id, coalesce(json_extract(jobs.params, '$.prompt'), ''), coalesce(results.reasoning, '')
FROM jobs LEFT JOIN results ON results.job_id = jobs.id;

CREATE TRIGGER jobs_fts_insert AFTER INSERT ON jobs BEGIN
    INSERT INTO jobs_fts (rowid, prompt, reasoning)
    VALUES (new.id, coalesce(json_extract(new.params, '$.prompt'), ''), '');
END;

CREATE TRIGGER jobs_fts_delete AFTER DELETE ON jobs BEGIN
    DELETE FROM jobs_fts WHERE rowid = old.id;
END;

CREATE TRIGGER results_fts_insert AFTER INSERT ON results BEGIN
    UPDATE jobs_fts SET reasoning = new.reasoning WHERE rowid = new.job_id;
END;

CREATE TRIGGER results_fts_delete AFTER DELETE ON results BEGIN
    UPDATE jobs_fts SET reasoning = '' WHERE rowid = old.job_id;
END;

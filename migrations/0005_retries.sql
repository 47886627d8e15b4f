-- An explicit retry keeps counting attempts (attempt numbers are never reused within a job):
-- it raises max_attempts by the budget the job was submitted with, kept here from the first
-- retry on; and it marks when the job was queued again, so the queue wait counts from there.

ALTER TABLE jobs ADD COLUMN attempt_budget INTEGER;   -- NULL until the first retry
ALTER TABLE jobs ADD COLUMN queued_at REAL;           -- the last retry; NULL: created_at

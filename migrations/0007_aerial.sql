-- Aerial analysis: what a result holds beyond its text (a structured answer, the detections
-- the answer cites, the queries the reasoner proposed, the tile grid the detector ran on, a
-- redacted copy of the image), and named profiles: reusable job parameters.

ALTER TABLE results ADD COLUMN answer TEXT;           -- JSON: the structured answer, when asked
ALTER TABLE results ADD COLUMN citations TEXT;        -- JSON: detection numbers the text cites
ALTER TABLE results ADD COLUMN planned_queries TEXT;  -- JSON: queries the reasoner proposed
ALTER TABLE results ADD COLUMN tiling TEXT;           -- JSON: tile grid, per-tile timings, merge
ALTER TABLE results ADD COLUMN redacted_path TEXT;    -- relative to the data directory

CREATE TABLE profiles (
    name        TEXT PRIMARY KEY,
    description TEXT NOT NULL DEFAULT '',
    params      TEXT NOT NULL,                        -- JSON: the job options it sets
    builtin     INTEGER NOT NULL DEFAULT 0,           -- shipped with the service; read-only
    is_default  INTEGER NOT NULL DEFAULT 0,           -- at most one row holds 1
    created_at  REAL NOT NULL,
    updated_at  REAL NOT NULL
);

CREATE UNIQUE INDEX profiles_one_default ON profiles (is_default) WHERE is_default = 1;

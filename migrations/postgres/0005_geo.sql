-- Where each detection is on the ground (service/geo): the frame's camera, footprint and
-- ground sample distance, each detection's ground position and real size, and the flight a
-- job was given (a submission's `flight`, or its inbox folder). The JSON columns hold what the
-- API shows; the plain ones are what the history filters (bbox, min_size_m, flight) read.

ALTER TABLE jobs ADD COLUMN flight text;
ALTER TABLE results ADD COLUMN geo text;      -- JSON: camera, assumptions, footprint, gsd_cm
ALTER TABLE results ADD COLUMN west double precision;  -- the frame on the ground, as a lon/lat box
ALTER TABLE results ADD COLUMN south double precision;
ALTER TABLE results ADD COLUMN east double precision;
ALTER TABLE results ADD COLUMN north double precision;
ALTER TABLE detections ADD COLUMN geo text;   -- JSON: lat, lon, footprint, sizes, uncertainty
ALTER TABLE detections ADD COLUMN size_m double precision;  -- the larger of its ground width and height

CREATE INDEX jobs_flight ON jobs (flight, id) WHERE flight IS NOT NULL;
CREATE INDEX results_ground ON results (west, east) WHERE west IS NOT NULL;
CREATE INDEX detections_size ON detections (size_m) WHERE size_m IS NOT NULL;

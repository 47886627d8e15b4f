-- Full text folds as SQLite's fts5 unicode61 tokenizer does: diacritics removed and case folded
-- beyond ASCII ("cafe" finds "café", "muller" finds "Müller", "UBERFLUTET" finds "überflutet").
-- The 'simple' dictionary lowercases only ASCII in a C-locale database, so every word goes
-- through unaccent first (a filtering dictionary: "É" becomes "E", which 'simple' then lowers).
-- unaccent is a trusted extension (PostgreSQL 13+): the database's owner may create it.
CREATE EXTENSION IF NOT EXISTS unaccent;

CREATE TEXT SEARCH CONFIGURATION aip_search (COPY = simple);

-- Every token type 'simple' maps (blank, tag, protocol and entity it leaves out).
ALTER TEXT SEARCH CONFIGURATION aip_search
    ALTER MAPPING FOR asciiword, word, numword, asciihword, hword, numhword, hword_asciipart,
        hword_part, hword_numpart, email, url, host, url_path, file, sfloat, float, int, uint,
        version
    WITH unaccent, simple;

-- Re-created on the new configuration: every existing row's document is computed again.
DROP INDEX job_search_document;
ALTER TABLE job_search DROP COLUMN document;
ALTER TABLE job_search ADD COLUMN document tsvector GENERATED ALWAYS AS
    (to_tsvector('aip_search', prompt || ' ' || reasoning || ' ' || followups)) STORED;
CREATE INDEX job_search_document ON job_search USING gin (document);

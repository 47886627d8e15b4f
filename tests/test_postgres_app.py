"""The real app's full text search on both stores: user words that are query syntax on either
backend (FTS5's or tsquery's) are only words, and find the same jobs on both; case and
diacritics are folded alike on both."""

from __future__ import annotations

import json
import time
from collections.abc import Callable
from pathlib import Path

import psycopg

from service.config import Settings
from service.store.dialect import SEARCH_CONFIG, tsquery
from service.store.postgres.migrate import migrate
from tests.conftest import RunningService, make_settings
from tests.test_history import open_db

Serve = Callable[..., RunningService]

PROMPTS = {
    1: "Is the roof's gutter (north side) blocked?",
    2: "Count cars & trucks | report a:b ratio!",
    3: "Straße überflutet: Wasser steht hoch",
    4: "Any flooding near the barn",
    5: 'He said "stop" \\ then left',
}
# Each query, and the jobs it finds on both backends: every word, anywhere, as a whole word.
CASES: dict[str, set[int]] = {
    "roof": {1},
    "roof's": {1},
    "(north": {1},
    "side)": {1},
    "cars & trucks": {2},
    "trucks | flooding": set(),
    "!report": {2},
    "report!": {2},
    "Straße": {3},
    "überflutet": {3},
    "WASSER": {3},
    '"stop"': {5},
    "stop\\": {5},
    "flood": set(),  # whole words: no prefix matches
    "flooding barn": {4},
    "barn roof": set(),
    "'); DROP TABLE jobs; --": set(),
}
# Syntax alone: never an error; what it finds may differ between the backends' parsers.
NOISE = ["&", "|", "!", ":*", "(", ")", "<->", "'", '"', "\\", "a:b", "&&& |||", "::"]


def test_tsquery_quotes_every_term() -> None:
    assert tsquery(["a'b", "c\\d", "e&f"]) == "'a''b' & 'c\\\\d' & 'e&f'"


def insert_jobs(settings: Settings, prompts: dict[int, str]) -> None:
    """Cancelled jobs with these prompts, written straight into the store."""
    db = open_db(settings)
    db.execute("BEGIN")
    now = time.time()
    for job_id, prompt in prompts.items():
        sha = f"{job_id:064x}"
        db.execute(
            "INSERT INTO images (sha256, bytes, width, height, format, path, created_at)"
            " VALUES (?, 1, 2, 2, 'JPEG', ?, ?)",
            (sha, f"images/{sha}.jpg", now),
        )
        db.execute(
            "INSERT INTO jobs (id, status, source, image_sha256, input_name, params, run_after,"
            " created_at, finished_at, attempts) VALUES (?, 'cancelled', 'api', ?, 'x.jpg', ?, ?,"
            " ?, ?, 1)",
            (
                job_id,
                sha,
                json.dumps({"queries": ["car"], "prompt": prompt, "options": {}}),
                now,
                now + job_id,
                now + job_id,
            ),
        )
    db.execute("COMMIT")
    db.close()


def _finder(service: RunningService) -> Callable[[str], set[int]]:
    def found(q: str) -> set[int]:
        response = service.client.get("/v1/jobs", params={"q": q})
        assert response.status_code == 200, (q, response.text)
        return {job["id"] for job in response.json()["jobs"]}

    return found


def test_full_text_words_are_never_syntax(
    tmp_path: Path, serve: Serve, database_url: str | None
) -> None:
    settings = make_settings(tmp_path, database_url=database_url)
    service = serve(settings)
    insert_jobs(settings, PROMPTS)
    found = _finder(service)

    for q, expected in CASES.items():
        assert found(q) == expected, q
    for q in NOISE:
        found(q)
        for path in ("/v1/stats", "/v1/exports/jobs.csv"):
            response = service.client.get(path, params={"q": q})
            assert response.status_code == 200, (path, q, response.text)


ACCENTED = {1: "café on the corner", 2: "Müller-Straße 12", 3: "Keller ÜBERFLUTET"}
# What SQLite's unicode61 tokenizer finds (diacritics removed, case folded); PostgreSQL must
# find the same (its aip_search configuration: unaccent, then simple).
FOLDED: dict[str, set[int]] = {
    "cafe": {1},
    "CAFÉ": {1},
    "Café": {1},
    "muller": {2},
    "MÜLLER": {2},
    "Müller-Straße": {2},
    "überflutet": {3},
    "UBERFLUTET": {3},
    "keller uberflutet": {3},
}


def test_full_text_folds_case_and_diacritics_alike(
    tmp_path: Path, serve: Serve, database_url: str | None
) -> None:
    settings = make_settings(tmp_path, database_url=database_url)
    service = serve(settings)
    insert_jobs(settings, ACCENTED)
    found = _finder(service)
    assert {q: found(q) for q in FOLDED} == FOLDED


def test_the_migration_refolds_rows_already_there(pg_empty_url: str) -> None:
    """Jobs written before 0004 are found by their unaccented words once it is applied."""
    migrate(pg_empty_url, upto=3)
    with psycopg.connect(pg_empty_url, autocommit=True) as conn:
        conn.execute(
            "INSERT INTO images (sha256, bytes, width, height, format, path, created_at)"
            " VALUES ('ab', 3, 4, 5, 'PNG', 'images/ab.png', 1.0)"
        )
        conn.execute(
            "INSERT INTO jobs (image_sha256, input_name, params, run_after, created_at)"
            " VALUES ('ab', 'a.png', %s, 1.0, 1.0)",
            (json.dumps({"queries": ["car"], "prompt": "Müller's café"}),),
        )
    migrate(pg_empty_url)
    with psycopg.connect(pg_empty_url, autocommit=True) as conn:
        rows = conn.execute(
            f"SELECT count(*) FROM job_search WHERE document @@ to_tsquery('{SEARCH_CONFIG}',"
            " 'MULLER & Cafe')"
        ).fetchone()
    assert rows == (1,)

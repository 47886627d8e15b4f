"""A throwaway PostgreSQL cluster for benchmarks: the tests' server (initdb in a temporary
folder, fsync on, run as the `postgres` user when we are root), one migrated template, and a
fresh database cloned from it per measured candidate."""

from __future__ import annotations

import contextlib
from collections.abc import Callable, Iterator

from service.store.postgres.migrate import migrate

# The class lives with the tests; benchmarks run from the repository root, where it imports.
from tests.postgres_server import PostgresServer, find_bindir


@contextlib.contextmanager
def running() -> Iterator[Callable[[], str]]:
    """Start a cluster with the service's schema in a template database; yields `fresh()`,
    which returns the URL of a new database cloned from it. Removed at the end."""
    bindir = find_bindir()
    if bindir is None:
        raise RuntimeError(
            "no PostgreSQL server binaries: install them (Debian: postgresql-15) or set "
            "AIP_PG_BIN to their folder"
        )
    server = PostgresServer(bindir)
    try:
        template = server.create_database()
        migrate(template)
        name = template.rsplit("/", 1)[1]
        yield lambda: server.create_database(template=name)
    finally:
        server.stop()

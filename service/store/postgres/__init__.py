"""The PostgreSQL store: the shared alternative to the embedded SQLite file, for several nodes."""

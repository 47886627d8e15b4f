"""Persistence: the SQLite file, its migrations, the job queue and the read models."""

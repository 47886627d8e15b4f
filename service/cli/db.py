"""`aip db copy --to postgresql://…`: moves a data directory's SQLite store (rows and stored
files) into a PostgreSQL database that several nodes can share; parsing and printing only."""

from __future__ import annotations

import argparse
import sys
from pathlib import Path

from service.client import database_url, settings_from

EXIT_MISMATCH = 1
EXIT_REFUSED = 2
# As `aip serve --database` says it (service/store/backend.py).
NO_DRIVER = "PostgreSQL needs its driver: pip install 'aerial-intelligence-pipeline[postgres]'"


def _holder(data_dir: Path) -> str:
    """' (pid N)' of the service holding the data directory, when its lock file names it."""
    try:
        pid = (data_dir / "aip.lock").read_text().strip()
    except OSError:
        return ""
    return f" (pid {pid})" if pid.isdigit() else ""


def cmd_copy(args: argparse.Namespace) -> int:
    try:
        from service.store.copy import CopyRefused, copy_data_dir, summary
    except ImportError:
        print(f"aip: {NO_DRIVER}", file=sys.stderr)
        return EXIT_REFUSED
    from service.app import DataDirLock
    from service.errors import AipError
    from service.store.backend import shown

    settings = settings_from(args)
    if not settings.database.is_file():
        print(f"aip: no SQLite store to copy at {settings.database}", file=sys.stderr)
        return EXIT_REFUSED
    # A live queue changes while it is read: the copy would match no moment of it.
    lock = DataDirLock(settings.data_dir)
    try:
        lock.acquire()
    except AipError:
        print(
            f"aip: an aip service{_holder(settings.data_dir)} is already using the data "
            f"directory {settings.data_dir}; stop it, then copy",
            file=sys.stderr,
        )
        return EXIT_REFUSED
    try:
        print(f"copying {settings.database} into {shown(args.to)}", flush=True)
        report = copy_data_dir(
            settings.database,
            settings.data_dir,
            args.to,
            image_store=args.image_store,
            progress=lambda line: print(f"  {line}", flush=True),
        )
    except CopyRefused as exc:
        print(f"aip: {exc}", file=sys.stderr)
        return EXIT_REFUSED
    except Exception as exc:
        reason = " ".join(str(exc).split())[:300] or type(exc).__name__
        print(f"aip: the copy stopped ({reason}); run it again to go on", file=sys.stderr)
        return EXIT_MISMATCH
    finally:
        lock.release()
    for line in summary(report):
        print(line)
    if not report.ok:
        print("aip: the copy does not match its source", file=sys.stderr)
        return EXIT_MISMATCH
    print(f"done: start nodes with --database {shown(args.to)}")
    return 0


def register(commands: argparse._SubParsersAction[argparse.ArgumentParser]) -> None:
    """Add `aip db` and its `copy`."""
    text = "the store: copy a data directory into a shared PostgreSQL database"
    db = commands.add_parser("db", help=text, description=text)
    actions = db.add_subparsers(dest="db_command", required=True, metavar="ACTION")
    text = (
        "copy the SQLite store and stored files of a data directory into PostgreSQL, keeping "
        "ids; run again after an interruption to finish; verified at the end"
    )
    copy = actions.add_parser("copy", help=text, description=text)
    copy.add_argument(
        "--to", required=True, type=database_url, help="the PostgreSQL URL to copy into"
    )
    copy.add_argument("--data-dir", type=Path, help="the data directory to copy (AIP_DATA_DIR)")
    copy.add_argument(
        "--image-store",
        type=Path,
        help="copy stored files into this folder every node mounts (AIP_IMAGE_STORE), "
        "instead of the database",
    )
    copy.set_defaults(func=cmd_copy)

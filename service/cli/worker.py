"""`aip worker`: a node that runs the models and works the shared queue, with no HTTP API and
no inbox: the app's own lifespan, without uvicorn, until SIGTERM or Ctrl-C."""

from __future__ import annotations

import argparse
import asyncio
import logging
import signal
import sys
from pathlib import Path

from service.cli.serve import add_node_flags
from service.client import settings_from
from service.config import Settings
from service.errors import AipError
from service.profiles import worker_profiles

log = logging.getLogger("aip")

NEEDS_DATABASE = (
    "a worker node works a queue shared with `aip serve`: give its PostgreSQL database with "
    "--database or AIP_DATABASE_URL (the embedded SQLite file is one process's alone)"
)


def profile_list(text: str) -> tuple[str, ...]:
    """argparse type for --profiles: a usage error for a name no profile can have."""
    try:
        return worker_profiles(text)
    except ValueError as exc:
        raise argparse.ArgumentTypeError(str(exc)) from None


async def run_node(settings: Settings) -> int:
    """Start the app's lifespan, wait for a stop signal, shut down as `aip serve` does: the
    first signal lets the running job finish within the grace period, a second hands it
    back now (exit status 130 after a second Ctrl-C)."""
    from service.app import create_app
    from service.serving import INTERRUPTED

    app = create_app(settings)
    stop = asyncio.Event()
    interrupted_twice = False

    def on_signal(sig: signal.Signals) -> None:
        nonlocal interrupted_twice
        again = stop.is_set()
        interrupted_twice |= again and sig == signal.SIGINT
        worker = getattr(getattr(app.state, "services", None), "worker", None)
        if worker is not None:
            worker.stop_signalled(again)
        stop.set()

    loop = asyncio.get_running_loop()
    for sig in (signal.SIGTERM, signal.SIGINT):
        loop.add_signal_handler(sig, on_signal, sig)
    async with app.router.lifespan_context(app):
        log.info(
            "worker node %s working the queue (profiles: %s)",
            app.state.services.worker.id,
            ", ".join(settings.worker_profiles) or "all",
        )
        await stop.wait()
    return INTERRUPTED if interrupted_twice else 0


def cmd_worker(args: argparse.Namespace) -> int:
    settings = settings_from(args)
    if args.profiles is not None:
        settings = settings.replace(worker_profiles=args.profiles)
    if settings.database_url is None:
        print(f"aip: {NEEDS_DATABASE}", file=sys.stderr)
        return 2
    settings = settings.replace(serve_api=False, inbox_enabled=False)
    from service.app import DataDirLock
    from service.cli.serve import _exit_now, prepare_node

    prepared = prepare_node(settings, [DataDirLock(settings.data_dir)], args.log_level)
    if prepared is None:
        return 2
    settings = prepared
    try:
        status = asyncio.run(run_node(settings))
    except AipError as exc:
        print(f"aip: {exc.message}", file=sys.stderr)
        _exit_now(1)
    except Exception as exc:  # the database cannot be reached, say: one line, not a traceback
        log.debug("start-up failed", exc_info=exc)
        first = str(exc).strip().splitlines()[0] if str(exc).strip() else type(exc).__name__
        print(f"aip: the worker could not start: {first}", file=sys.stderr)
        _exit_now(1)
    # As `aip serve`: skip interpreter teardown, which an abandoned inference can abort.
    _exit_now(status)


def register(commands: argparse._SubParsersAction[argparse.ArgumentParser]) -> None:
    """Add `aip worker`."""
    text = "run a worker node: models and the shared queue's jobs, no API, no inbox"
    worker = commands.add_parser("worker", help=text, description=text)
    worker.add_argument(
        "--data-dir", type=Path, help="this node's models, logs and file cache (AIP_DATA_DIR)"
    )
    worker.add_argument(
        "--profiles",
        type=profile_list,
        help="comma-separated profiles whose jobs it takes (AIP_WORKER_PROFILES; default all)",
    )
    add_node_flags(
        worker, database="the PostgreSQL URL the API nodes use (AIP_DATABASE_URL; required)"
    )
    worker.set_defaults(func=cmd_worker)

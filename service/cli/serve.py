"""`aip serve`: prepares the models, then runs the app under uvicorn until it is told to stop."""

from __future__ import annotations

import argparse
import contextlib
import logging
import os
import signal
import sys
from collections.abc import Sequence
from pathlib import Path
from typing import TYPE_CHECKING, NoReturn

from service.cli import StopRequested, stops_requested
from service.cli.startup import (
    DropStartupFailedLine,
    QuietLifespan,
    StartupError,
    listen_socket,
)
from service.client import database_url, port_number, settings_from
from service.config import Settings
from service.errors import AipError
from service.logs import configure_logging

if TYPE_CHECKING:
    from service.app import DataDirLock
    from service.inbox.lock import InboxLock

log = logging.getLogger("aip")


def prepare_models(settings: Settings) -> Settings:
    """Point the settings at weights on disk: tiny checkpoints for --demo, otherwise the
    configured sources, downloaded once (with progress) when they are hub ids not yet cached."""
    if settings.demo:
        from service.models.tiny import build_tiny_checkpoints

        print(
            f"aip: demo mode: tiny random-weight checkpoints in {settings.demo_models_dir}",
            file=sys.stderr,
        )
        detector, reasoner = build_tiny_checkpoints(settings.demo_models_dir)
        return settings.replace(detector=str(detector), reasoner=str(reasoner))
    from service.models.sources import resolve

    detector = resolve("detector", settings.detector, allow_download=True)
    reasoner = resolve("reasoner", settings.reasoner, allow_download=True)
    return settings.replace(detector=str(detector), reasoner=str(reasoner))


def prepare_node(
    settings: Settings, probes: Sequence[DataDirLock | InboxLock], log_level: str
) -> Settings | None:
    """What `serve` and `worker` do before they start: refuse an install without exactly one
    MLX backend, and a data directory or inbox in use (before the demo models are written into
    it), start logging, prepare the models.
    None once it has said, in one line, why the node cannot start."""
    from service.models import backends

    problem = backends.backend_problem()  # no backend, or two sharing one libmlx.so
    if problem is not None:
        print(f"aip: {problem}", file=sys.stderr)
        return None
    try:
        with contextlib.ExitStack() as held:
            for probe in probes:
                probe.acquire()
                held.callback(probe.release)
    except AipError as exc:
        print(f"aip: {exc.message}", file=sys.stderr)
        return None
    except OSError as exc:
        print(
            f"aip: cannot use the data directory ({exc}): set --data-dir or AIP_DATA_DIR",
            file=sys.stderr,
        )
        return None
    configure_logging(log_level, settings.logs_dir, stderr=settings.log_stderr)
    from service.models.device import use_kernel_cache

    # Before anything imports mlx (the demo checkpoints are built with it).
    cache = use_kernel_cache(settings.data_dir)
    how = "MLX_PTX_CACHE_DIR as set" if cache["set_by"] == "user" else "in the data directory"
    # Said at info level once the models load on CUDA, the one backend that uses it.
    log.debug("MLX kernel cache (CUDA): %s (%s)", cache["path"], how)
    try:
        return prepare_models(settings)
    except AipError as exc:
        print(f"aip: {exc.message}", file=sys.stderr)
        return None


def cmd_serve(args: argparse.Namespace) -> int:
    settings = settings_from(args)
    if settings.exposed_without_token:
        print(
            f"aip: refusing to listen on {settings.host} without a token: set AIP_TOKEN (or "
            "--token) so only clients that know it can reach your images",
            file=sys.stderr,
        )
        return 2
    try:
        sock = listen_socket(settings.host, settings.port)
    except StartupError as exc:
        print(f"aip: {exc}", file=sys.stderr)
        return 2
    from service.app import DataDirLock, create_app
    from service.inbox.lock import InboxLock

    # Refused here, before the demo models are written into a directory in use; the
    # app's start-up takes both locks again for as long as it runs.
    probes: list[DataDirLock | InboxLock] = [DataDirLock(settings.data_dir)]
    if settings.inbox_enabled and settings.database_url is None:  # PostgreSQL: app.py
        probes.append(InboxLock(settings.inbox_dir, settings.data_dir))
    prepared = prepare_node(settings, probes, args.log_level)
    if prepared is None:
        return 2
    settings = prepared
    import uvicorn

    app = QuietLifespan(create_app(settings))
    config = uvicorn.Config(
        app,
        log_level=args.log_level,
        log_config=None,  # uvicorn's records go through configure_logging's handlers
        timeout_graceful_shutdown=int(settings.shutdown_grace_seconds) + 2,
        lifespan="on",
    )
    from service.serving import Server  # the worker hears of each stop signal

    server = Server(config, app.app)
    logging.getLogger("uvicorn.error").addFilter(DropStartupFailedLine())
    log.info("starting on %s", settings.base_url)
    if stops_requested:  # asked for while starting, its exception lost on the way
        raise StopRequested(stops_requested[0])
    # uvicorn re-raises the stop signal once it has shut down; a stop we were asked for is
    # a clean exit (status 0), which is what launchd and systemd must see. One that comes
    # before uvicorn takes the signals over stops it as soon as it has started.
    for stop_signal in (signal.SIGTERM, signal.SIGINT):
        signal.signal(stop_signal, lambda *_: setattr(server, "should_exit", True))
    with contextlib.suppress(SystemExit):  # uvicorn's way to say the lifespan start-up failed
        server.run(sockets=[sock])
    if not server.started:
        print(f"aip: {app.sentence()}", file=sys.stderr)
        _exit_now(1)
    # Everything is closed and durable by now. Skip interpreter teardown: an inference that
    # shutdown gave up on may still hold MLX threads, whose C++ teardown can abort.
    _exit_now(server.exit_status)


def _exit_now(code: int) -> NoReturn:
    logging.shutdown()
    sys.stdout.flush()
    sys.stderr.flush()
    os._exit(code)


def add_node_flags(parser: argparse.ArgumentParser, *, database: str) -> None:
    """The flags `serve` and `worker` share: the store, the models, the log."""
    parser.add_argument("--database", type=database_url, help=database)
    parser.add_argument(
        "--image-store",
        type=Path,
        help="with --database: a folder every node mounts for stored images, instead of the "
        "database (AIP_IMAGE_STORE)",
    )
    parser.add_argument(
        "--demo", action="store_true", help="run offline on tiny random-weight checkpoints"
    )
    parser.add_argument("--detector", help="hub id or local folder (AIP_DETECTOR)")
    parser.add_argument("--reasoner", help="hub id or local folder (AIP_REASONER)")
    parser.add_argument(
        "--log-level",
        default="info",
        choices=["debug", "info", "warning", "error"],
        help="how much the log says (default info)",
    )


def register(commands: argparse._SubParsersAction[argparse.ArgumentParser]) -> None:
    """Add `aip serve`."""
    text = "run the service (API, worker, models)"
    serve = commands.add_parser("serve", help=text, description=text)
    serve.add_argument(
        "--data-dir", type=Path, help="database, stored images, demo checkpoints (AIP_DATA_DIR)"
    )
    serve.add_argument("--inbox", type=Path, help="the watched folder (AIP_INBOX)")
    serve.add_argument(
        "--host", help="listening address (AIP_HOST; default 127.0.0.1; others need a token)"
    )
    serve.add_argument(
        "--port", type=port_number, help="listening port, 1..65535 (AIP_PORT; default 8765)"
    )
    serve.add_argument("--token", help="bearer token clients must send (AIP_TOKEN)")
    add_node_flags(
        serve,
        database="a PostgreSQL URL shared with other nodes (AIP_DATABASE_URL; default: the "
        "embedded SQLite file in the data directory)",
    )
    serve.set_defaults(func=cmd_serve)

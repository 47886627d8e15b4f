"""What stands between `aip serve` and a running uvicorn: the listening socket (taken before
anything is created) and start-up refusals as one sentence (a stop asked for while starting is
`service.cli.main`'s, from its first instant)."""

from __future__ import annotations

import errno
import logging
import socket

from starlette.types import ASGIApp, Message, Receive, Scope, Send

from service.config import port_number
from service.errors import AipError

log = logging.getLogger("aip")


class StartupError(Exception):
    """A reason `aip serve` cannot start, in one sentence that says what to change."""


def listen_socket(host: str, port: int) -> socket.socket:
    """A socket bound to host:port, for uvicorn to listen on. Binding here, before the database
    or the inbox are touched, makes a taken port a one-sentence refusal with no race."""
    try:
        port_number(port)  # Settings from flags and AIP_PORT are checked; others may not be
    except ValueError as exc:
        raise StartupError(f"{port} is {exc}: set --port or AIP_PORT") from None
    try:
        infos = socket.getaddrinfo(host, port, type=socket.SOCK_STREAM, flags=socket.AI_PASSIVE)
    except (socket.gaierror, UnicodeError) as exc:
        raise StartupError(f"cannot listen on {host!r} ({exc}): set --host or AIP_HOST") from None
    family, kind, proto, _, address = infos[0]
    sock = socket.socket(family, kind, proto)
    sock.setsockopt(socket.SOL_SOCKET, socket.SO_REUSEADDR, 1)  # as uvicorn does
    try:
        sock.bind(address)
    except OSError as exc:
        sock.close()
        if exc.errno == errno.EADDRINUSE:
            raise StartupError(
                f"port {port} on {host} is already in use (another aip service, or another "
                "program): stop it, or choose another port with --port or AIP_PORT"
            ) from None
        if exc.errno == errno.EACCES:
            raise StartupError(
                f"this user may not listen on port {port}: choose one above 1023 with --port "
                "or AIP_PORT"
            ) from None
        raise StartupError(
            f"cannot listen on {host}:{port} ({exc.strerror}): set --host/AIP_HOST or "
            "--port/AIP_PORT"
        ) from None
    return sock


class QuietLifespan:
    """Wraps the app so that a failed start-up (another service holds the data directory or
    the inbox, a database that cannot be opened) is kept for one sentence on stderr instead
    of the traceback uvicorn would log."""

    def __init__(self, app: ASGIApp) -> None:
        self.app = app
        self.failure: BaseException | None = None

    async def __call__(self, scope: Scope, receive: Receive, send: Send) -> None:
        if scope["type"] != "lifespan":
            await self.app(scope, receive, send)
            return

        async def without_traceback(message: Message) -> None:
            if message["type"] == "lifespan.startup.failed":
                message = {**message, "message": ""}
            await send(message)

        try:
            await self.app(scope, receive, without_traceback)
        except Exception as exc:
            self.failure = exc
            log.debug("start-up failed", exc_info=exc)  # the whole story, with --log-level debug
            raise

    def sentence(self) -> str:
        exc = self.failure
        if exc is None:
            return "the service did not start; the log says why"
        if isinstance(exc, AipError):
            return exc.message
        if isinstance(exc, (RuntimeError, OSError)):
            return str(exc)
        return (
            f"the service could not start ({type(exc).__name__}: {exc}); "
            "`--log-level debug` shows where"
        )


class DropStartupFailedLine(logging.Filter):
    """uvicorn's "Application startup failed" follows our own sentence; once is enough."""

    def filter(self, record: logging.LogRecord) -> bool:
        return not str(record.msg).startswith("Application startup failed")

"""What every client command shares: settings from flags and environment, the one HTTP client
of a running service (every failure of it is one sentence), and the common `--url`/`--json`
options."""

from __future__ import annotations

import argparse
import contextlib
from collections.abc import Iterator
from typing import Any

import httpx

from service import config
from service.config import Settings

TIMEOUT_SECONDS = 60.0


class ClientError(Exception):
    """A client command cannot go on; the message says why and what to do next."""

    def __init__(
        self, message: str, exit_code: int = 1, *, body: dict[str, Any] | None = None
    ) -> None:
        super().__init__(message)
        self.message = message
        self.exit_code = exit_code
        self.body = body  # the service's `{code, message}` when it refused the request


def settings_from(args: argparse.Namespace) -> Settings:
    """Settings from the environment, overridden by whichever flags this command has."""
    try:
        return Settings.from_env(
            data_dir=getattr(args, "data_dir", None),
            database_url=getattr(args, "database", None),
            image_store=getattr(args, "image_store", None),
            inbox=getattr(args, "inbox", None),
            host=getattr(args, "host", None),
            port=getattr(args, "port", None),
            detector=getattr(args, "detector", None),
            reasoner=getattr(args, "reasoner", None),
            token=getattr(args, "token", None),
            demo=getattr(args, "demo", None) or None,
        )
    except ValueError as exc:
        raise ClientError(str(exc), exit_code=2) from None


def database_url(text: str) -> str:
    """argparse type for --database: a usage error for anything but a PostgreSQL URL."""
    try:
        return config.database_url(text)
    except ValueError as exc:
        raise argparse.ArgumentTypeError(str(exc)) from None


def port_number(text: str) -> int:
    """argparse type for --port: a usage error, not a failure later, for 0 or 99999."""
    try:
        return config.port_number(text)
    except ValueError as exc:
        raise argparse.ArgumentTypeError(f"{text!r} is {exc}") from None


def add_client_command(
    commands: argparse._SubParsersAction[argparse.ArgumentParser], name: str, help_text: str
) -> argparse.ArgumentParser:
    sub = commands.add_parser(name, help=help_text, description=help_text)
    sub.add_argument(
        "--url", help="service address, e.g. http://127.0.0.1:8765 (default from AIP_HOST/AIP_PORT)"
    )
    sub.add_argument("--json", action="store_true", help="print the service's JSON answer")
    return sub


class Client:
    """The running service over HTTP. Every way a request can fail ends in a ClientError."""

    def __init__(self, settings: Settings, url: str | None) -> None:
        address = url or settings.base_url
        headers = {"Authorization": f"Bearer {settings.token}"} if settings.token else {}
        try:
            self.http = httpx.Client(base_url=address, headers=headers, timeout=TIMEOUT_SECONDS)
        except (httpx.InvalidURL, ValueError, TypeError) as exc:
            raise ClientError(_bad_url(address, exc), exit_code=2) from None
        if self.http.base_url.scheme not in ("http", "https") or not self.http.base_url.host:
            raise ClientError(_bad_url(address, "it needs http:// and a host"), exit_code=2)
        port = self.http.base_url.port
        if port is not None and not 1 <= port <= 65535:  # httpx takes any number
            raise ClientError(_bad_url(address, f"{port} is not a port number (1..65535)"), 2)
        self.url = str(self.http.base_url).rstrip("/")

    def call(self, method: str, path: str, **kwargs: Any) -> dict[str, Any]:
        """The JSON answer of a successful request."""
        with self._transport():
            response = self.http.request(method, path, **kwargs)
        self.raise_for_status(response)
        if not response.content:
            return {}
        try:
            body = response.json()
        except ValueError:
            raise ClientError(self._not_aip(response)) from None
        if not isinstance(body, dict):
            raise ClientError(self._not_aip(response))
        return body

    def status_and_json(self, method: str, path: str, **kwargs: Any) -> tuple[int, dict[str, Any]]:
        """Like call, when the status itself matters (202: accepted but not yet done)."""
        with self._transport():
            response = self.http.request(method, path, **kwargs)
        self.raise_for_status(response)
        try:
            body = response.json()
        except ValueError:
            raise ClientError(self._not_aip(response)) from None
        return response.status_code, body

    @contextlib.contextmanager
    def stream(self, method: str, path: str, **kwargs: Any) -> Iterator[httpx.Response]:
        """A streamed response whose status is already checked."""
        with self._transport(), self.http.stream(method, path, **kwargs) as response:
            if response.status_code >= 400:
                response.read()
                self.raise_for_status(response)
            yield response

    def raise_for_status(self, response: httpx.Response) -> None:
        if response.status_code < 400:
            return
        try:
            body = response.json()
        except ValueError:
            body = None
        if not isinstance(body, dict) or "message" not in body:
            raise ClientError(self._not_aip(response))
        message = f"{body.get('code', response.status_code)}: {body['message']}"
        if response.status_code == 401 and "AIP_TOKEN" not in message:
            message += " (the token comes from AIP_TOKEN)"
        raise ClientError(message, body=body)

    def _not_aip(self, response: httpx.Response) -> str:
        return (
            f"something other than an aip service answers at {self.url} (HTTP "
            f"{response.status_code}): check --url or AIP_HOST/AIP_PORT"
        )

    @contextlib.contextmanager
    def _transport(self) -> Iterator[None]:
        try:
            yield
        except httpx.ConnectError:
            raise ClientError(
                f"no service answers at {self.url}: start it with `aip serve`, or point --url "
                "(or AIP_HOST/AIP_PORT) at the one that runs"
            ) from None
        except httpx.TimeoutException:
            raise ClientError(
                f"the service at {self.url} did not answer within {TIMEOUT_SECONDS:g} s; "
                "`aip service status` shows whether it is busy or stuck"
            ) from None
        except (httpx.HTTPError, httpx.InvalidURL) as exc:
            why = str(exc) or type(exc).__name__
            raise ClientError(
                f"the request to {self.url} failed ({why}); is the service running? "
                "`aip service status` tells"
            ) from None


def _bad_url(address: str, why: object) -> str:
    return f"{address!r} is not a service address ({why}): use e.g. --url http://127.0.0.1:8765"

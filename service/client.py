"""What every client command shares: settings from flags and environment, the HTTP client of
a running service, and the common `--url`/`--json` options."""

from __future__ import annotations

import argparse
from typing import Any

from service.config import Settings


def settings_from(args: argparse.Namespace) -> Settings:
    """Settings from the environment, overridden by whichever flags this command has."""
    try:
        return Settings.from_env(
            data_dir=getattr(args, "data_dir", None),
            inbox=getattr(args, "inbox", None),
            host=getattr(args, "host", None),
            port=getattr(args, "port", None),
            detector=getattr(args, "detector", None),
            reasoner=getattr(args, "reasoner", None),
            token=getattr(args, "token", None),
            demo=getattr(args, "demo", None) or None,
        )
    except ValueError as exc:
        raise SystemExit(f"aip: {exc}") from None


def add_client_command(
    commands: argparse._SubParsersAction[argparse.ArgumentParser], name: str, help_text: str
) -> argparse.ArgumentParser:
    sub = commands.add_parser(name, help=help_text)
    sub.add_argument("--url", help="service address (default from AIP_HOST/AIP_PORT)")
    sub.add_argument("--json", action="store_true", help="print the raw JSON")
    return sub


class Client:
    def __init__(self, settings: Settings, url: str | None) -> None:
        import httpx

        headers = {"Authorization": f"Bearer {settings.token}"} if settings.token else {}
        self.http = httpx.Client(base_url=url or settings.base_url, headers=headers, timeout=60)

    def call(self, method: str, path: str, **kwargs: Any) -> dict[str, Any]:
        import httpx

        try:
            response = self.http.request(method, path, **kwargs)
        except httpx.ConnectError:
            raise SystemExit(
                f"aip: no service answers at {self.http.base_url}; start it with `aip serve`"
            ) from None
        body = response.json() if response.content else {}
        if response.status_code >= 400:
            raise SystemExit(
                f"aip: {body.get('code', response.status_code)}: "
                f"{body.get('message', response.text)}"
            )
        return body

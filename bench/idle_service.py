"""A real service process for benchmarks, with a bare Starlette JSON route beside it on the
same uvicorn. Without checkpoints its worker never starts (its models never load), so the
queue and API are measured alone: `python -m bench.idle_service DATA_DIR PORT [DETECTOR
REASONER REASON_TOKENS]`, or `running(data_dir, ...)` from a benchmark."""

from __future__ import annotations

import contextlib
import socket
import subprocess
import sys
import time
from collections.abc import Iterator
from pathlib import Path
from typing import Any

import httpx
from starlette.applications import Starlette
from starlette.requests import Request
from starlette.responses import JSONResponse, Response
from starlette.routing import Route
from starlette.types import ASGIApp, Receive, Scope, Send

BARE_PATH = "/bench/bare"  # GET: the JSON last POSTed there, straight from Starlette


def _bare_app() -> Starlette:
    body: dict[str, Any] = {}

    async def bare(request: Request) -> Response:
        if request.method == "POST":
            body.clear()
            body.update(await request.json())
        return JSONResponse(body)

    return Starlette(routes=[Route(BARE_PATH, bare, methods=["GET", "POST"])])


def _beside(app: ASGIApp, bare: ASGIApp) -> ASGIApp:
    async def dispatch(scope: Scope, receive: Receive, send: Send) -> None:
        target = bare if scope["type"] == "http" and scope["path"] == BARE_PATH else app
        await target(scope, receive, send)

    return dispatch


def _no_model(path: Path) -> Any:
    raise RuntimeError("benchmark: no models here, so the worker stays idle")


def main() -> None:
    import uvicorn

    from service.app import create_app
    from service.config import Settings
    from service.models.host import ModelHost

    data_dir, port = Path(sys.argv[1]), int(sys.argv[2])
    if len(sys.argv) > 3:
        detector, reasoner, tokens = sys.argv[3:6]
        settings = Settings(
            data_dir=data_dir,
            inbox=data_dir / "inbox",
            detector=detector,
            reasoner=reasoner,
            reason_max_tokens=int(tokens),
            poll_interval_seconds=0.05,
        )
        host = ModelHost.from_settings(settings)
    else:
        settings = Settings(data_dir=data_dir, inbox=data_dir / "inbox")
        host = ModelHost(
            {"detector": "none", "reasoner": "none"},
            loaders={"detector": _no_model, "reasoner": _no_model},
            resolve_sources=False,
        )
    app = _beside(create_app(settings, host=host), _bare_app())
    uvicorn.run(app, host="127.0.0.1", port=port, log_level="error")


def _free_port() -> int:
    with socket.socket() as s:
        s.bind(("127.0.0.1", 0))
        return int(s.getsockname()[1])


@contextlib.contextmanager
def running(data_dir: Path, models: tuple[Path, Path, int] | None = None) -> Iterator[str]:
    """Start the service in its own process; yields its base URL. `models`: (detector,
    reasoner, reasoning tokens) to load and run jobs with; None: the worker stays idle."""
    port = _free_port()
    extra = [str(m) for m in models] if models else []
    process = subprocess.Popen(
        [sys.executable, "-m", "bench.idle_service", str(data_dir), str(port), *extra],
        stdout=subprocess.DEVNULL,
        stderr=subprocess.DEVNULL,
    )
    url = f"http://127.0.0.1:{port}"
    try:
        deadline = time.monotonic() + 120
        while True:
            with contextlib.suppress(httpx.TransportError):
                httpx.get(f"{url}/v1/health")  # answers 503: its models failed on purpose
                break
            if process.poll() is not None or time.monotonic() > deadline:
                raise RuntimeError("the benchmark service did not start")
            time.sleep(0.05)
        yield url
    finally:
        process.terminate()
        process.wait(timeout=60)


if __name__ == "__main__":
    main()

"""`aip models list|load|unload`: shell clients of the running service's /v1/models, with a
progress bar while a model loads (from the event stream, else by polling). Never imports mlx;
the service does the loading."""

from __future__ import annotations

import argparse
import json
import sys
import time
from pathlib import Path
from typing import Any

from service.cli.stream import EventStream, StreamEnded
from service.client import Client, ClientError, add_client_command, settings_from
from service.errors import AipError
from service.models.budget import format_bytes

_BAR = 24


def _client(args: argparse.Namespace) -> Client:
    return Client(settings_from(args), args.url)


def _role(report: dict[str, Any], role: str) -> dict[str, Any]:
    return next(r for r in report["roles"] if r["role"] == role)


def _size(value: int | None) -> str:
    return format_bytes(value) if value is not None else "-"


def cmd_list(args: argparse.Namespace) -> int:
    report = _client(args).call("GET", "/v1/models")
    if args.json:
        print(json.dumps(report, indent=2))
        return 0
    held, budget = report["held_bytes"], report["budget_bytes"]
    print(f"memory: {_size(held)} held by models, budget {_size(budget)}")
    for r in report["roles"]:
        bits = f" q{r['quantize']}" if r["quantize"] else ""
        print(
            f"{r['role']:<9} {r['state']:<9} {r['revision'] or '-':<12} "
            f"{_size(r['resident_bytes']):>10}  keep-alive {r['keep_alive']!s:<7} "
            f"jobs {r['jobs_served']:<5} {r['source']}{bits}"
        )
        if r["error"]:
            print(f"{'':<10}last error: {r['error']}")
    return 0


def _draw(role: dict[str, Any]) -> None:
    progress = role.get("progress") or {"phase": "start", "percent": None, "elapsed_seconds": 0}
    percent = progress["percent"]
    if percent is None:  # a phase without a measurable fraction (a conversion)
        bar = "." * (int(progress["elapsed_seconds"] * 4) % (_BAR + 1))
        shown = "   "
    else:
        bar = "#" * int(_BAR * percent / 100)
        shown = f"{percent:3.0f}%"
    print(
        f"\r{role['role']}: {progress['phase']:<8} [{bar:<{_BAR}}] {shown} "
        f"{progress['elapsed_seconds']:6.1f} s",
        end="",
        file=sys.stderr,
        flush=True,
    )


def cmd_load(args: argparse.Namespace) -> int:
    model = args.model
    folder = Path(model).expanduser()
    if folder.is_dir():
        model = str(folder.resolve())  # the service may run from another directory
    elif not args.no_pull:
        from service.models.sources import resolve

        try:  # a hub id: the weights come to this machine first, with the hub's progress bar
            resolve(args.role, model, allow_download=True)
        except AipError as exc:
            print(f"aip: {exc.message}", file=sys.stderr)
            return 2
    client = _client(args)
    body = {"model": model, "quantize": args.quantize}
    events = EventStream.open(client)  # before the load starts: none of its progress is missed
    role = client.call("POST", f"/v1/models/{args.role}/load", json=body)
    try:
        role = _watch(client, events, role)
    except KeyboardInterrupt:
        raise ClientError(
            "stopped watching; the load goes on in the service: `aip models list` shows it",
            exit_code=130,
        ) from None
    finally:
        print(file=sys.stderr)
        if events is not None:
            events.close()
    if args.json:
        print(json.dumps(role, indent=2))
    if role["error"]:
        print(f"aip: {role['error']}", file=sys.stderr)
        return 1
    if not args.json:
        phases = ", ".join(f"{k} {v:.2f} s" for k, v in role["phases"].items())
        print(
            f"{args.role}: {role['source']} revision {role['revision']} serving, "
            f"{_size(role['resident_bytes'])} resident ({role['swap']}; {phases})"
        )
    return 0


def _watch(client: Client, events: EventStream | None, role: dict[str, Any]) -> dict[str, Any]:
    """Draw the load's progress until it ends; the role as it is then. Progress comes from
    the stream; the role is read again when the stream says the load ended (in, or failed),
    after a second without news of it, and every 0.2 s without a stream."""
    began = read = time.monotonic()
    name = role["role"]
    while role["state"] == "loading":
        _draw(role)
        event: dict[str, Any] = {}
        if events is not None:
            try:
                event = events.next(1.0) or {}
            except StreamEnded:
                events = None
        else:
            time.sleep(0.2)
        data = event.get("data") or {}
        mine = data.get("role") == name
        if mine and event["type"] == "model.progress" and data.get("phase") != "failed":
            seconds = round(time.monotonic() - began, 2)
            role["progress"] = {**data, "elapsed_seconds": seconds}
        elif not event or mine or time.monotonic() - read >= 1.0:
            role, read = _role(client.call("GET", "/v1/models"), name), time.monotonic()
    return role


def cmd_unload(args: argparse.Namespace) -> int:
    role = _client(args).call("POST", f"/v1/models/{args.role}/unload")
    if args.json:
        print(json.dumps(role, indent=2))
    else:
        print(f"{args.role}: {role['state']}; the next job that needs it loads it again")
    return 0


def register(models: argparse._SubParsersAction[argparse.ArgumentParser]) -> None:
    """Add `list`, `load` and `unload` under `aip models`."""

    def command(name: str, text: str) -> argparse.ArgumentParser:
        return add_client_command(models, name, text)

    listing = command("list", "what the running service holds: state, revision, memory")
    listing.set_defaults(func=cmd_list)
    load = command("load", "load or swap a role's model in the running service")
    load.add_argument("role", choices=["detector", "reasoner"], help="which model to replace")
    load.add_argument("model", help="hub id or local folder")
    load.add_argument("--quantize", type=int, choices=[4, 8], help="convert once, then reuse")
    load.add_argument(
        "--no-pull", action="store_true", help="do not download a hub id missing here"
    )
    load.set_defaults(func=cmd_load)
    unload = command("unload", "free a role's model; the next job loads it again")
    unload.add_argument("role", choices=["detector", "reasoner"], help="which model to free")
    unload.set_defaults(func=cmd_unload)

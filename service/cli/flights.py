"""`aip flights|report|changes|georeference`: flights, their reports, what changed between two,
and placing finished jobs on the ground again; clients of a running service."""

from __future__ import annotations

import argparse
import sys
from pathlib import Path
from typing import Any
from urllib.parse import quote

from service.cli.filters import add_filters, filters
from service.cli.output import print_json
from service.client import Client, ClientError, add_client_command, settings_from


def _path(prefix: str, name: str) -> str:
    return f"{prefix}/{quote(name, safe='/')}"


def _size(metres2: float) -> str:
    return f"{metres2 / 10_000:.2f} ha" if metres2 >= 10_000 else f"{metres2:.0f} m²"


def _span(flight: dict[str, Any]) -> str:
    started, ended = flight["started"], flight["ended"]
    if not started:
        return "no capture times"
    return started.replace("T", " ") + (f" – {ended[11:]}" if ended and ended != started else "")


def print_flight(flight: dict[str, Any], *, detail: bool) -> None:
    counts = ", ".join(f"{n} {label}" for label, n in flight["counts"].items()) or "nothing"
    print(
        f"{flight['id']}  {_span(flight)}  {flight['frames']} frames "
        f"({flight['located']} located), {_size(flight['area_m2'])}: {counts}"
    )
    if detail:
        for label, size in flight["sizes"].items():
            print(
                f"  {label}: {size['min']:.1f}–{size['max']:.1f} m across "
                f"(median {size['median']:.1f} m)"
            )
        print(f"  jobs: {' '.join(map(str, flight['job_ids']))}")


def cmd_flights(args: argparse.Namespace) -> int:
    client = Client(settings_from(args), args.url)
    if args.name:
        flight = client.call("GET", _path("/v1/flights", args.name))
        print_json(flight) if args.json else print_flight(flight, detail=True)
        return 0
    listed = client.call("GET", "/v1/flights")
    if args.json:
        print_json(listed)
    elif not listed["flights"]:
        print("no flights: frames need a capture time, a flight name or an inbox folder")
    for flight in [] if args.json else listed["flights"]:
        print_flight(flight, detail=False)
    return 0


def cmd_report(args: argparse.Namespace) -> int:
    fmt = "pdf" if args.pdf or (args.output or "").lower().endswith(".pdf") else "html"
    target = Path(args.output or f"{args.flight.replace('/', '-')}.{fmt}")
    params = {"format": fmt, **({"since": args.since} if args.since else {})}
    client = Client(settings_from(args), args.url)
    try:
        with (
            client.stream("GET", _path("/v1/reports", args.flight), params=params) as response,
            target.open("wb") as out,
        ):
            for chunk in response.iter_bytes():
                out.write(chunk)
    except OSError as exc:
        raise ClientError(f"cannot write the report to {target}: {exc.strerror}") from None
    except ClientError:
        target.unlink(missing_ok=True)
        raise
    print(f"wrote {target}", file=sys.stderr)
    return 0


def print_changes(report: dict[str, Any]) -> None:
    counts = report["counts"]
    print(
        f"{report['before']} -> {report['after']}: {counts['new']} new, {counts['gone']} gone, "
        f"{counts['moved']} moved, {counts['same']} unchanged "
        f"({counts['unseen'] + counts['unseen_before']} outside the other flight's ground)"
    )
    for kind in ("new", "gone", "moved"):
        for change in report[kind]:
            place = change["after"] if kind == "new" else change["before"]
            moved = f" by {change['distance_m']:.1f} m" if kind == "moved" else ""
            print(
                f"  {kind:<5} {change['label']}{moved} at {place['lat']:.6f}, {place['lon']:.6f} "
                f"(job {place['job_id']} #{place['number']})"
            )


def cmd_changes(args: argparse.Namespace) -> int:
    params = {"before": args.before, "after": args.after}
    client = Client(settings_from(args), args.url)
    if args.geojson:
        print_json(client.call("GET", "/v1/changes", params={**params, "format": "geojson"}))
        return 0
    report = client.call("GET", "/v1/changes", params=params)
    print_json(report) if args.json else print_changes(report)
    return 0


def cmd_georeference(args: argparse.Namespace) -> int:
    body: dict[str, Any] = {}
    if args.takeoff_ground:
        body["ground_elevation"] = None
    elif args.ground_elevation is not None:
        body["ground_elevation"] = args.ground_elevation
    client = Client(settings_from(args), args.url)
    placed = client.call("POST", "/v1/georeference", params=filters(args), json=body)
    if args.json:
        print_json(placed)
    else:
        print(
            f"placed {placed['jobs']} finished jobs again: {placed['located']} frames and "
            f"{placed['detections']} detections on the ground"
        )
    return 0


def register(commands: argparse._SubParsersAction[argparse.ArgumentParser]) -> None:
    """Add the flight commands."""
    flights = add_client_command(commands, "flights", "the flights, or one flight in detail")
    flights.add_argument("name", nargs="?", metavar="FLIGHT", help="one flight's id")
    flights.set_defaults(func=cmd_flights)

    report = add_client_command(
        commands, "report", "write a flight's report: one HTML file (or a PDF)"
    )
    report.add_argument("flight", metavar="FLIGHT", help="the flight's id (aip flights)")
    report.add_argument("-o", "--output", metavar="FILE", help="default: FLIGHT.html")
    report.add_argument("--pdf", action="store_true", help="a PDF (needs Chromium on the service)")
    report.add_argument("--since", metavar="FLIGHT", help="also what changed since this flight")
    report.set_defaults(func=cmd_report)

    changes = add_client_command(
        commands, "changes", "what is new, gone and moved between two flights"
    )
    changes.add_argument("before", metavar="BEFORE", help="the earlier flight")
    changes.add_argument("after", metavar="AFTER", help="the later flight")
    changes.add_argument("--geojson", action="store_true", help="print the changes as GeoJSON")
    changes.set_defaults(func=cmd_changes)

    again = add_client_command(
        commands,
        "georeference",
        "work out where the filtered finished jobs' detections are again (jobs from before "
        "geometry, or a new ground elevation)",
    )
    ground = again.add_mutually_exclusive_group()
    ground.add_argument(
        "--ground-elevation",
        type=float,
        metavar="METRES",
        help="the ground's height above sea level, kept in the jobs' parameters",
    )
    ground.add_argument(
        "--takeoff-ground",
        action="store_true",
        help="flat ground at take-off height again (drops a ground elevation)",
    )
    add_filters(again)
    again.set_defaults(func=cmd_georeference)

"""`aip flights|report|changes|georeference`: flights, their reports, what changed between two,
and placing finished jobs on the ground again; clients of a running service."""

from __future__ import annotations

import argparse
import contextlib
import re
import sys
from pathlib import Path
from typing import Any
from urllib.parse import quote

from service.cli.filters import add_filters, filters
from service.cli.output import print_json
from service.cli.waiting import wait_for
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
        f"{flight['id']}  {_span(flight)}  {flight['frames']} frame"
        f"{'s' if flight['frames'] != 1 else ''} "
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


def _attachment_name(disposition: str, fallback: str) -> str:
    """The file name the service gave its answer (already made safe there), else `fallback`."""
    found = re.search(r'filename="([^"/\\]+)"', disposition)
    return found.group(1) if found else fallback


def cmd_report(args: argparse.Namespace) -> int:
    fmt = "pdf" if args.pdf or (args.output or "").lower().endswith(".pdf") else "html"
    params = {"format": fmt, **({"since": args.since} if args.since else {})}
    client = Client(settings_from(args), args.url)
    with client.stream("GET", _path("/v1/reports", args.flight), params=params) as response:
        if response.status_code != 200:  # a redirect, say: not a report
            raise ClientError(f"the service answered {response.status_code} instead of the report")
        disposition = response.headers.get("content-disposition", "")
        target = Path(args.output or _attachment_name(disposition, f"report.{fmt}"))
        try:
            with target.open("wb") as out:
                for chunk in response.iter_bytes():
                    out.write(chunk)
        except BaseException as exc:
            with contextlib.suppress(OSError):
                target.unlink(missing_ok=True)  # never leave half a report behind
            if isinstance(exc, OSError):
                raise ClientError(f"cannot write the report to {target}: {exc.strerror}") from None
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


def _change_line(change: dict[str, Any]) -> str:
    moved = f" by {change['distance_m']:.1f} m" if change.get("distance_m") is not None else ""
    seen = change["after"] or change["before"]
    return f"{change['kind']:<5} {change['label']}{moved} (job {seen['job_id']} #{seen['number']})"


def describe_changes(client: Client, params: dict[str, Any], args: argparse.Namespace) -> int:
    """Queue the reasoner's descriptions of the changes; with --wait, print each one."""
    asked = {**params, "kinds": args.kinds, "limit": args.limit}
    queued = client.call(
        "POST", "/v1/changes/describe", params={k: v for k, v in asked.items() if v is not None}
    )
    if args.json and not args.wait:
        print_json(queued)
        return 0
    ids = [entry["job_id"] for entry in queued["jobs"] if entry["job_id"] is not None]
    ended = {job["id"]: job for job in (wait_for(client, ids) if args.wait and ids else [])}
    if args.json:
        print_json({**queued, "described": list(ended.values())})
        return 0
    if not queued["jobs"]:
        print(f"{args.before} -> {args.after}: nothing new, gone or moved to describe")
    for entry in queued["jobs"]:
        job = ended.get(entry["job_id"])
        if entry["job_id"] is None:
            print(f"{_change_line(entry)}: not described: {entry.get('reason')}")
        elif job is None:
            print(f"{_change_line(entry)}: job {entry['job_id']} queued")
        elif job["status"] == "succeeded":
            text = " ".join(str((job.get("result") or {}).get("reasoning") or "").split())
            print(f"{_change_line(entry)}: {text or '(no description)'}")
        else:
            why = (job.get("error") or {}).get("message") or job["status"]
            print(f"{_change_line(entry)}: job {job['id']} {job['status']}: {why}")
    return 0


def cmd_changes(args: argparse.Namespace) -> int:
    params = {"before": args.before, "after": args.after}
    client = Client(settings_from(args), args.url)
    if args.describe:
        return describe_changes(client, params, args)
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
    report.add_argument(
        "-o", "--output", metavar="FILE", help="default: flight-NAME.html (or .pdf) here"
    )
    report.add_argument("--pdf", action="store_true", help="a PDF (needs Chromium on the service)")
    report.add_argument("--since", metavar="FLIGHT", help="also what changed since this flight")
    report.set_defaults(func=cmd_report)

    changes = add_client_command(
        commands, "changes", "what is new, gone and moved between two flights"
    )
    changes.add_argument("before", metavar="BEFORE", help="the earlier flight")
    changes.add_argument("after", metavar="AFTER", help="the later flight")
    changes.add_argument("--geojson", action="store_true", help="print the changes as GeoJSON")
    changes.add_argument(
        "--describe",
        action="store_true",
        help="queue a job per new, gone or moved object: the reasoner describes the change "
        "from its place in both flights, side by side",
    )
    changes.add_argument("--kinds", metavar="KINDS", help="with --describe: e.g. new,gone")
    changes.add_argument(
        "--limit", type=int, metavar="N", help="with --describe: describe the first N changes"
    )
    changes.add_argument(
        "--wait", action="store_true", help="with --describe: wait and print each description"
    )
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

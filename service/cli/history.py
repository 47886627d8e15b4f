"""`aip export|stats|prune`: the history commands, clients of a running service."""

from __future__ import annotations

import argparse
import sys
from typing import Any

from service.cli.filters import add_filters, filters
from service.cli.output import print_json
from service.client import Client, add_client_command, settings_from

FORMATS = ("csv", "jsonl", "geojson", "kml", "coco")


def cmd_export(args: argparse.Namespace) -> int:
    if args.json and args.format not in (None, "jsonl"):
        print(
            f"aip: --json writes JSON Lines (--format jsonl); it cannot be combined with "
            f"--format {args.format}",
            file=sys.stderr,
        )
        return 2
    fmt = args.format or ("jsonl" if args.json else "csv")
    client = Client(settings_from(args), args.url)
    with client.stream("GET", f"/v1/exports/jobs.{fmt}", params=filters(args)) as response:
        for chunk in response.iter_bytes():
            sys.stdout.buffer.write(chunk)
    sys.stdout.flush()
    return 0


def print_stats(report: dict[str, Any]) -> None:
    statuses = ", ".join(f"{n} {status}" for status, n in report["by_status"].items())
    print(f"jobs: {report['jobs']}" + (f" ({statuses})" if statuses else ""))
    if report["per_day"]:
        print("per day:")
        for day in report["per_day"]:
            print(f"  {day['day']}  {day['jobs']:>6}")
    if report["detections_per_label"]:
        print("detections per label:")
        width = max(len(label) for label in report["detections_per_label"])
        for label, counts in report["detections_per_label"].items():
            print(
                f"  {label:<{width}}  {counts['detections']:>6} in {counts['jobs']} "
                f"job{'s' if counts['jobs'] != 1 else ''}"
            )
    if report["mean_timings_ms"]:
        means = ", ".join(f"{k} {v:.0f} ms" for k, v in report["mean_timings_ms"].items())
        print(f"mean timings of succeeded jobs: {means}")


def cmd_stats(args: argparse.Namespace) -> int:
    report = Client(settings_from(args), args.url).call("GET", "/v1/stats", params=filters(args))
    if args.json:
        print_json(report)
    else:
        print_stats(report)
    return 0


def cmd_prune(args: argparse.Namespace) -> int:
    body = {
        "older_than": args.older_than,
        "keep_results": args.keep_results,
        "dry_run": args.dry_run,
    }
    report = Client(settings_from(args), args.url).call("POST", "/v1/prune", json=body)
    if args.json:
        print_json(report)
        return 0
    verb = "would free" if args.dry_run else "freed"
    print(
        f"{verb} {report['bytes_freed']:,} bytes: {report['images_removed']} stored images, "
        f"{report['jobs_removed']} jobs"
    )
    return 0


def register(commands: argparse._SubParsersAction[argparse.ArgumentParser]) -> None:
    """Add the history commands."""
    export = add_client_command(commands, "export", "write the filtered jobs to stdout")
    export.add_argument(
        "--format", choices=FORMATS, help="csv (the default; a row per detection), jsonl, "
        "geojson or kml (frames, footprints and located detections) or coco; --json means jsonl"
    )  # fmt: skip
    add_filters(export)
    export.set_defaults(func=cmd_export)

    stats = add_client_command(commands, "stats", "statistics over the filtered jobs")
    add_filters(stats)
    stats.set_defaults(func=cmd_stats)

    prune = add_client_command(commands, "prune", "remove finished jobs older than an age")
    prune.add_argument("--older-than", required=True, help="e.g. 30d, 12h")
    prune.add_argument(
        "--keep-results", action="store_true", help="remove only the stored images, keep the rows"
    )
    prune.add_argument("--dry-run", action="store_true", help="report, remove nothing")
    prune.set_defaults(func=cmd_prune)

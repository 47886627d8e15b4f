"""History filters shared by `aip jobs`, `export` and `stats`: flags in, query parameters out."""

from __future__ import annotations

import argparse
from typing import Any

FILTERS = ("status", "source", "created_after", "created_before", "captured_after",
           "captured_before", "folder", "label", "min_count", "q", "bbox", "min_size_m",
           "flight")  # fmt: skip


HELP = {
    "status": "queued, running, succeeded, failed or cancelled",
    "source": "api, path or inbox",
    "created_after": "ISO 8601 time (UTC)",
    "created_before": "ISO 8601 time (UTC)",
    "captured_after": "EXIF capture time, ISO 8601",
    "captured_before": "EXIF capture time, ISO 8601",
    "folder": "inbox subfolder",
    "label": "jobs that detected this label",
    "min_count": "with --label or --min-size-m: at least this many of them",
    "q": "words that must all appear in the prompt or the reasoning",
    "bbox": "MINLON,MINLAT,MAXLON,MAXLAT: frames whose ground footprint overlaps the box",
    "min_size_m": "jobs with a detection (of --label) at least this many metres across",
    "flight": "jobs of this flight (aip flights)",
}


class Once(argparse.Action):
    """A filter given twice is a usage error: the service filters on one value of each, and
    argparse would silently keep the last."""

    def __call__(
        self,
        parser: argparse.ArgumentParser,
        namespace: argparse.Namespace,
        values: Any,
        option_string: str | None = None,
    ) -> None:
        if getattr(namespace, self.dest) is not None:
            raise argparse.ArgumentError(
                self, "given twice: the service filters on one value; run the command once for each"
            )
        setattr(namespace, self.dest, values)


def add_filters(sub: argparse.ArgumentParser) -> None:
    for name in FILTERS:
        sub.add_argument(
            f"--{name.replace('_', '-')}",
            dest=name,
            action=Once,
            type=int if name == "min_count" else str,
            help=HELP[name],
        )


def filters(args: argparse.Namespace) -> dict[str, Any]:
    return {name: getattr(args, name) for name in FILTERS if getattr(args, name) is not None}

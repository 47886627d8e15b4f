"""`python -m bench`: run every benchmark (or those named with --only), print one table of
ours-vs-baseline ratios, and write it as Markdown and JSON with the machine it ran on."""

from __future__ import annotations

import argparse
import datetime
import importlib
import sys
import time
import traceback
from pathlib import Path

from bench import machine
from bench.table import Row, as_json, as_row, markdown, text

# name -> module; each module has `run(quick: bool) -> list[Row | dict]` and runs alone too
# (`python -m bench.queue_bench`). Roughly cheapest first, so a broken run fails fast.
REGISTRY = {
    "queue": "bench.queue_bench",
    "api": "bench.api_bench",
    "blas": "bench.blas_bench",
    "history": "bench.history_bench",
    "geo": "bench.geo_bench",
    "inbox": "bench.inbox_bench",
    "events": "bench.events_bench",
    "model_host": "bench.model_host_bench",
    "overhead": "bench.overhead_bench",
    "postgres": "bench.postgres_bench",  # starts a throwaway PostgreSQL server
    "two_server": "bench.two_server_bench",
    "multiquery": "bench.multiquery_bench",
    "tiles": "bench.tiles_bench",
    "followup": "bench.followup_bench",
    "batch": "bench.batch_bench",
    "demo": "bench.demo_bench",
    "decode": "bench.decode_bench",
    "e2b_decode": "bench.e2b_decode_bench",  # full run only: builds the E2B shape once
}

DEFAULT_OUT = Path(__file__).resolve().parent / "results"


def _selected(only: str | None) -> list[str]:
    if not only:
        return list(REGISTRY)
    names = [n.strip() for n in only.split(",") if n.strip()]
    unknown = [n for n in names if n not in REGISTRY]
    if unknown:
        raise SystemExit(
            f"bench: unknown benchmark {', '.join(unknown)}; choose from {', '.join(REGISTRY)}"
        )
    return names


def run_one(name: str, quick: bool) -> list[Row]:
    """A benchmark that fails becomes one row saying so; the others still run."""
    try:
        module = importlib.import_module(REGISTRY[name])
        return [as_row(item) for item in module.run(quick)]
    except Exception as exc:
        traceback.print_exc()
        reason = f"{type(exc).__name__}: {exc}".splitlines()[0]
        return [Row("did not run", None, None, None, "", False, note=reason)]


def main(argv: list[str] | None = None) -> int:
    parser = argparse.ArgumentParser(prog="python -m bench", description=__doc__.splitlines()[0])
    parser.add_argument("--only", help=f"comma-separated subset of: {', '.join(REGISTRY)}")
    parser.add_argument(
        "--quick", action="store_true", help="fewer samples and smaller sizes (< 10 min in all)"
    )
    parser.add_argument(
        "--out", type=Path, default=DEFAULT_OUT, help="folder for the Markdown and JSON tables"
    )
    args = parser.parse_args(argv)
    names = _selected(args.only)
    started = datetime.datetime.now(datetime.UTC)
    sections: dict[str, list[Row]] = {}
    for name in names:
        began = time.perf_counter()
        print(f"bench: running {name} ...", file=sys.stderr, flush=True)
        sections[name] = run_one(name, args.quick)
        print(f"bench: {name} took {time.perf_counter() - began:.1f} s", file=sys.stderr)
    described = machine.describe()
    header = {
        "date": started.strftime("%Y-%m-%d %H:%M UTC"),
        "mode": "quick" if args.quick else "full",
        "machine": described,
    }
    about = f"{header['date']}, {header['mode']} run; " + "; ".join(
        f"{k} {v}" for k, v in described.items() if v is not None
    )
    print(f"\n{about}\n")
    print(text(sections))
    args.out.mkdir(parents=True, exist_ok=True)
    stem = f"bench-{started.strftime('%Y%m%dT%H%M%SZ')}"
    md = args.out / f"{stem}.md"
    md.write_text(
        f"# Benchmarks\n\n{about}\n\nRatios are ours / baseline, both measured in this run with"
        " the alternatives interleaved with ours; times are medians.\n\n"
        f"{markdown(sections)}\n"
    )
    js = args.out / f"{stem}.json"
    js.write_text(as_json(sections, header) + "\n")
    print(f"\nwritten: {md} and {js}")
    failed = any(row.measure == "did not run" for rows in sections.values() for row in rows)
    return 1 if failed else 0


if __name__ == "__main__":
    sys.exit(main())

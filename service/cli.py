"""The `aip` command: `serve` runs the service; the other commands are its HTTP clients, plus
`models tiny` to write demo checkpoints."""

from __future__ import annotations

import argparse
import json
import logging
import os
import signal
import sys
import time
from pathlib import Path
from typing import Any

from service import __version__, deploy
from service.client import Client, add_client_command, settings_from
from service.config import Settings
from service.errors import AipError
from service.logs import configure_logging
from service.models.commands import register as model_commands_register

TERMINAL = ("succeeded", "failed", "cancelled")


def prepare_models(settings: Settings) -> Settings:
    """Point the settings at weights on disk: tiny checkpoints for --demo, otherwise the
    configured sources, downloaded once (with progress) when they are hub ids not yet cached."""
    if settings.demo:
        from service.models.tiny import build_tiny_checkpoints

        print(
            f"aip: demo mode: tiny random-weight checkpoints in {settings.demo_models_dir}",
            file=sys.stderr,
        )
        detector, reasoner = build_tiny_checkpoints(settings.demo_models_dir)
        return settings.replace(detector=str(detector), reasoner=str(reasoner))
    from service.models.sources import resolve

    detector = resolve("detector", settings.detector, allow_download=True)
    reasoner = resolve("reasoner", settings.reasoner, allow_download=True)
    return settings.replace(detector=str(detector), reasoner=str(reasoner))


def cmd_serve(args: argparse.Namespace) -> int:
    settings = settings_from(args)
    if settings.exposed_without_token:
        print(
            f"aip: refusing to listen on {settings.host} without a token: set AIP_TOKEN (or "
            "--token) so only clients that know it can reach your images",
            file=sys.stderr,
        )
        return 2
    configure_logging(args.log_level, settings.logs_dir, stderr=settings.log_stderr)
    try:
        settings = prepare_models(settings)
    except AipError as exc:
        print(f"aip: {exc.message}", file=sys.stderr)
        return 2
    import uvicorn

    from service.app import create_app

    # uvicorn re-raises the stop signal once it has shut down; a stop we were asked for is
    # a clean exit (status 0), which is what launchd and systemd must see.
    for stop_signal in (signal.SIGTERM, signal.SIGINT):
        signal.signal(stop_signal, lambda *_: None)
    uvicorn.run(
        create_app(settings),
        host=settings.host,
        port=settings.port,
        log_level=args.log_level,
        log_config=None,  # uvicorn's records go through configure_logging's handlers
        timeout_graceful_shutdown=int(settings.shutdown_grace_seconds) + 2,
    )
    # Everything is closed and durable by now. Skip interpreter teardown: an inference that
    # shutdown gave up on may still hold MLX threads, whose C++ teardown can abort.
    logging.shutdown()
    sys.stdout.flush()
    sys.stderr.flush()
    os._exit(0)


def cmd_models_pull(args: argparse.Namespace) -> int:
    from service.models.sources import resolve

    settings = settings_from(args)
    roles = [args.role] if args.role else ["detector", "reasoner"]
    for role in roles:
        source = settings.detector if role == "detector" else settings.reasoner
        try:
            path = resolve(role, source, allow_download=True)
        except AipError as exc:
            print(f"aip: {exc.message}", file=sys.stderr)
            return 2
        print(f"{role}: {source} -> {path}")
    return 0


def cmd_models_tiny(args: argparse.Namespace) -> int:
    from service.models.tiny import build_tiny_checkpoints

    detector, reasoner = build_tiny_checkpoints(Path(args.dir))
    print(f"detector: {detector}\nreasoner: {reasoner}")
    return 0


def _print_job(job: dict[str, Any], as_json: bool) -> None:
    if as_json:
        print(json.dumps(job, indent=2))
        return
    print(
        f"job {job['id']}: {job['status']} (attempt {job['attempts']}/{job['max_attempts']}) "
        f"{job['input']['name']} {job['input']['width']}x{job['input']['height']}"
    )
    if job.get("error"):
        print(f"  error: {job['error']['code']}: {job['error']['message']}")
    result = job.get("result")
    if result:
        print(f"  detections: {len(result['detections'])}")
        for d in result["detections"]:
            print(f"    {d['number']}. {d['label']} {d['box']}")
        print(f"  reasoning: {result['reasoning']}")
    if job.get("timings_ms"):
        print("  timings (ms): " + ", ".join(f"{k} {v:.0f}" for k, v in job["timings_ms"].items()))


def cmd_submit(args: argparse.Namespace) -> int:
    client = Client(settings_from(args), args.url)
    path = Path(args.image)
    if not path.is_file():
        print(f"aip: no file at {path}", file=sys.stderr)
        return 2
    data: dict[str, Any] = {"queries": args.query or []}
    if args.prompt:
        data["prompt"] = args.prompt
    with path.open("rb") as f:
        job = client.call("POST", "/v1/jobs", files={"image": (path.name, f)}, data=data)
    if args.wait:
        while job["status"] not in TERMINAL:
            time.sleep(0.5)
            job = client.call("GET", f"/v1/jobs/{job['id']}")
    _print_job(job, args.json)
    return 1 if args.wait and job["status"] != "succeeded" else 0


def cmd_jobs(args: argparse.Namespace) -> int:
    client = Client(settings_from(args), args.url)
    params: dict[str, Any] = {"limit": args.limit, **_filters(args)}
    page = client.call("GET", "/v1/jobs", params=params)
    if args.json:
        print(json.dumps(page, indent=2))
        return 0
    for job in page["jobs"]:
        found = len(job["result"]["detections"]) if job.get("result") else "-"
        print(
            f"{job['id']:>6}  {job['status']:<9}  {job['created_at']}  "
            f"{found!s:>3} found  {job['input']['name']}"
        )
    return 0


def cmd_show(args: argparse.Namespace) -> int:
    _print_job(Client(settings_from(args), args.url).call("GET", f"/v1/jobs/{args.id}"), args.json)
    return 0


def cmd_cancel(args: argparse.Namespace) -> int:
    job = Client(settings_from(args), args.url).call("POST", f"/v1/jobs/{args.id}/cancel")
    _print_job(job, args.json)
    return 0


def cmd_retry(args: argparse.Namespace) -> int:
    job = Client(settings_from(args), args.url).call("POST", f"/v1/jobs/{args.id}/retry")
    _print_job(job, args.json)
    return 0


FILTERS = ("status", "source", "created_after", "created_before", "captured_after",
           "captured_before", "folder", "label", "min_count", "q")  # fmt: skip


def _add_filters(sub: argparse.ArgumentParser) -> None:
    for name in FILTERS:
        sub.add_argument(
            f"--{name.replace('_', '-')}", dest=name, type=int if name == "min_count" else str
        )


def _filters(args: argparse.Namespace) -> dict[str, Any]:
    return {name: getattr(args, name) for name in FILTERS if getattr(args, name) is not None}


def cmd_export(args: argparse.Namespace) -> int:
    client = Client(settings_from(args), args.url)
    with client.http.stream(
        "GET", f"/v1/exports/jobs.{args.format}", params=_filters(args)
    ) as response:
        if response.status_code >= 400:
            body = json.loads(response.read() or b"{}")
            print(f"aip: {body.get('code')}: {body.get('message')}", file=sys.stderr)
            return 2
        for chunk in response.iter_bytes():
            sys.stdout.buffer.write(chunk)
    sys.stdout.flush()
    return 0


def cmd_stats(args: argparse.Namespace) -> int:
    print(
        json.dumps(
            Client(settings_from(args), args.url).call("GET", "/v1/stats", params=_filters(args)),
            indent=2,
        )
    )
    return 0


def cmd_prune(args: argparse.Namespace) -> int:
    body = {
        "older_than": args.older_than,
        "keep_results": args.keep_results,
        "dry_run": args.dry_run,
    }
    report = Client(settings_from(args), args.url).call("POST", "/v1/prune", json=body)
    verb = "would free" if args.dry_run else "freed"
    print(
        f"{verb} {report['bytes_freed']:,} bytes: {report['images_removed']} stored images, "
        f"{report['jobs_removed']} jobs"
    )
    return 0


def build_parser() -> argparse.ArgumentParser:
    parser = argparse.ArgumentParser(prog="aip", description="Local-first visual AI jobs.")
    parser.add_argument("--version", action="version", version=f"aip {__version__}")
    commands = parser.add_subparsers(dest="command", required=True)

    serve = commands.add_parser("serve", help="run the service (API, worker, models)")
    serve.add_argument(
        "--demo", action="store_true", help="run offline on tiny random-weight checkpoints"
    )
    serve.add_argument("--data-dir", type=Path)
    serve.add_argument("--inbox", type=Path)
    serve.add_argument("--host")
    serve.add_argument("--port", type=int)
    serve.add_argument("--detector", help="hub id or local folder (AIP_DETECTOR)")
    serve.add_argument("--reasoner", help="hub id or local folder (AIP_REASONER)")
    serve.add_argument("--token", help="bearer token clients must send (AIP_TOKEN)")
    serve.add_argument("--log-level", default="info", choices=["debug", "info", "warning", "error"])
    serve.set_defaults(func=cmd_serve)

    def client_command(name: str, help_text: str) -> argparse.ArgumentParser:
        return add_client_command(commands, name, help_text)

    submit = client_command("submit", "submit an image")
    submit.add_argument("image")
    submit.add_argument("--query", "-q", action="append", help="detection query (repeatable)")
    submit.add_argument("--prompt", "-p", help="question for the reasoning model")
    submit.add_argument("--wait", action="store_true", help="wait for the result")
    submit.set_defaults(func=cmd_submit)

    jobs = client_command("jobs", "list jobs, newest first")
    _add_filters(jobs)
    jobs.add_argument("--limit", type=int, default=20)
    jobs.set_defaults(func=cmd_jobs)

    for name, func, text in (
        ("show", cmd_show, "show one job"),
        ("cancel", cmd_cancel, "cancel a job"),
        ("retry", cmd_retry, "queue a failed job again"),
    ):
        sub = client_command(name, text)
        sub.add_argument("id", type=int)
        sub.set_defaults(func=func)

    export = client_command("export", "write the filtered jobs to stdout")
    export.add_argument("--format", choices=["csv", "jsonl", "geojson", "coco"], default="csv")
    _add_filters(export)
    export.set_defaults(func=cmd_export)

    stats = client_command("stats", "statistics over the filtered jobs")
    _add_filters(stats)
    stats.set_defaults(func=cmd_stats)

    prune = client_command("prune", "remove finished jobs older than an age")
    prune.add_argument("--older-than", required=True, help="e.g. 30d, 12h")
    prune.add_argument(
        "--keep-results", action="store_true", help="remove only the stored images, keep the rows"
    )
    prune.add_argument("--dry-run", action="store_true", help="report, remove nothing")
    prune.set_defaults(func=cmd_prune)

    models = commands.add_parser("models", help="model checkpoints")
    model_commands = models.add_subparsers(dest="models_command", required=True)
    pull = model_commands.add_parser("pull", help="download the configured models once")
    pull.add_argument("role", nargs="?", choices=["detector", "reasoner"])
    pull.add_argument("--detector")
    pull.add_argument("--reasoner")
    pull.set_defaults(func=cmd_models_pull)
    tiny = model_commands.add_parser("tiny", help="write tiny random-weight checkpoints")
    tiny.add_argument("dir")
    tiny.set_defaults(func=cmd_models_tiny)
    model_commands_register(model_commands)
    deploy.register(commands)
    return parser


def main(argv: list[str] | None = None) -> int:
    args = build_parser().parse_args(argv)
    try:
        return int(args.func(args))
    except BrokenPipeError:
        # The reader went away (`aip export | head`): not an error, and nothing left to say.
        os.dup2(os.open(os.devnull, os.O_WRONLY), sys.stdout.fileno())
        return 0


if __name__ == "__main__":
    sys.exit(main())

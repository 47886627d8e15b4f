"""`aip submit|wait|jobs|show|cancel|retry`: the job commands, clients of a running service."""

from __future__ import annotations

import argparse
import hashlib
import json
import shlex
import sys
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any, BinaryIO

from service.cli.files import image_files, open_regular
from service.cli.filters import FILTERS, add_filters, filters
from service.cli.output import job_summary, print_job, print_json
from service.cli.waiting import TERMINAL, interrupted, wait_for
from service.client import Client, ClientError, add_client_command, settings_from


def _client(args: argparse.Namespace) -> Client:
    return Client(settings_from(args), args.url)


def _request_key(f: BinaryIO, data: dict[str, Any]) -> str:
    """The same bytes with the same parameters make the same key, so submitting them again
    returns the first job (a duplicate) instead of doing the work twice."""
    digest = hashlib.sha256(json.dumps(data, sort_keys=True).encode())
    for block in iter(lambda: f.read(1 << 20), b""):
        digest.update(block)
    f.seek(0)
    return f"aip-submit-{digest.hexdigest()}"


@dataclass
class Submitted:
    accepted: list[dict[str, Any]] = field(default_factory=list)
    duplicates: list[dict[str, Any]] = field(default_factory=list)
    refused: list[tuple[str, str]] = field(default_factory=list)

    @property
    def ids(self) -> list[int]:
        seen: dict[int, None] = {}
        for job in (*self.accepted, *self.duplicates):
            seen[job["id"]] = None
        return list(seen)

    def line(self) -> str:
        def count(n: int, word: str) -> str:
            return f"{n} {word}" + ("s" if n != 1 and word == "duplicate" else "")

        return (
            f"{count(len(self.accepted), 'accepted')}, "
            f"{count(len(self.duplicates), 'duplicate')}, {count(len(self.refused), 'refused')}"
        )


def cmd_submit(args: argparse.Namespace) -> int:
    client = _client(args)
    files, refused = image_files(args.paths)
    data: dict[str, Any] = {"queries": args.query or []}
    if args.prompt:
        data["prompt"] = args.prompt
    for name in ("detect_max_tokens", "reason_max_tokens"):
        if getattr(args, name) is not None:  # else the service's setting
            data[name] = str(getattr(args, name))
    data.update(_spec_fields(args))
    done = Submitted()
    for name, why in refused:
        _refuse(args, done, name, {"code": "not_found", "message": why}, why)
    try:
        for path in files:
            _submit_one(client, args, path, data, done)
    except KeyboardInterrupt:
        if not done.ids:
            raise
        raise interrupted(done.ids) from None
    except ClientError as exc:
        if done.ids:  # the service went away part way: say what it did accept
            exc.message += f" (accepted before that: {', '.join(map(str, done.ids))})"
        raise
    several = len(args.paths) > 1 or any(Path(p).is_dir() for p in args.paths)
    if several and not args.json:
        print(done.line())
    if not args.wait or not done.ids:
        if done.ids and not args.json:
            print(f"follow with: aip wait {' '.join(map(str, done.ids))}", file=sys.stderr)
        return 1 if done.refused else 0
    jobs = wait_for(client, done.ids, timeout=args.timeout)
    _print_finished(jobs, args.json)
    ok = all(j["status"] == "succeeded" for j in jobs)
    return 0 if ok and not done.refused else 1


def _spec_fields(args: argparse.Namespace) -> dict[str, Any]:
    """The job options given as flags, as form fields (the service checks them); one left
    out comes from the profile, else the service's defaults."""
    data: dict[str, Any] = {}
    if args.profile:
        data["profile"] = args.profile
    if args.tiling:
        data["tiling"] = args.tiling
    if args.schema:
        try:
            data["response_schema"] = Path(args.schema).read_text(encoding="utf-8")
            if not data["response_schema"].strip():
                raise ClientError(
                    f"the schema file {args.schema} is empty: it must hold a JSON Schema"
                )
        except (OSError, UnicodeDecodeError) as exc:
            raise ClientError(f"cannot read the schema file {args.schema}: {exc}") from None
    if args.redact:
        data["redact"] = args.redact
    if args.set_of_marks:
        data["set_of_marks"] = "true"
    if args.no_keep_original:
        data["keep_original"] = "false"
    if args.flight:
        data["flight"] = args.flight
    if args.ground_elevation is not None:
        data["ground_elevation"] = args.ground_elevation
    return data


def _say(args: argparse.Namespace, text: str, job: dict[str, Any]) -> None:
    """A line per file; with --json the job's JSON Line (after --wait: once it has ended)."""
    if not args.json:
        print(text, flush=True)
    elif not args.wait:
        print_json(job, lines=True)


def _refuse(
    args: argparse.Namespace, done: Submitted, path: str, error: dict[str, Any], why: str
) -> None:
    done.refused.append((path, why))
    if args.json:
        print_json({"path": path, "error": error}, lines=True)
    else:
        print(f"{path}: refused: {why}", flush=True)


def _submit_one(
    client: Client, args: argparse.Namespace, path: Path, data: dict[str, Any], done: Submitted
) -> None:
    try:
        with open_regular(path) as f:
            headers = {} if args.again else {"Idempotency-Key": _request_key(f, data)}
            status, job = client.status_and_json(
                "POST", "/v1/jobs", files={"image": (path.name, f)}, data=data, headers=headers
            )
    except OSError as exc:
        _refuse(args, done, str(path), {"code": "unreadable", "message": str(exc)}, str(exc))
        return
    except ClientError as exc:
        if exc.body is None:
            raise  # not a refusal of this file: the service is not there, or not aip
        _refuse(args, done, str(path), exc.body, exc.message)
        return
    if status == 202:
        done.accepted.append(job)
        _say(args, f"{path}: job {job['id']} {job['status']}", job)
    else:
        done.duplicates.append(job)
        _say(
            args,
            f"{path}: duplicate of job {job['id']} ({job['status']}); --again submits it anew",
            job,
        )


def _print_finished(jobs: list[dict[str, Any]], as_json: bool) -> None:
    if as_json:
        for job in jobs:
            print_json(job, lines=True)
    elif len(jobs) == 1:
        print_job(jobs[0])
    else:
        for job in jobs:
            print(job_summary(job))


def cmd_wait(args: argparse.Namespace) -> int:
    jobs = wait_for(_client(args), args.ids, timeout=args.timeout)
    _print_finished(jobs, args.json)
    return 0 if all(j["status"] == "succeeded" for j in jobs) else 1


def _when(stamp: str | None) -> str:
    return (stamp or "-").replace("T", " ")[:19]


def cmd_jobs(args: argparse.Namespace) -> int:
    params: dict[str, Any] = {"limit": args.limit, "sort": args.sort, **filters(args)}
    if args.cursor:
        params["cursor"] = args.cursor
    page = _client(args).call("GET", "/v1/jobs", params=params)
    if args.json:
        print_json(page)
        return 0
    if not page["jobs"]:
        print("no jobs" + (" match these filters" if filters(args) else " yet"))
    else:
        print(f"{'ID':>6}  {'STATUS':<9}  {'CREATED':<19}  {'FOUND':>5}  NAME")
    for job in page["jobs"]:
        found = len(job["result"]["detections"]) if job.get("result") else "-"
        print(
            f"{job['id']:>6}  {job['status']:<9}  {_when(job['created_at']):<19}  "
            f"{found!s:>5}  {job['input']['name']}"
        )
    if page.get("next_cursor"):
        print(f"more: {_next_page(args, page['next_cursor'])}")
    return 0


def _next_page(args: argparse.Namespace, cursor: str) -> str:
    """The same `aip jobs` command, on the next page."""
    argv = ["aip", "jobs"]
    for name in FILTERS:
        value = getattr(args, name)
        if value is not None:
            argv += [f"--{name.replace('_', '-')}", str(value)]
    if args.limit != 20:
        argv += ["--limit", str(args.limit)]
    if args.sort != "created":
        argv += ["--sort", args.sort]
    if args.url:
        argv += ["--url", args.url]
    return shlex.join([*argv, "--cursor", cursor])


def cmd_show(args: argparse.Namespace) -> int:
    job = _client(args).call("GET", f"/v1/jobs/{args.id}")
    if args.json:
        print_json(job)
    else:
        print_job(job)
    return 0


def cmd_cancel(args: argparse.Namespace) -> int:
    status, job = _client(args).status_and_json("POST", f"/v1/jobs/{args.id}/cancel")
    if args.json:
        print_json(job)
    elif status == 202 and job["status"] not in TERMINAL:
        print(
            f"job {job['id']}: cancel requested; it stops at its next stage, or finishes if "
            f"it is in its last (`aip wait {job['id']}` shows which)"
        )
    else:
        print(f"job {job['id']}: {job['status']}")
    return 0


def cmd_retry(args: argparse.Namespace) -> int:
    job = _client(args).call("POST", f"/v1/jobs/{args.id}/retry")
    if args.json:
        print_json(job)
    else:
        print(
            f"job {job['id']}: {job['status']} again (up to {job['max_attempts']} attempts); "
            f"`aip wait {job['id']}` waits for it"
        )
    return 0


def _timeout(parser: argparse.ArgumentParser) -> None:
    parser.add_argument(
        "--timeout", type=float, metavar="SECONDS", help="stop waiting after this long (exit 1)"
    )


def register(commands: argparse._SubParsersAction[argparse.ArgumentParser]) -> None:
    """Add the job commands."""

    def client_command(name: str, help_text: str) -> argparse.ArgumentParser:
        return add_client_command(commands, name, help_text)

    submit = client_command("submit", "submit images: files, or folders of them (one job each)")
    submit.add_argument("paths", nargs="+", metavar="PATH", help="an image file, or a folder")
    submit.add_argument("--query", "-q", action="append", help="detection query (repeatable)")
    submit.add_argument("--prompt", "-p", help="question for the reasoning model")
    submit.add_argument(
        "--detect-max-tokens",
        type=int,
        metavar="N",
        help="tokens per detection query (default and ceiling: the service's "
        "AIP_DETECT_MAX_TOKENS)",
    )
    submit.add_argument(
        "--reason-max-tokens",
        type=int,
        metavar="N",
        help="tokens of reasoning (default and ceiling: the service's AIP_REASON_MAX_TOKENS)",
    )
    submit.add_argument("--profile", metavar="NAME", help="a named profile's parameters")
    submit.add_argument(
        "--tiling",
        metavar="MODE",
        help='auto (the default), off, or JSON such as \'{"size": 992, "overlap": 124}\'',
    )
    submit.add_argument("--schema", metavar="FILE", help="a JSON Schema file the answer must match")
    submit.add_argument(
        "--redact",
        action="append",
        metavar="CLASS",
        help="blur this class in every image handed out (repeatable)",
    )
    submit.add_argument(
        "--set-of-marks",
        action="store_true",
        help="the reasoner also sees the image with numbered boxes drawn",
    )
    submit.add_argument(
        "--no-keep-original",
        action="store_true",
        help="delete the stored original once its redacted copy exists (with --redact)",
    )
    submit.add_argument("--flight", metavar="NAME", help="the flight these frames belong to")
    submit.add_argument(
        "--ground-elevation",
        metavar="METRES",
        help="the ground's height above sea level (default: flat at the take-off height)",
    )
    submit.add_argument("--wait", action="store_true", help="wait for the results")
    submit.add_argument(
        "--again",
        action="store_true",
        help="a new job even for an image already submitted with the same queries and prompt",
    )
    _timeout(submit)
    submit.set_defaults(func=cmd_submit)

    wait = client_command("wait", "wait for jobs to end, showing where they are")
    wait.add_argument("ids", nargs="+", type=int, metavar="ID", help="job id")
    _timeout(wait)
    wait.set_defaults(func=cmd_wait)

    jobs = client_command("jobs", "list jobs, newest first")
    add_filters(jobs)
    jobs.add_argument("--limit", type=int, default=20, help="jobs per page (1..200)")
    jobs.add_argument(
        "--sort", choices=["created", "finished"], default="created", help="newest first by"
    )
    jobs.add_argument("--cursor", help="the next page: the value `more:` printed")
    jobs.set_defaults(func=cmd_jobs)

    for name, func, text in (
        ("show", cmd_show, "show one job: input, EXIF/GPS, parameters, models, results"),
        ("cancel", cmd_cancel, "cancel a queued job, or stop a running one"),
        ("retry", cmd_retry, "queue a failed or cancelled job again"),
    ):
        sub = client_command(name, text)
        sub.add_argument("id", type=int, help="job id")
        sub.set_defaults(func=func)

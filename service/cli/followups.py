"""`aip ask`: a follow-up question on a succeeded job, over HTTP; with --wait, its answer."""

from __future__ import annotations

import argparse
import time
from typing import Any

from service.cli.output import print_json, printable
from service.client import Client, ClientError, add_client_command, settings_from

# Each request waits this long on the service: under the client's own request timeout.
WAIT_STEP = 50


def cmd_ask(args: argparse.Namespace) -> int:
    client = Client(settings_from(args), args.url)
    body: dict[str, Any] = {"question": args.question}
    if args.max_tokens is not None:
        body["max_tokens"] = args.max_tokens
    args.wait = args.wait or args.timeout is not None
    deadline = time.monotonic() + (args.timeout if args.timeout is not None else float("inf"))

    def step() -> float:
        return max(min(WAIT_STEP, deadline - time.monotonic()), 0) if args.wait else 0

    followup = client.call("POST", f"/v1/jobs/{args.id}/ask?wait={step():g}", json=body)
    while args.wait and followup["status"] in ("queued", "running") and step() > 0:
        followup = client.call("GET", f"{followup['links']['self']}?wait={step():g}")
    if args.json:
        print_json(followup)
    elif followup["status"] == "succeeded":
        print(printable(followup["answer"] or ""))
    elif followup["status"] == "failed":
        error = followup["error"] or {}
        raise ClientError(
            f"follow-up {followup['n']} on job {args.id} failed: {error.get('message')}"
        )
    else:
        where = f"`aip show {args.id}` shows it and its answer once there"
        if args.wait:  # --timeout ran out
            raise ClientError(
                f"follow-up {followup['n']} on job {args.id} still {followup['status']} after "
                f"{args.timeout:g} s (--timeout); {where}"
            )
        print(f"job {args.id}: follow-up {followup['n']} {followup['status']}; {where}")
    return 0


def register(commands: argparse._SubParsersAction[argparse.ArgumentParser]) -> None:
    """Add `aip ask`."""
    ask = add_client_command(commands, "ask", "ask a follow-up question on a succeeded job")
    ask.add_argument("id", type=int, metavar="ID", help="job id")
    ask.add_argument("question", help="the question")
    ask.add_argument(
        "--max-tokens",
        type=int,
        metavar="N",
        help="tokens of the answer (default and ceiling: the service's AIP_REASON_MAX_TOKENS)",
    )
    ask.add_argument("--wait", action="store_true", help="wait for the answer and print it")
    ask.add_argument(
        "--timeout",
        type=float,
        metavar="SECONDS",
        help="wait this long at most (implies --wait; exit 1 if unanswered)",
    )
    ask.set_defaults(func=cmd_ask)

"""`aip inbox reprocess PATH`: run a file the inbox already handled (a duplicate, or one
filed in processed/) again, through the running service."""

from __future__ import annotations

import argparse

from service.cli.output import print_json
from service.client import Client, add_client_command, settings_from


def cmd_reprocess(args: argparse.Namespace) -> int:
    job = Client(settings_from(args), args.url).call(
        "POST", "/v1/inbox/reprocess", json={"path": args.path}
    )
    if args.json:
        print_json(job)
    else:
        print(f"{args.path}: job {job['id']} {job['status']}; `aip wait {job['id']}` waits for it")
    return 0


def register(commands: argparse._SubParsersAction[argparse.ArgumentParser]) -> None:
    """Add `aip inbox reprocess`."""
    inbox = commands.add_parser("inbox", help="the watched inbox", description="the watched inbox")
    actions = inbox.add_subparsers(dest="inbox_command", required=True, metavar="ACTION")
    reprocess = add_client_command(
        actions, "reprocess", "process a file the inbox already handled again, as a new job"
    )
    reprocess.add_argument(
        "path", help="the file: absolute, or relative to the inbox (e.g. processed/a.jpg)"
    )
    reprocess.set_defaults(func=cmd_reprocess)

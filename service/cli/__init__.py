"""The `aip` command: the parser and `main`; `serve` runs the service, the other commands are
its HTTP clients (jobs, history, inbox, models, the background service). `main` is where every
failure becomes one sentence and an exit status."""

from __future__ import annotations

import argparse
import os
import sys
from collections.abc import Sequence
from typing import cast

from service import __version__, deploy
from service.cli import history, inbox, jobs, models, serve
from service.cli.waiting import INTERRUPTED
from service.client import ClientError


class CommandParser(argparse.ArgumentParser):
    """A subcommand's parser reports a flag it does not know with its own usage: by default
    argparse leaves unknown flags to the top-level parser, which prints `aip`'s usage."""

    def parse_known_args(  # type: ignore[override]
        self, args: Sequence[str] | None = None, namespace: argparse.Namespace | None = None
    ) -> tuple[argparse.Namespace, list[str]]:
        parsed, extras = super().parse_known_args(args, namespace)
        if extras and self.prog != "aip":
            self.error(f"unrecognized arguments: {' '.join(extras)}")
        return parsed, extras


def build_parser() -> argparse.ArgumentParser:
    parser = CommandParser(prog="aip", description="Local-first visual AI jobs.")
    parser.add_argument("--version", action="version", version=f"aip {__version__}")
    commands = cast(
        "argparse._SubParsersAction[argparse.ArgumentParser]",
        parser.add_subparsers(dest="command", required=True, metavar="COMMAND"),
    )
    serve.register(commands)
    jobs.register(commands)
    history.register(commands)
    inbox.register(commands)
    models.register(commands)
    deploy.register(commands)
    return parser


def main(argv: list[str] | None = None) -> int:
    args = build_parser().parse_args(argv)
    try:
        return int(args.func(args))
    except ClientError as exc:
        print(f"aip: {exc.message}", file=sys.stderr)
        return exc.exit_code
    except KeyboardInterrupt:
        print(file=sys.stderr)  # end the line the ^C was echoed on
        return INTERRUPTED
    except BrokenPipeError:
        # The reader went away (`aip export | head`): not an error, and nothing left to say.
        os.dup2(os.open(os.devnull, os.O_WRONLY), sys.stdout.fileno())
        return 0



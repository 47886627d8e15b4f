"""The `aip` parser and running the chosen command: every failure of a command becomes one
sentence and an exit status here (a Ctrl-C is `main`'s, in `service.cli`)."""

from __future__ import annotations

import argparse
import os
import sys
from collections.abc import Sequence
from typing import cast

from service import __version__, deploy
from service.cli import (
    db,
    flights,
    followups,
    history,
    inbox,
    jobs,
    models,
    profiles,
    serve,
    worker,
)
from service.client import ClientError


class CommandParser(argparse.ArgumentParser):
    """A subcommand's parser reports a flag it does not know with its own usage: by default
    argparse leaves unknown flags to the top-level parser, which prints `aip`'s usage. The
    top-level parser names an unknown option before it would complain of a missing COMMAND."""

    def parse_known_args(  # type: ignore[override]
        self, args: Sequence[str] | None = None, namespace: argparse.Namespace | None = None
    ) -> tuple[argparse.Namespace, list[str]]:
        if self.prog == "aip":
            leading = []
            for arg in sys.argv[1:] if args is None else args:
                if not arg.startswith("-"):
                    break
                leading.append(arg)
            unknown = [a for a in leading if a not in self._option_string_actions]
            if unknown:
                self.error(f"unrecognized arguments: {' '.join(unknown)}")
        parsed, extras = super().parse_known_args(args, namespace)
        if extras and self.prog != "aip":
            self.error(f"unrecognized arguments: {' '.join(extras)}")
        return parsed, extras


def build_parser() -> argparse.ArgumentParser:
    parser = CommandParser(
        prog="aip", description="Local-first visual AI jobs.", allow_abbrev=False
    )
    parser.add_argument("--version", action="version", version=f"aip {__version__}")
    commands = cast(
        "argparse._SubParsersAction[argparse.ArgumentParser]",
        parser.add_subparsers(dest="command", required=True, metavar="COMMAND"),
    )
    serve.register(commands)
    worker.register(commands)
    jobs.register(commands)
    followups.register(commands)
    history.register(commands)
    flights.register(commands)
    inbox.register(commands)
    profiles.register(commands)
    models.register(commands)
    deploy.register(commands)
    db.register(commands)
    return parser


# Options whose values may start with `-` (west longitudes, ground below sea level): argparse
# would take `--bbox -0.1,51.4,0.1,51.6` for two options, so such a value is joined to its flag.
_SIGNED_VALUES = ("--bbox", "--ground-elevation")


def _joined(argv: list[str]) -> list[str]:
    out: list[str] = []
    pending = False
    for arg in argv:
        if pending and arg.startswith("-") and arg != "--":
            out[-1] = f"{out[-1]}={arg}"
        else:
            out.append(arg)
        pending = arg in _SIGNED_VALUES
    return out


def run(argv: list[str]) -> int:
    """Parse `argv` and run the command it names; its exit status."""
    args = build_parser().parse_args(_joined(argv))
    try:
        return int(args.func(args))
    except ClientError as exc:
        print(f"aip: {exc.message}", file=sys.stderr)
        return exc.exit_code
    except BrokenPipeError:
        # The reader went away (`aip export | head`): not an error, and nothing left to say.
        os.dup2(os.open(os.devnull, os.O_WRONLY), sys.stdout.fileno())
        return 0

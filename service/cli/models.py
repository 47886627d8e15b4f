"""`aip models pull|tiny` (weights on this machine), plus the running service's
`list|load|unload` from service.models.commands."""

from __future__ import annotations

import argparse
import sys
from pathlib import Path

from service.client import settings_from
from service.errors import AipError
from service.models.commands import register as register_service_commands


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
    from service.models.tiny import build_checkpoints

    detector, reasoner = build_checkpoints(Path(args.dir), args.size)
    print(f"detector: {detector}\nreasoner: {reasoner}")
    return 0


def register(commands: argparse._SubParsersAction[argparse.ArgumentParser]) -> None:
    """Add `aip models ...`."""
    text = "model checkpoints: on this machine, and in the running service"
    models = commands.add_parser("models", help=text, description=text)
    model_commands = models.add_subparsers(dest="models_command", required=True, metavar="ACTION")

    pull = model_commands.add_parser("pull", help="download the configured models once")
    pull.add_argument(
        "role", nargs="?", choices=["detector", "reasoner"], help="only this role (default both)"
    )
    pull.add_argument("--detector", help="hub id or local folder (AIP_DETECTOR)")
    pull.add_argument("--reasoner", help="hub id or local folder (AIP_REASONER)")
    pull.set_defaults(func=cmd_models_pull)

    # `aip models tiny`
    tiny = model_commands.add_parser("tiny", help="write tiny random-weight checkpoints")
    tiny.add_argument("dir", help="folder to write them into")
    tiny.add_argument(
        "--size",
        choices=("tiny", "small", "e2b"),
        default="tiny",
        help="tiny: for tests and --demo; small: ~90M + ~75M parameters, for benchmarks; "
        "e2b: Gemma 4 E2B's full shape at 4 bits (~2.9 GB) and Falcon Perception 0.6B's",
    )
    tiny.set_defaults(func=cmd_models_tiny)

    register_service_commands(model_commands)

"""`aip profiles`: list, show, set, delete and choose the default of the named job profiles of a
running service, over HTTP."""

from __future__ import annotations

import argparse
import json
import sys
from pathlib import Path
from typing import Any

from service.cli.output import print_json, printable
from service.client import Client, ClientError, add_client_command, settings_from
from service.errors import InvalidInput
from service.profiles import check_name


def _path(name: str, *rest: str) -> str:
    """The profile's URL path; a name that is no profile name (one holding "/" would reach
    another route) is refused here, as the service would refuse it."""
    try:
        check_name(name)
    except InvalidInput as exc:
        raise ClientError(f"{exc.code}: {exc.message}") from None
    return "/".join(["/v1/profiles", name, *rest])


def _client(args: argparse.Namespace) -> Client:
    return Client(settings_from(args), args.url)


def _flags(profile: dict[str, Any]) -> str:
    return ", ".join(
        flag
        for flag, on in (("default", profile["default"]), ("shipped", profile["builtin"]))
        if on
    )


def cmd_list(args: argparse.Namespace) -> int:
    answer = _client(args).call("GET", "/v1/profiles")
    if args.json:
        print_json(answer)
        return 0
    profiles = answer["profiles"]
    if not profiles:
        print("no profiles; `aip profiles set NAME --file F` makes one")
        return 0
    width = max(len(p["name"]) for p in profiles)
    flags = max(len(_flags(p)) for p in profiles)
    for p in profiles:
        line = f"{p['name']:<{width}}  {_flags(p):<{flags}}  {p['description']}"
        print(printable(line.rstrip()))
    return 0


def cmd_show(args: argparse.Namespace) -> int:
    profile = _client(args).call("GET", _path(args.name))
    if args.json:
        print_json(profile)
        return 0
    flags = _flags(profile)
    print(printable(f"{profile['name']}{f' ({flags})' if flags else ''}"))
    if profile["description"]:
        print(printable(profile["description"]))
    print(printable(f"params: {json.dumps(profile['params'], indent=2)}"))
    return 0


def _read(file: str) -> dict[str, Any]:
    """The file's JSON object: a profile as `show --json` prints it, or its params alone."""
    try:
        text = sys.stdin.read() if file == "-" else Path(file).read_text(encoding="utf-8")
        body = json.loads(text)
    except OSError as exc:
        raise ClientError(f"cannot read {file}: {exc.strerror or exc}") from None
    except (ValueError, RecursionError):
        raise ClientError(f"{file} is not JSON: it should hold a profile's params object") from None
    if not isinstance(body, dict):
        raise ClientError(f"{file} holds JSON but not an object of job options")
    return body


def cmd_set(args: argparse.Namespace) -> int:
    client = _client(args)
    given = _read(args.file)
    # A profile as `show --json` prints it carries its params and description; otherwise the
    # whole file is the params.
    params = given.get("params", given)
    description = args.description
    if description is None:
        description = given.get("description") if "params" in given else None
    if description is None:
        try:
            description = client.call("GET", _path(args.name)).get("description", "")
        except ClientError as exc:
            if (exc.body or {}).get("code") != "unknown_profile":
                raise
            description = ""
    status, profile = client.status_and_json(
        "PUT", _path(args.name), json={"description": description, "params": params}
    )
    if args.json:
        print_json(profile)
    else:
        print(f"profile {profile['name']} {'created' if status == 201 else 'replaced'}")
    return 0


def cmd_delete(args: argparse.Namespace) -> int:
    _client(args).call("DELETE", _path(args.name))
    if not args.json:  # the service answers no body
        print(f"profile {args.name} deleted")
    return 0


def cmd_default(args: argparse.Namespace) -> int:
    client = _client(args)
    if args.name is not None:
        profile = client.call("PUT", _path(args.name, "default"))
        if args.json:
            print_json(profile)
        else:
            print(f"{profile['name']} is the default profile")
        return 0
    current = client.call("GET", "/v1/profiles")["default"]
    if args.clear and current is not None:
        client.call("DELETE", _path(current, "default"))
    if args.json:
        print_json({"default": None if args.clear else current})
    elif current is None:
        print("no default profile")
    elif args.clear:
        print(f"{current} is no longer the default profile; there is none")
    else:
        print(current)
    return 0


def register(commands: argparse._SubParsersAction[argparse.ArgumentParser]) -> None:
    """Add `aip profiles list|show|set|delete|default`."""
    help_text = "named job profiles: reusable queries, prompt, schema, tiling, redaction"
    profiles = commands.add_parser("profiles", help=help_text, description=help_text)
    actions = profiles.add_subparsers(dest="profiles_command", required=True, metavar="ACTION")

    listed = add_client_command(actions, "list", "list the profiles; the default is marked")
    listed.set_defaults(func=cmd_list)

    show = add_client_command(actions, "show", "show a profile and its params")
    show.add_argument("name", metavar="NAME", help="the profile's name")
    show.set_defaults(func=cmd_show)

    put = add_client_command(actions, "set", "create or replace a profile of your own")
    put.add_argument("name", metavar="NAME", help="lowercase letters, digits and hyphens")
    put.add_argument(
        "--file",
        required=True,
        metavar="F",
        help="JSON: the params object (job options), or a profile as `show --json` prints it; "
        "- reads standard input",
    )
    put.add_argument(
        "--description",
        metavar="D",
        help="what the profile is for (default: the file's, else kept)",
    )
    put.set_defaults(func=cmd_set)

    delete = add_client_command(actions, "delete", "delete a profile of your own")
    delete.add_argument("name", metavar="NAME", help="the profile's name")
    delete.set_defaults(func=cmd_delete)

    default = add_client_command(
        actions, "default", "show the default profile, make NAME the default, or --clear it"
    )
    choice = default.add_mutually_exclusive_group()
    choice.add_argument("name", nargs="?", metavar="NAME", help="the profile to make the default")
    choice.add_argument("--clear", action="store_true", help="have no default profile")
    default.set_defaults(func=cmd_default)

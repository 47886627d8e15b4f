"""`aip service`: installs, removes and inspects the background service through launchctl
(macOS) or systemctl --user (Linux); the files themselves come from `deploy_files`, and what
the service does inside is none of its business."""

from __future__ import annotations

import argparse
import os
import pwd
import re
import shlex
import subprocess
import sys
from collections import deque
from collections.abc import Callable
from dataclasses import dataclass
from pathlib import Path

from service.client import ClientError, port_number
from service.config import Settings
from service.deploy_files import (
    LABEL,
    UNIT,
    Platform,
    aip_executable,
    installed_environment,
    render,
    service_file,
    service_settings,
)
from service.errors import ModelUnavailable
from service.logs import LOG_FILE
from service.models.sources import resolve

LINGER_DIR = Path("/var/lib/systemd/linger")


@dataclass(frozen=True)
class Step:
    argv: list[str]
    check: bool = True  # False: a failure is expected and harmless (stopping what is not running)


def current_platform() -> Platform:
    if sys.platform == "darwin":
        return "macos"
    if sys.platform.startswith("linux"):
        return "linux"
    raise SystemExit("aip: `aip service` knows launchd (macOS) and systemd --user (Linux) only")


def missing_models(settings: Settings) -> list[str]:
    """Why each configured model is not on disk (empty when both are)."""
    problems = []
    for role, source in (("detector", settings.detector), ("reasoner", settings.reasoner)):
        try:
            resolve(role, source, allow_download=False)
        except ModelUnavailable as exc:
            problems.append(exc.message)
    return problems


def _domain() -> str:
    return f"gui/{os.getuid()}"


def install_steps(platform: Platform, path: Path, reinstall: bool) -> list[Step]:
    if platform == "macos":
        # An agent disabled earlier (launchctl disable) refuses to bootstrap: enable first.
        stop = [Step(["launchctl", "bootout", f"{_domain()}/{LABEL}"], check=False)]
        return [
            *(stop if reinstall else []),
            Step(["launchctl", "enable", f"{_domain()}/{LABEL}"]),
            Step(["launchctl", "bootstrap", _domain(), str(path)]),
        ]
    reload = Step(["systemctl", "--user", "daemon-reload"])
    if reinstall:  # `enable --now` would leave a running service on its old settings
        return [
            reload,
            Step(["systemctl", "--user", "enable", UNIT]),
            Step(["systemctl", "--user", "restart", UNIT]),
        ]
    return [reload, Step(["systemctl", "--user", "enable", "--now", UNIT])]


def stop_steps(platform: Platform) -> list[Step]:
    if platform == "macos":
        return [Step(["launchctl", "bootout", f"{_domain()}/{LABEL}"], check=False)]
    return [Step(["systemctl", "--user", "disable", "--now", UNIT], check=False)]


def run_steps(steps: list[Step], *, dry_run: bool = False) -> int:
    for step in steps:
        print(f"$ {shlex.join(step.argv)}")
        if dry_run:
            continue
        try:
            done = subprocess.run(step.argv, capture_output=True, text=True, timeout=60)
        except FileNotFoundError:
            print(f"aip: `{step.argv[0]}` is not on PATH", file=sys.stderr)
            return 1
        if done.returncode != 0 and step.check:
            why = (done.stderr or done.stdout).strip() or "no output"
            print(
                f"aip: `{shlex.join(step.argv)}` failed ({done.returncode}): {why}", file=sys.stderr
            )
            return 1
    return 0


def _write(path: Path, text: str, mode: int) -> None:
    """Atomically, and never readable by others for a moment when `mode` says so."""
    partial = path.with_name(f".{path.name}.partial")
    fd = os.open(partial, os.O_WRONLY | os.O_CREAT | os.O_TRUNC, mode)
    os.fchmod(fd, mode)  # a stale partial file may have had another mode; umask too
    with os.fdopen(fd, "w", encoding="utf-8") as f:
        f.write(text)
    os.replace(partial, path)


def cmd_install(args: argparse.Namespace) -> int:

    platform: Platform = args.platform or current_platform()
    try:
        settings = service_settings(
            inbox=args.inbox,
            data_dir=args.data_dir,
            log_dir=args.log_dir,
            host=args.host,
            port=args.port,
            detector=args.detector,
            reasoner=args.reasoner,
            token=args.token,
            demo=args.demo or None,
        )
    except ValueError as exc:  # a malformed AIP_* variable
        raise ClientError(str(exc), exit_code=2) from None
    if settings.exposed_without_token:
        print(
            f"aip: not installing: {settings.host} is not loopback and no token is set "
            "(AIP_TOKEN or --token)",
            file=sys.stderr,
        )
        return 2
    problems = [] if settings.demo else missing_models(settings)
    if problems:
        print(
            f"aip: {'the service would not start' if args.dry_run else 'not installing'}: a "
            "background service must not start a multi-gigabyte download unseen, and these "
            "models are not on this machine:",
            file=sys.stderr,
        )
        for problem in problems:
            print(f"  - {problem}", file=sys.stderr)
        print(
            "Run `aip models pull` once while online (or point AIP_DETECTOR / AIP_REASONER "
            "at local folders), then install again; `--demo` installs the offline demo.",
            file=sys.stderr,
        )
        if not args.dry_run:  # a dry run still shows what would be written
            return 2
    path = service_file(platform)
    text = render(platform, settings, aip_executable())
    steps = install_steps(platform, path, reinstall=path.exists())
    if args.dry_run:
        print(f"# would write {path}:\n{text}\n# would run:")
        return run_steps(steps, dry_run=True)
    for folder in (settings.data_dir, settings.inbox_dir, settings.logs_dir, path.parent):
        folder.mkdir(parents=True, exist_ok=True)
    _write(path, text, mode=0o600 if settings.token else 0o644)  # a token stays private
    print(f"wrote {path}")
    if run_steps(steps):
        print(
            f"aip: {path} is written; once that works, run `aip service install` again",
            file=sys.stderr,
        )
        return 1
    print(f"aip runs in the background now and at every login; logs in {settings.logs_dir}")
    if platform == "linux" and not (LINGER_DIR / pwd.getpwuid(os.getuid()).pw_name).exists():
        print("to start it at boot without logging in: loginctl enable-linger $USER")
    return 0


def cmd_uninstall(args: argparse.Namespace) -> int:
    platform: Platform = args.platform or current_platform()
    path = service_file(platform)
    if not path.exists():
        print(f"aip: no service installed (no {path})")
        return 0
    after = [Step(["systemctl", "--user", "daemon-reload"])] if platform == "linux" else []
    if args.dry_run:
        print("# would run:")
        run_steps(stop_steps(platform), dry_run=True)
        print(f"# would remove {path}")
        return run_steps(after, dry_run=True)
    run_steps(stop_steps(platform))
    path.unlink()
    print(f"removed {path}; the data directory is untouched")
    return run_steps(after)


def manager_state(platform: Platform) -> str:
    """One line from launchctl / systemctl: loaded or not, pid, last exit status."""
    if platform == "macos":
        argv = ["launchctl", "print", f"{_domain()}/{LABEL}"]
    else:
        props = "LoadState,ActiveState,SubState,MainPID,ExecMainStatus"
        argv = ["systemctl", "--user", "show", UNIT, f"--property={props}"]
    try:
        done = subprocess.run(argv, capture_output=True, text=True, timeout=30)
    except FileNotFoundError:
        return f"unknown ({argv[0]} is not on PATH)"
    if platform == "macos":
        if done.returncode != 0:
            return "not loaded"
        fields = dict(re.findall(r"^\t(state|pid|last exit code) = (.*)$", done.stdout, re.M))
        pid = f", pid {fields['pid']}" if "pid" in fields else ""
        last = fields.get("last exit code", "unknown")
        return f"loaded, {fields.get('state', 'unknown')}{pid}, last exit status {last}"
    if done.returncode != 0:
        return f"unknown (systemctl failed: {(done.stderr or done.stdout).strip()})"
    show = dict(line.partition("=")[::2] for line in done.stdout.splitlines() if "=" in line)
    if show.get("LoadState") != "loaded":
        return f"not loaded ({show.get('LoadState', 'unknown')})"
    pid = f", pid {show['MainPID']}" if show.get("MainPID", "0") != "0" else ""
    state = f"{show.get('ActiveState', 'unknown')} ({show.get('SubState', 'unknown')})"
    return f"loaded, {state}{pid}, last exit status {show.get('ExecMainStatus', 'unknown')}"


def health(url: str, token: str | None = None) -> str:
    import httpx

    # Without the token the service tells only its status, not its version or queue.
    headers = {"Authorization": f"Bearer {token}"} if token else {}
    try:
        response = httpx.get(f"{url}/v1/health", headers=headers, timeout=2.0)
        body = response.json()
    except (httpx.HTTPError, httpx.InvalidURL):
        return f"not answering at {url}"
    except ValueError:
        body = None
    if not isinstance(body, dict):
        return f"something else answers at {url} (HTTP {response.status_code})"
    status = f"{body.get('status', 'unknown')} at {url}"
    if "version" not in body:  # a guarded service that did not get the token
        return status
    return f"{status} (version {body['version']}, queue {body.get('queue', {}).get('depth', '?')})"


def _installed_settings(env: dict[str, str]) -> Settings:
    """The settings of the installed service: this shell's AIP_* under the file's."""
    try:
        return Settings.from_env({**os.environ, **env})
    except ValueError as exc:
        raise ClientError(str(exc), exit_code=2) from None


def cmd_status(args: argparse.Namespace) -> int:
    platform: Platform = args.platform or current_platform()
    path = service_file(platform)
    env = installed_environment(platform, path)
    settings = _installed_settings(env)
    print(f"file: {path}" if path.exists() else f"file: none (not installed at {path})")
    state = manager_state(platform)
    print(f"{'launchd' if platform == 'macos' else 'systemd'}: {state}")
    print(f"health: {health(args.url or settings.base_url, settings.token)}")
    return 0 if path.exists() and state.startswith("loaded") else 3


def cmd_logs(args: argparse.Namespace) -> int:
    platform: Platform = args.platform or current_platform()
    env = installed_environment(platform, service_file(platform))
    log = _installed_settings(env).logs_dir / LOG_FILE
    if args.follow:
        try:
            return subprocess.run(["tail", "-n", str(args.lines), "-F", str(log)]).returncode
        except KeyboardInterrupt:
            return 0
    if not log.exists():
        print(f"aip: no log yet at {log}", file=sys.stderr)
        return 1
    with log.open(encoding="utf-8", errors="replace") as f:
        sys.stdout.writelines(deque(f, maxlen=args.lines))
    return 0


def register(commands: argparse._SubParsersAction[argparse.ArgumentParser]) -> None:
    """Add `aip service install|uninstall|status|logs` to the `aip` parser."""
    text = "run in the background: launchd (macOS), systemd --user (Linux)"
    service = commands.add_parser("service", help=text, description=text)
    actions = service.add_subparsers(dest="service_command", required=True, metavar="ACTION")

    def action(
        name: str, func: Callable[[argparse.Namespace], int], text: str
    ) -> argparse.ArgumentParser:
        sub = actions.add_parser(name, help=text, description=text)
        # Hidden: renders and drives the other platform's manager, for tests on one machine.
        sub.add_argument("--platform", choices=["macos", "linux"], help=argparse.SUPPRESS)
        sub.set_defaults(func=func)
        return sub

    install = action("install", cmd_install, "install and start the background service")
    install.add_argument("--inbox", type=Path, help="watched folder (default DATA_DIR/inbox)")
    install.add_argument("--data-dir", type=Path, help="the service's data (AIP_DATA_DIR)")
    install.add_argument("--log-dir", type=Path, help="where aip.log goes (AIP_LOG_DIR)")
    install.add_argument("--host", help="listening address (AIP_HOST)")
    install.add_argument("--port", type=port_number, help="listening port (AIP_PORT)")
    install.add_argument("--detector", help="hub id or local folder (AIP_DETECTOR)")
    install.add_argument("--reasoner", help="hub id or local folder (AIP_REASONER)")
    install.add_argument("--token", help="bearer token clients must send (AIP_TOKEN)")
    install.add_argument("--demo", action="store_true", help="run `aip serve --demo`")
    install.add_argument("--dry-run", action="store_true", help="print, change nothing")
    uninstall = action("uninstall", cmd_uninstall, "stop and remove it (data untouched)")
    uninstall.add_argument("--dry-run", action="store_true", help="print, change nothing")
    status = action("status", cmd_status, "loaded? pid, last exit status, health")
    status.add_argument("--url", help="service address (default: the installed one)")
    logs = action("logs", cmd_logs, "print the service's log")
    logs.add_argument("-f", "--follow", action="store_true", help="keep printing new lines")
    logs.add_argument("-n", "--lines", type=int, default=50, help="how many (default 50)")

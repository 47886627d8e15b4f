"""The service files: renders the launchd agent and the systemd user unit from the templates
in `deploy/` with absolute paths and the chosen AIP_* settings, and reads an installed one
back; it never runs launchctl or systemctl."""

from __future__ import annotations

import math
import os
import plistlib
import re
import shutil
import sys
from pathlib import Path
from string import Template
from typing import Any, Literal
from xml.sax.saxutils import escape

from service.config import Settings

Platform = Literal["macos", "linux"]
LABEL = "local.aip"
UNIT = "aip.service"
THROTTLE_SECONDS = 10  # launchd ThrottleInterval / systemd RestartSec: no tight crash loop
STOP_MARGIN_SECONDS = 5  # the manager's kill window must outlast the service's own grace
OPEN_FILES = 4096
SYSTEM_PATH = "/usr/bin:/bin:/usr/sbin:/sbin"


def templates_dir() -> Path:
    """The copy installed inside the package, else the checkout's top-level `deploy/`."""
    packaged = Path(__file__).resolve().parent / "deploy_templates"
    if packaged.is_dir():
        return packaged
    return Path(__file__).resolve().parents[1] / "deploy"


def service_file(platform: Platform) -> Path:
    if platform == "macos":
        return Path.home() / "Library" / "LaunchAgents" / f"{LABEL}.plist"
    config = os.environ.get("XDG_CONFIG_HOME") or str(Path.home() / ".config")
    return Path(config) / "systemd" / "user" / UNIT


def aip_executable() -> Path:
    """This environment's `aip` (beside its python), else the first one on PATH."""
    beside = Path(sys.executable).absolute().parent / "aip"
    if beside.is_file():
        return beside
    found = shutil.which("aip")
    if found:
        return Path(found).absolute()
    raise SystemExit("aip: cannot find this environment's `aip` executable; pip install it first")


def _absolute(path: Path) -> Path:
    return path.expanduser().resolve()


def service_settings(inbox: Path | None = None, **flags: Any) -> Settings:
    """The settings the service will run with (AIP_* environment, then flags), every path
    absolute; the inbox lives in the data directory unless one was chosen."""
    settings = Settings.from_env(**flags)
    data_dir = _absolute(settings.data_dir)
    chosen = inbox or (Path(os.environ["AIP_INBOX"]) if os.environ.get("AIP_INBOX") else None)
    settings = settings.replace(data_dir=data_dir, inbox=_absolute(chosen or data_dir / "inbox"))
    models = {
        role: str(_absolute(Path(source))) if Path(source).expanduser().is_dir() else source
        for role, source in (("detector", settings.detector), ("reasoner", settings.reasoner))
    }
    db_path = _absolute(settings.db_path) if settings.db_path else None
    return settings.replace(log_dir=_absolute(settings.logs_dir), db_path=db_path, **models)


def service_environment(settings: Settings, platform: Platform, exe: Path) -> dict[str, str]:
    env = {key: value for key, value in os.environ.items() if key.startswith("AIP_")}
    env.update(
        AIP_DATA_DIR=str(settings.data_dir),
        AIP_INBOX=str(settings.inbox_dir),
        AIP_LOG_DIR=str(settings.logs_dir),
        AIP_HOST=settings.host,
        AIP_PORT=str(settings.port),
        AIP_SHUTDOWN_GRACE=str(settings.shutdown_grace_seconds),
        PATH=f"{exe.parent}:{SYSTEM_PATH}",
        HF_HUB_OFFLINE="1",  # the models were checked to be on disk: never call out
    )
    if not settings.demo:  # --demo builds its own tiny checkpoints
        env.update(AIP_DETECTOR=settings.detector, AIP_REASONER=settings.reasoner)
    if settings.db_path:
        env["AIP_DB"] = str(settings.db_path)
    if settings.token:
        env["AIP_TOKEN"] = settings.token
    if platform == "macos":
        env["AIP_LOG_STDERR"] = "0"  # launchd's stderr file is never rotated; aip.log is
    for key in ("HF_HOME", "HF_HUB_CACHE"):  # where `aip models pull` put the weights
        if os.environ.get(key):
            env[key] = str(_absolute(Path(os.environ[key])))
    bad = [key for key, value in env.items() if "\n" in value or "\r" in value]
    if bad:
        raise SystemExit(f"aip: {', '.join(bad)} must not contain a line break")
    return dict(sorted(env.items()))


def _systemd_quote(value: str, *, command: bool = False) -> str:
    """A double-quoted systemd value: C escapes, `%` specifiers (and `$` in commands) literal."""
    quoted = value.replace("\\", "\\\\").replace('"', '\\"').replace("%", "%%")
    return f'"{quoted.replace("$", "$$") if command else quoted}"'


def render(platform: Platform, settings: Settings, exe: Path) -> str:
    argv = [str(exe), "serve", *(["--demo"] if settings.demo else [])]
    env = service_environment(settings, platform, exe)
    stop = math.ceil(settings.shutdown_grace_seconds) + STOP_MARGIN_SECONDS
    if platform == "macos":
        fields = {
            "label": LABEL,
            "program_arguments": "\n".join(f"\t\t<string>{escape(a)}</string>" for a in argv),
            "working_directory": escape(str(settings.data_dir)),
            "environment": "\n".join(
                f"\t\t<key>{escape(k)}</key>\n\t\t<string>{escape(v)}</string>"
                for k, v in env.items()
            ),
            "throttle_interval": str(THROTTLE_SECONDS),
            "exit_timeout": str(stop),
            "stdout_path": escape(str(settings.logs_dir / "launchd.out.log")),
            "stderr_path": escape(str(settings.logs_dir / "launchd.err.log")),
            "open_files": str(OPEN_FILES),
        }
        template = "aip.plist"
    else:
        fields = {
            "exec_start": " ".join(_systemd_quote(a, command=True) for a in argv),
            "working_directory": str(settings.data_dir).replace("%", "%%"),
            "environment": "\n".join(
                f"Environment={_systemd_quote(f'{k}={v}')}" for k, v in env.items()
            ),
            "restart_sec": str(THROTTLE_SECONDS),
            "stop_timeout": str(stop),
            "open_files": str(OPEN_FILES),
        }
        template = "aip.service"
    return Template((templates_dir() / template).read_text()).substitute(fields)


def installed_environment(platform: Platform, path: Path) -> dict[str, str]:
    """The environment an installed service file gives the service (empty when unreadable)."""
    try:
        if platform == "macos":
            env = plistlib.loads(path.read_bytes()).get("EnvironmentVariables", {})
            return {str(k): str(v) for k, v in env.items()}
        found = {}
        for line in path.read_text().splitlines():
            match = re.fullmatch(r'Environment="(.*)"', line.strip())
            if match:
                value = re.sub(r"\\(.)", r"\1", match.group(1).replace("%%", "%"))
                key, _, value = value.partition("=")
                found[key] = value
        return found
    except (OSError, plistlib.InvalidFileException, AttributeError):
        return {}

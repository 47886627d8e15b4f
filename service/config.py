"""One frozen Settings object built from `AIP_*` environment variables and CLI flags."""

from __future__ import annotations

import dataclasses
import os
import sys
from collections.abc import Mapping
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any

DEFAULT_DETECTOR = "tiiuae/Falcon-Perception"
DEFAULT_REASONER = "mlx-community/gemma-4-e2b-it-4bit"
DEFAULT_QUERIES = ("person", "vehicle", "building")
DEFAULT_PROMPT = "Describe what this image shows and anything notable about the detected objects."


def default_data_dir() -> Path:
    if sys.platform == "darwin":
        return Path.home() / "Library" / "Application Support" / "aip"
    base = os.environ.get("XDG_DATA_HOME") or str(Path.home() / ".local" / "share")
    return Path(base) / "aip"


def default_log_dir(data_dir: Path) -> Path:
    """Where macOS users look for logs (Console.app lists it); elsewhere beside the data."""
    if sys.platform == "darwin":
        return Path.home() / "Library" / "Logs" / "aip"
    return data_dir / "logs"


def checkout_inbox() -> Path | None:
    """Run from a source checkout, the repository's own `inbox/` is the default inbox."""
    root = Path(__file__).resolve().parents[1]
    if (root / "pyproject.toml").is_file() and (root / "inbox").is_dir():
        return root / "inbox"
    return None


def _split_list(value: str, sep: str) -> tuple[str, ...]:
    return tuple(part.strip() for part in value.split(sep) if part.strip())


@dataclass(frozen=True)
class Settings:
    data_dir: Path = field(default_factory=default_data_dir)
    db_path: Path | None = None  # defaults to data_dir / "aip.db"
    inbox: Path | None = None  # defaults to data_dir / "inbox"
    log_dir: Path | None = None  # defaults to default_log_dir(data_dir)
    log_stderr: bool = True  # off under launchd, whose stderr file is never rotated
    detector: str = DEFAULT_DETECTOR
    reasoner: str = DEFAULT_REASONER
    demo: bool = False
    host: str = "127.0.0.1"
    port: int = 8765
    token: str | None = None
    default_queries: tuple[str, ...] = DEFAULT_QUERIES
    default_prompt: str = DEFAULT_PROMPT
    allowed_dirs: tuple[Path, ...] = ()
    max_upload_bytes: int = 64 * 1024 * 1024
    max_pixels: int = 100_000_000
    max_queries: int = 16
    max_prompt_chars: int = 4000
    max_attempts: int = 3
    lease_seconds: float = 30.0
    job_timeout_seconds: float = 600.0
    shutdown_grace_seconds: float = 15.0
    detect_max_tokens: int = 256
    reason_max_tokens: int = 256
    poll_interval_seconds: float = 1.0
    retry_base_seconds: float = 2.0
    inbox_enabled: bool = True
    inbox_move: bool = True
    inbox_settle_seconds: float = 1.0
    inbox_rescan_seconds: float = 180.0
    inbox_polling: bool = False
    retention: str | None = None  # e.g. "90d": finished jobs older than this are pruned
    retention_keep_results: bool = False  # prune only the stored images, keep the rows

    @property
    def database(self) -> Path:
        return self.db_path or self.data_dir / "aip.db"

    @property
    def images_dir(self) -> Path:
        return self.data_dir / "images"

    @property
    def inbox_dir(self) -> Path:
        return self.inbox or self.data_dir / "inbox"

    @property
    def logs_dir(self) -> Path:
        return self.log_dir or default_log_dir(self.data_dir)

    @property
    def demo_models_dir(self) -> Path:
        return self.data_dir / "models" / "demo"

    @property
    def base_url(self) -> str:
        host = "127.0.0.1" if self.host in ("0.0.0.0", "::") else self.host
        return f"http://{host}:{self.port}"

    def replace(self, **changes: Any) -> Settings:
        return dataclasses.replace(self, **changes)

    @classmethod
    def from_env(cls, env: Mapping[str, str] | None = None, **overrides: Any) -> Settings:
        """Environment first, then explicit overrides (CLI flags); `None` overrides are ignored."""
        env = os.environ if env is None else env
        values: dict[str, Any] = {}
        paths = {
            "AIP_DATA_DIR": "data_dir",
            "AIP_DB": "db_path",
            "AIP_INBOX": "inbox",
            "AIP_LOG_DIR": "log_dir",
        }
        for key, name in paths.items():
            if env.get(key):
                values[name] = Path(env[key]).expanduser()
        strings = {
            "AIP_DETECTOR": "detector",
            "AIP_REASONER": "reasoner",
            "AIP_HOST": "host",
            "AIP_TOKEN": "token",
            "AIP_PROMPT": "default_prompt",
            "AIP_RETENTION": "retention",
        }
        for key, name in strings.items():
            if env.get(key):
                values[name] = env[key]
        numbers = {
            "AIP_PORT": ("port", int),
            "AIP_MAX_UPLOAD_BYTES": ("max_upload_bytes", int),
            "AIP_MAX_PIXELS": ("max_pixels", int),
            "AIP_MAX_ATTEMPTS": ("max_attempts", int),
            "AIP_LEASE_SECONDS": ("lease_seconds", float),
            "AIP_JOB_TIMEOUT": ("job_timeout_seconds", float),
            "AIP_SHUTDOWN_GRACE": ("shutdown_grace_seconds", float),
            "AIP_INBOX_SETTLE": ("inbox_settle_seconds", float),
            "AIP_INBOX_RESCAN": ("inbox_rescan_seconds", float),
        }
        for key, (name, kind) in numbers.items():
            if env.get(key):
                try:
                    values[name] = kind(env[key])
                except ValueError:
                    raise ValueError(f"{key}={env[key]!r} is not a number") from None
        if env.get("AIP_QUERIES"):
            values["default_queries"] = _split_list(env["AIP_QUERIES"], ",")
        if env.get("AIP_ALLOWED_DIRS"):
            values["allowed_dirs"] = tuple(
                Path(p).expanduser() for p in _split_list(env["AIP_ALLOWED_DIRS"], os.pathsep)
            )
        flags = {
            "AIP_DEMO": "demo",
            "AIP_INBOX_ENABLED": "inbox_enabled",
            "AIP_INBOX_MOVE": "inbox_move",
            "AIP_INBOX_POLLING": "inbox_polling",
            "AIP_RETENTION_KEEP_RESULTS": "retention_keep_results",
            "AIP_LOG_STDERR": "log_stderr",
        }
        for key, name in flags.items():
            if env.get(key):
                values[name] = env[key].strip().lower() in ("1", "true", "yes", "on")
        if "inbox" not in values and checkout_inbox() is not None:
            values["inbox"] = checkout_inbox()
        values.update({k: v for k, v in overrides.items() if v is not None})
        return cls(**values)

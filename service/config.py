"""One frozen Settings object built from `AIP_*` environment variables and CLI flags."""

from __future__ import annotations

import dataclasses
import ipaddress
import math
import os
import sys
from collections.abc import Callable, Mapping
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any
from urllib.parse import urlsplit

DEFAULT_DETECTOR = "tiiuae/Falcon-Perception"
DEFAULT_REASONER = "mlx-community/gemma-4-e2b-it-4bit"
# None by default: a job with no queries from itself, its folder or a profile is planned
# (the reasoner proposes what to look for).
DEFAULT_QUERIES: tuple[str, ...] = ()
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


def parse_age(text: str) -> float:
    """`30d`, `12h`, `90m`, `45s` or plain seconds; finite and not negative."""
    units = {"d": 86400.0, "h": 3600.0, "m": 60.0, "s": 1.0}
    value = text.strip().lower()
    try:
        seconds = float(value[:-1]) * units[value[-1]] if value[-1:] in units else float(value)
    except ValueError:
        seconds = math.nan
    if not math.isfinite(seconds) or seconds < 0:
        raise ValueError(f"{text!r} is not an age like 30d, 12h or 90m")
    return seconds


def _is_loopback(host: str) -> bool:
    if host == "localhost":
        return True
    try:
        return ipaddress.ip_address(host).is_loopback
    except ValueError:
        return False


def _split_list(value: str, sep: str) -> tuple[str, ...]:
    return tuple(part.strip() for part in value.split(sep) if part.strip())


def _path(value: str) -> Path:
    return Path(value).expanduser()


def _flag(value: str) -> bool:
    return value.strip().lower() in ("1", "true", "yes", "on")


def _number(kind: Callable[[str], Any]) -> Callable[[str], Any]:
    def parse(value: str) -> Any:
        try:
            return kind(value)
        except ValueError:
            raise ValueError("not a number") from None

    return parse


def port_number(value: str | int) -> int:
    """A TCP port to listen on or connect to; the one check every command and flag shares."""
    try:
        port = int(value)
    except ValueError:
        raise ValueError("not a port number (1..65535)") from None
    if not 1 <= port <= 65535:
        raise ValueError("not a port number (1..65535)")
    return port


MAX_WEBHOOK_URL = 2000


def database_url(value: str) -> str:
    """A PostgreSQL URL (postgresql://user@host:port/name); unset means the SQLite file."""
    if not value.startswith(("postgresql://", "postgres://")):
        raise ValueError(
            "give a postgresql://user@host:port/database URL (unset: the embedded SQLite file)"
        )
    return value


def webhook_url(value: str) -> str:
    """A URL finished jobs are POSTed to: http or https, with a host, at most MAX_WEBHOOK_URL
    characters, no spaces or control characters; the one check a setting, a profile, a
    folder config and a job share."""
    url = value.strip()
    if not url:
        raise ValueError("empty")
    if len(url) > MAX_WEBHOOK_URL:
        raise ValueError(f"{len(url)} characters; at most {MAX_WEBHOOK_URL}")
    if any(c.isspace() or ord(c) < 32 or ord(c) == 127 for c in url):
        raise ValueError("it holds spaces or control characters")
    try:
        parts = urlsplit(url)
        parts.port  # noqa: B018 - raises on a port that is not a number in range
    except ValueError:
        raise ValueError("not a URL") from None
    if parts.scheme.lower() not in ("http", "https") or not parts.hostname:
        raise ValueError("not an http:// or https:// URL with a host")
    return url


def _count(value: str) -> int:
    try:
        number = int(value)
    except ValueError:
        raise ValueError("use a whole number of 1 or more") from None
    if number < 1:
        raise ValueError("use a whole number of 1 or more")
    return number


# Neither model's answer comes near this; a bigger limit is a typo, not a wish.
MAX_GENERATED_TOKENS = 32768


def _token_limit(value: str) -> int:
    try:
        number = int(value)
    except ValueError:
        number = 0
    if not 1 <= number <= MAX_GENERATED_TOKENS:
        raise ValueError(f"use a whole number from 1 to {MAX_GENERATED_TOKENS}")
    return number


def _keep_alive(value: str) -> float | None:
    if value.strip().lower() == "pinned":
        return None
    try:
        return float(value)
    except ValueError:
        raise ValueError("use `pinned` or a number of seconds") from None


def _bits(value: str) -> int:
    if value.strip() not in ("4", "8"):
        raise ValueError("use 4 or 8")
    return int(value)


def _bytes(value: str) -> int:
    from service.models.budget import parse_bytes  # pure: no mlx behind it

    return parse_bytes(value)


def _cpu_blas(value: str) -> str:
    from service.models.blas import parse_setting  # loads nothing: that waits for mlx

    return parse_setting(value)


def _worker_profiles(value: str) -> tuple[str, ...]:
    from service.profiles import worker_profiles

    return worker_profiles(value)


def _batch(value: str) -> int | str:
    from service.batching import parse_setting

    return parse_setting(value)


# Every environment variable: the setting it fills and how its text is read.
_ENV: dict[str, tuple[str, Callable[[str], Any]]] = {
    "AIP_DATA_DIR": ("data_dir", _path),
    "AIP_DB": ("db_path", _path),
    "AIP_DATABASE_URL": ("database_url", database_url),
    "AIP_IMAGE_STORE": ("image_store", _path),
    "AIP_WORKER_PROFILES": ("worker_profiles", _worker_profiles),
    "AIP_INBOX": ("inbox", _path),
    "AIP_LOG_DIR": ("log_dir", _path),
    "AIP_DETECTOR": ("detector", str),
    "AIP_REASONER": ("reasoner", str),
    "AIP_HOST": ("host", str),
    "AIP_TOKEN": ("token", str),
    "AIP_PROMPT": ("default_prompt", str),
    "AIP_RETENTION": ("retention", str),
    "AIP_QUERIES": ("default_queries", lambda v: _split_list(v, ",")),
    "AIP_ALLOWED_DIRS": (
        "allowed_dirs",
        lambda v: tuple(_path(p) for p in _split_list(v, os.pathsep)),
    ),
    "AIP_PORT": ("port", port_number),
    "AIP_ALLOWED_HOSTS": ("allowed_hosts", lambda v: _split_list(v, ",")),
    "AIP_ALLOWED_ORIGINS": ("allowed_origins", lambda v: _split_list(v, ",")),
    "AIP_MAX_UPLOAD_BYTES": ("max_upload_bytes", _bytes),
    "AIP_MAX_PIXELS": ("max_pixels", _number(int)),
    "AIP_MAX_ATTEMPTS": ("max_attempts", _number(int)),
    "AIP_DETECT_MAX_TOKENS": ("detect_max_tokens", _token_limit),
    "AIP_REASON_MAX_TOKENS": ("reason_max_tokens", _token_limit),
    "AIP_LEASE_SECONDS": ("lease_seconds", _number(float)),
    "AIP_JOB_TIMEOUT": ("job_timeout_seconds", _number(float)),
    "AIP_SHUTDOWN_GRACE": ("shutdown_grace_seconds", _number(float)),
    "AIP_INBOX_SETTLE": ("inbox_settle_seconds", _number(float)),
    "AIP_INBOX_RESCAN": ("inbox_rescan_seconds", _number(float)),
    "AIP_MEMORY_BUDGET": ("memory_budget_bytes", _bytes),
    "AIP_DETECTOR_KEEP_ALIVE": ("detector_keep_alive", _keep_alive),
    "AIP_REASONER_KEEP_ALIVE": ("reasoner_keep_alive", _keep_alive),
    "AIP_DETECTOR_QUANTIZE": ("detector_quantize", _bits),
    "AIP_REASONER_QUANTIZE": ("reasoner_quantize", _bits),
    "AIP_DEMO": ("demo", _flag),
    "AIP_EVICT_IDLE": ("evict_idle", _flag),
    "AIP_INBOX_ENABLED": ("inbox_enabled", _flag),
    "AIP_INBOX_MOVE": ("inbox_move", _flag),
    "AIP_INBOX_POLLING": ("inbox_polling", _flag),
    "AIP_RETENTION_KEEP_RESULTS": ("retention_keep_results", _flag),
    "AIP_LOG_STDERR": ("log_stderr", _flag),
    "AIP_CPU_BLAS": ("cpu_blas", _cpu_blas),
    "AIP_BATCH": ("batch", _batch),
    "AIP_WEBHOOK_URL": ("webhook_url", webhook_url),
    "AIP_WEBHOOK_SECRET": ("webhook_secret", str),
}


@dataclass(frozen=True)
class Settings:
    data_dir: Path = field(default_factory=default_data_dir)
    db_path: Path | None = None  # defaults to data_dir / "aip.db"
    # PostgreSQL shared by every node; None: the embedded SQLite file (db_path).
    database_url: str | None = field(default=None, repr=False)
    # With PostgreSQL: a folder every node mounts for stored files, instead of the database.
    image_store: Path | None = None
    # The profiles this node's worker takes jobs of (NO_PROFILE: jobs without one); (): all.
    worker_profiles: tuple[str, ...] = ()
    serve_api: bool = True  # False: a worker node (`aip worker`), no API and no inbox
    inbox: Path | None = None  # defaults to data_dir / "inbox"
    log_dir: Path | None = None  # defaults to default_log_dir(data_dir)
    log_stderr: bool = True  # off under launchd, whose stderr file is never rotated
    detector: str = DEFAULT_DETECTOR
    reasoner: str = DEFAULT_REASONER
    detector_quantize: int | None = None  # 4 or 8: load a cached quantised copy instead
    reasoner_quantize: int | None = None
    detector_keep_alive: float | None = None  # None: pinned; else idle seconds before unload
    reasoner_keep_alive: float | None = None
    memory_budget_bytes: int | None = None  # None: the platform default (models/budget.py)
    evict_idle: bool = False  # may a load that does not fit free the other, idle role
    demo: bool = False
    host: str = "127.0.0.1"
    port: int = 8765
    token: str | None = None
    default_queries: tuple[str, ...] = DEFAULT_QUERIES
    default_prompt: str = DEFAULT_PROMPT
    allowed_dirs: tuple[Path, ...] = ()
    # Host header values admitted besides loopback names and addresses (DNS rebinding guard).
    allowed_hosts: tuple[str, ...] = ()
    # Origins whose pages may call the API (CSRF guard); `*` admits every origin.
    allowed_origins: tuple[str, ...] = ()
    max_upload_bytes: int = 64 * 1024 * 1024
    max_pixels: int = 100_000_000
    max_queries: int = 16
    max_prompt_chars: int = 4000
    max_attempts: int = 3
    lease_seconds: float = 30.0
    job_timeout_seconds: float = 600.0
    shutdown_grace_seconds: float = 15.0
    # Tokens each detection query / the reasoning may generate: a job's default and its
    # ceiling (a job may ask for fewer, never more).
    detect_max_tokens: int = 256
    reason_max_tokens: int = 256
    cpu_blas: str = "auto"  # the BLAS MLX's Linux CPU backend uses: auto, mkl or bundled
    batch: int | str = "auto"  # jobs run together at most; auto: chosen per device (batching.py)
    poll_interval_seconds: float = 1.0
    retry_base_seconds: float = 2.0
    inbox_enabled: bool = True
    inbox_move: bool = True
    inbox_settle_seconds: float = 1.0
    inbox_rescan_seconds: float = 180.0
    inbox_polling: bool = False
    retention: str | None = None  # e.g. "90d": finished jobs older than this are pruned
    retention_keep_results: bool = False  # prune only the stored images, keep the rows
    # Finished jobs are POSTed here unless their job, folder or profile names another URL.
    webhook_url: str | None = None
    webhook_secret: str | None = field(default=None, repr=False)  # signs each body (HMAC-SHA256)
    # A delivery not answered 2xx is tried again with exponential backoff from this base
    # (service/policy.py), for this long after its job ended; then it is failed.
    webhook_retry_base_seconds: float = 10.0
    webhook_retry_for_seconds: float = 86400.0

    def __post_init__(self) -> None:
        if self.retention is not None:
            parse_age(self.retention)  # a bad policy stops start-up before anything runs
        if self.webhook_url is not None:
            webhook_url(self.webhook_url)
        if self.database_url is not None:
            database_url(self.database_url)
        for name in ("detect_max_tokens", "reason_max_tokens"):
            if not 1 <= getattr(self, name) <= MAX_GENERATED_TOKENS:
                raise ValueError(
                    f"{name} must be from 1 to {MAX_GENERATED_TOKENS}, not {getattr(self, name)!r}"
                )

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
    def exposed_without_token(self) -> bool:
        """Listening beyond this machine with no token would hand the images to anyone."""
        return not _is_loopback(self.host) and not self.token

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
        for key, (name, parse) in _ENV.items():
            if env.get(key):
                try:
                    values[name] = parse(env[key])
                except ValueError as exc:
                    raise ValueError(f"{key}={env[key]!r}: {exc}") from None
        if "inbox" not in values and checkout_inbox() is not None:
            values["inbox"] = checkout_inbox()
        values.update({k: v for k, v in overrides.items() if v is not None})
        return cls(**values)

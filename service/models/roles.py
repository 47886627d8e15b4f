"""What the model host knows about each role (`detector`, `reasoner`): what it should hold,
what it holds now, and how it reports both. Plain data: no threads, no mlx."""

from __future__ import annotations

import concurrent.futures
import time
from dataclasses import dataclass, field, replace
from pathlib import Path
from typing import Any

STATES = ("unloaded", "loading", "loaded", "failed")


@dataclass(frozen=True)
class Target:
    """A model as asked for: a hub id or folder, and optionally the bits to quantise it to."""

    source: str
    quantize: int | None = None

    def __str__(self) -> str:
        return f"{self.source!r}" + (
            f" (quantised to {self.quantize} bits)" if self.quantize else ""
        )


@dataclass(frozen=True)
class Loaded:
    """One model in memory and what it is. Swapped in and out as a whole, on the model thread,
    so a job always sees one consistent runtime and identity."""

    runtime: Any = field(repr=False)
    target: Target
    path: Path  # the folder actually loaded: a quantised copy lives in the cache
    revision: str  # of that folder
    source_revision: str  # of the folder asked for
    bytes_on_disk: int
    resident_bytes: int  # measured on the live arrays
    peak_bytes: int  # MLX's peak above its starting point while this load ran
    load_seconds: float
    loaded_at: float

    def identity(self) -> dict[str, Any]:
        identity: dict[str, Any] = {"id": self.target.source, "revision": self.revision}
        if self.target.quantize:
            identity["quantize"] = self.target.quantize
        return identity


@dataclass
class Progress:
    phase: str  # resolve | convert | load | swap
    fraction: float | None = None  # None where it cannot be measured (a conversion)
    started: float = field(default_factory=time.monotonic)

    def describe(self) -> dict[str, Any]:
        return {
            "phase": self.phase,
            "percent": None if self.fraction is None else round(100 * self.fraction, 1),
            "elapsed_seconds": round(time.monotonic() - self.started, 2),
        }


@dataclass
class RoleState:
    role: str
    target: Target  # what the role should hold: as configured, then as last asked for
    keep_alive: float | None = None  # None: pinned; else unloaded after this many idle seconds
    state: str = "unloaded"  # one of STATES
    current: Loaded | None = None  # what serves jobs now (may be set while a swap is loading)
    last: Loaded | None = None  # the last model that served, kept after it is freed
    error: str | None = None  # why the last load failed or was refused
    progress: Progress | None = None
    phases: dict[str, float] = field(default_factory=dict)  # the last load's phase durations
    estimate: dict[str, int] | None = None  # the last load's estimate, from the headers
    swap: str | None = None  # how the last load fitted: beside | replace_first
    loading: Target | None = None  # what a load in flight for this role is bringing in
    pending: concurrent.futures.Future[None] | None = None  # settled when that load ends
    loads: int = 0
    jobs_served: int = 0
    last_used: float | None = None

    @property
    def runtime(self) -> Any:
        return self.current.runtime if self.current else None

    @runtime.setter
    def runtime(self, value: Any) -> None:
        """Stand in a different runtime for the loaded one (tests wrap models this way)."""
        if self.current is None:
            raise RuntimeError(f"the {self.role} is not loaded")
        self.current = replace(self.current, runtime=value)

    @property
    def available(self) -> bool:
        """Serving, or able to serve: a role freed on purpose comes back with the next job."""
        return self.current is not None or (self.last is not None and self.state != "failed")

    def identity(self) -> dict[str, Any]:
        model = self.current or self.last
        if model is not None:
            return model.identity()
        return {"id": self.target.source, "revision": None}

    def describe(self) -> dict[str, Any]:
        model = self.current
        return {
            "role": self.role,
            "state": self.state,
            "source": model.target.source if model else self.target.source,
            "quantize": model.target.quantize if model else self.target.quantize,
            "path": str(model.path) if model else None,
            "revision": model.revision if model else None,
            "source_revision": model.source_revision if model else None,
            "bytes_on_disk": model.bytes_on_disk if model else None,
            "resident_bytes": model.resident_bytes if model else None,
            "peak_load_bytes": model.peak_bytes if model else None,
            "load_seconds": round(model.load_seconds, 3) if model else None,
            "loaded_at": model.loaded_at if model else None,
            "last_used_at": self.last_used,
            "jobs_served": self.jobs_served,
            "loads": self.loads,
            "keep_alive": "pinned" if self.keep_alive is None else self.keep_alive,
            "loading": str(self.loading) if self.loading else None,
            "progress": self.progress.describe() if self.progress else None,
            "phases": {name: round(seconds, 3) for name, seconds in self.phases.items()},
            "estimate": self.estimate,
            "swap": self.swap,
            "error": self.error,
        }

"""What the table ran on: CPU model, cores, memory, OS, Python, MLX and the BLAS libraries
loaded in this process, read from the system without running anything heavy."""

from __future__ import annotations

import contextlib
import importlib.metadata
import os
import platform
import subprocess
import sys
from pathlib import Path
from typing import Any


def _cpu_model() -> str:
    cpuinfo = Path("/proc/cpuinfo")
    if cpuinfo.is_file():
        for line in cpuinfo.read_text(errors="replace").splitlines():
            if line.startswith(("model name", "Model")):
                return line.split(":", 1)[1].strip()
    if sys.platform == "darwin":
        with contextlib.suppress(OSError, subprocess.SubprocessError):
            return subprocess.run(
                ["sysctl", "-n", "machdep.cpu.brand_string"],
                capture_output=True,
                text=True,
                check=True,
            ).stdout.strip()
    return platform.processor() or platform.machine()


def _ram_bytes() -> int | None:
    try:
        return os.sysconf("SC_PAGE_SIZE") * os.sysconf("SC_PHYS_PAGES")
    except (ValueError, OSError, AttributeError):
        return None


def _version(package: str) -> str | None:
    try:
        return importlib.metadata.version(package)
    except importlib.metadata.PackageNotFoundError:
        return None


def loaded_blas() -> list[str]:
    """BLAS/LAPACK shared libraries mapped into this process (Linux), after importing numpy
    and MLX; on macOS both use Accelerate."""
    with contextlib.suppress(ImportError):
        import numpy  # noqa: F401
    with contextlib.suppress(ImportError):
        import mlx.core  # noqa: F401
    maps = Path("/proc/self/maps")
    if not maps.is_file():
        return ["Accelerate"] if sys.platform == "darwin" else []
    found = set()
    for line in maps.read_text().splitlines():
        path = line.split()[-1] if line.split() else ""
        name = Path(path).name.lower()
        if any(key in name for key in ("blas", "lapack", "mkl", "accelerate", "blis")):
            found.add(f"{Path(path).parent.name}/{Path(path).name}")  # the folder says whose
    return sorted(found)


def describe() -> dict[str, Any]:
    ram = _ram_bytes()
    return {
        "cpu": _cpu_model(),
        "cores": os.cpu_count(),
        "ram_gib": round(ram / 2**30, 1) if ram else None,
        "os": platform.platform(),
        "python": platform.python_version(),
        "mlx": _version("mlx"),
        "mlx_vlm": _version("mlx-vlm"),
        "blas": ", ".join(loaded_blas()) or "not detected",
        "openblas_coretype": os.environ.get("OPENBLAS_CORETYPE"),
    }

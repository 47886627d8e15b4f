"""Which MLX backend and device this process computes on, what memory the device reports, and
where MLX's CUDA backend keeps the kernels it compiles. mlx is imported only inside functions;
`measure` runs once on the model thread and `describe` reads what it found."""

from __future__ import annotations

import os
import threading
from collections.abc import MutableMapping
from dataclasses import asdict, dataclass
from pathlib import Path
from typing import Any

# MLX's CUDA backend reads this once, when it first compiles a kernel; unset, it caches under
# the system temp dir (/tmp/mlx/<version>/ptx), which a reboot may empty.
KERNEL_CACHE_ENV = "MLX_PTX_CACHE_DIR"
KERNEL_CACHE_DIR = "mlx-kernels"


@dataclass(frozen=True)
class Device:
    backend: str  # metal | cuda | cpu (gpu: a GPU backend this code does not know)
    name: str | None
    total_bytes: int | None  # the device's memory; None on the CPU (host RAM is the limit)
    free_bytes: int | None  # free when measured (CUDA reports it; Metal does not)
    working_set_bytes: int | None  # Metal's recommended working set


_lock = threading.Lock()
_found: Device | None = None
_kernel_cache_set_by: str | None = None  # aip | user, once `use_kernel_cache` ran


def backend() -> str:
    """metal, cuda or cpu: what the default device computes with, not the platform."""
    import mlx.core as mx

    if mx.default_device().type == mx.DeviceType.cpu:
        return "cpu"
    if mx.metal.is_available():
        return "metal"
    cuda = getattr(mx, "cuda", None)  # mlx builds before the CUDA backend have no mx.cuda
    if cuda is not None and cuda.is_available():
        return "cuda"
    return "gpu"


def _info() -> dict[str, Any]:
    import mlx.core as mx

    return dict(mx.device_info())


def device_name(info: dict[str, Any] | None = None) -> str | None:
    """`device_name (architecture)` as MLX reports them, e.g. `NVIDIA H200 (sm_90)`."""
    info = _info() if info is None else info
    name, arch = info.get("device_name"), info.get("architecture")
    if name and arch:
        return f"{name} ({arch})"
    return str(name or arch) if name or arch else None


def device_memory(info: dict[str, Any] | None = None) -> tuple[int, int | None] | None:
    """(total, free) bytes of the device's memory, free None where not reported; None on the
    CPU. MLX 0.32's CUDA backend reports `total_memory` and `free_memory` (NVML's device-wide
    figures, or cudaMemGetInfo's without NVML); Metal reports `memory_size` (the unified
    memory) and no free figure."""
    info = _info() if info is None else info
    total = info.get("total_memory") or info.get("memory_size")
    if not total:
        return None
    free = info.get("free_memory")
    return int(total), int(free) if free is not None else None


def measure() -> Device:
    """On the model thread: the backend, device and its memory now; kept for `describe`.
    The first call's free memory (before any model loads) is the one kept."""
    global _found
    with _lock:
        if _found is not None:
            return _found
    info = _info()
    kind = backend()
    memory = device_memory(info) if kind != "cpu" else None
    working_set = info.get("max_recommended_working_set_size") if kind != "cpu" else None
    found = Device(
        backend=kind,
        name=device_name(info),
        total_bytes=memory[0] if memory else None,
        free_bytes=memory[1] if memory else None,
        working_set_bytes=int(working_set) if working_set else None,
    )
    with _lock:
        _found = _found or found
        return _found


def describe() -> dict[str, Any] | None:
    """What `measure` found and where kernels are cached (this process's MLX_PTX_CACHE_DIR,
    once `use_kernel_cache` ran), as plain data; None before `measure`. Never imports mlx."""
    with _lock:
        if _found is None:
            return None
        path = os.environ.get(KERNEL_CACHE_ENV)
        set_by = _kernel_cache_set_by
        cache = {"path": path, "set_by": set_by} if path and set_by else None
        return {**asdict(_found), "kernel_cache": cache}


def use_kernel_cache(
    data_dir: Path, environ: MutableMapping[str, str] | None = None
) -> dict[str, str]:
    """Before mlx is imported: point MLX's CUDA kernel cache into the data directory, so the
    kernels compiled once (40-50 s on a fresh machine) outlive reboots; unless the user set
    MLX_PTX_CACHE_DIR, which is left as it is. Returns {path, set_by: aip|user}. Harmless on
    Metal and the CPU, whose backends do not read it."""
    global _kernel_cache_set_by
    environ = os.environ if environ is None else environ
    set_by = "user" if environ.get(KERNEL_CACHE_ENV) else "aip"
    if set_by == "aip":
        environ[KERNEL_CACHE_ENV] = str((data_dir / KERNEL_CACHE_DIR).absolute())
    with _lock:
        _kernel_cache_set_by = set_by
    return {"path": environ[KERNEL_CACHE_ENV], "set_by": set_by}

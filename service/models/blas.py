"""The CPU BLAS behind MLX on Linux: reads `AIP_CPU_BLAS`, loads Intel's MKL from its pip wheel
into the process's global symbol scope before mlx is first imported, and reports which library
serves `cblas_sgemm` and how fast it multiplies. Knows nothing of models or HTTP; imports mlx
only to measure.

Why this works: the mlx[cpu] wheel's libmlx.so leaves `cblas_sgemm` and friends undefined and
lists the reference (netlib) BLAS it bundles as a dependency. It is loaded with RTLD_LOCAL,
and the dynamic linker resolves its undefined symbols in the global scope first, so a library
loaded RTLD_GLOBAL beforehand serves them (measured on 2 cores: about 4 GFLOP/s -> 40-70)."""

from __future__ import annotations

import ctypes
import importlib.metadata
import os
import platform
import sys
import threading
import time
from dataclasses import asdict, dataclass, replace
from pathlib import Path
from typing import Any

from service.errors import ModelUnavailable

SETTING = "AIP_CPU_BLAS"
CHOICES = ("auto", "mkl", "bundled")

# MKL's threading layer unless MKL_THREADING_LAYER names one. TBB: the `tbb` wheel is a
# dependency of `mkl`, so it is always there; its workers steal work and sleep instead of
# spinning, which suits a server whose event loop and numpy share the same few cores (Intel
# OpenMP spins 200 ms after each parallel region by default). Measured on 2 shared cores:
# a 1024² GEMM within noise under TBB and Intel OpenMP, sequential about half as fast; the
# `small` one-query detect costs the same CPU time under all three (3.1, 3.4, 3.1 s).
DEFAULT_LAYER = "TBB"
# MKL_Set_Threading_Layer's codes, and the runtime each layer needs loaded first.
_LAYERS = {"INTEL": 0, "SEQUENTIAL": 1, "GNU": 3, "TBB": 4}
_RUNTIMES = {"INTEL": ("intel-openmp", "libiomp5.so"), "TBB": ("tbb", "libtbb.so.12")}


class BlasUnavailable(ModelUnavailable):
    """`AIP_CPU_BLAS=mkl` where MKL cannot be loaded: no model can load (503, with the reason)."""

    code = "cpu_blas_unavailable"


@dataclass(frozen=True)
class State:
    """What this process multiplies with. `library`: the file serving `cblas_sgemm` as the
    dynamic linker resolves it for libmlx (None until mlx is imported, or off Linux)."""

    setting: str
    blas: str  # "mkl", "bundled" (the mlx[cpu] wheel's reference BLAS) or "platform" (its own)
    reason: str
    threading: str | None = None
    threads: int | None = None
    library: str | None = None
    gflops: float | None = None


_lock = threading.RLock()
_state: State | None = None


def parse_setting(value: str | None) -> str:
    """`AIP_CPU_BLAS`'s text as one of CHOICES; unset or empty means `auto`."""
    text = (value or "auto").strip().lower()
    if text not in CHOICES:
        raise ValueError(
            "use auto (Intel MKL where its wheel is installed on Linux x86_64, else the BLAS "
            "mlx ships with), mkl (require MKL) or bundled (the BLAS mlx ships with)"
        )
    return text


def _linux_x86() -> bool:
    return sys.platform == "linux" and platform.machine().lower() in ("x86_64", "amd64")


def _dist_file(dist: str, name: str) -> Path | None:
    """A file an installed distribution recorded, by file name (no guessed paths)."""
    try:
        found = importlib.metadata.distribution(dist)
    except importlib.metadata.PackageNotFoundError:
        return None
    for entry in found.files or []:
        if entry.name == name:
            path = Path(str(found.locate_file(entry))).resolve()
            if path.is_file():
                return path
    return None


def _mkl_library() -> Path | None:
    return _dist_file("mkl", "libmkl_rt.so.3") or _dist_file("mkl", "libmkl_rt.so.2")


def _stock_cpu_wheel() -> bool:
    """The mlx[cpu] wheel (the one bundling a reference BLAS) provides libmlx here."""
    return _dist_file("mlx-cpu", "libmlx.so") is not None


def _threads() -> int | None:
    """Threads for MKL: the cores this process may run on, unless the user chose a count."""
    if os.environ.get("MKL_NUM_THREADS") or os.environ.get("OMP_NUM_THREADS"):
        return None  # MKL reads them itself
    try:
        return len(os.sched_getaffinity(0))
    except (AttributeError, OSError):
        return os.cpu_count()


def _load_mkl(setting: str) -> State:
    library = _mkl_library()
    if library is None:
        raise BlasUnavailable(
            f"{SETTING}={setting} but Intel MKL is not installed: `pip install mkl` (Linux "
            f"x86_64 only), or set {SETTING}=bundled"
        )
    layer = (os.environ.get("MKL_THREADING_LAYER") or DEFAULT_LAYER).strip().upper()
    if layer not in _LAYERS:
        raise BlasUnavailable(
            f"MKL_THREADING_LAYER={layer!r} is not one of {', '.join(_LAYERS)}; unset it to "
            f"use {DEFAULT_LAYER}"
        )
    runtime = _RUNTIMES.get(layer)
    try:
        if runtime is not None:
            found = _dist_file(*runtime)
            if found is None:
                raise OSError(f"{runtime[1]} (from the {runtime[0]} wheel) is not installed")
            # MKL's threading library needs it by soname; loaded first, it is found.
            ctypes.CDLL(str(found), mode=ctypes.RTLD_GLOBAL)
        mkl = ctypes.CDLL(str(library), mode=ctypes.RTLD_GLOBAL)
        # Before any other MKL call; the explicit calls leave the environment untouched.
        mkl.MKL_Set_Threading_Layer(ctypes.c_int(_LAYERS[layer]))
        threads = _threads()
        if threads:
            mkl.MKL_Set_Num_Threads(ctypes.c_int(threads))
        actual = int(mkl.MKL_Get_Max_Threads())
    except (OSError, AttributeError) as exc:
        raise BlasUnavailable(
            f"{SETTING}={setting}: Intel MKL failed to load ({exc}); reinstall the mkl wheel "
            f"or set {SETTING}=bundled"
        ) from exc
    return State(setting, "mkl", f"loaded {library.name}", layer.lower(), actual)


def _decide(setting: str) -> State:
    if not _linux_x86():
        if setting == "mkl":
            raise BlasUnavailable(
                f"{SETTING}=mkl is for Linux x86_64; this is {sys.platform} "
                f"{platform.machine()}, where mlx uses the platform's BLAS: set {SETTING}=auto"
            )
        return State(setting, "platform", "mlx uses the platform's own BLAS here")
    if setting == "bundled":
        return State(setting, "bundled", f"{SETTING}=bundled")
    if setting == "auto" and _mkl_library() is None:
        return State(setting, "bundled", "the mkl wheel is not installed")
    if setting == "auto" and not _stock_cpu_wheel():
        return State(setting, "platform", "this mlx build is not the mlx[cpu] wheel: its own")
    try:
        return _load_mkl(setting)
    except BlasUnavailable as exc:
        if setting == "mkl":
            raise
        return State(setting, "bundled", f"MKL did not load, so the bundled BLAS serves: {exc}")


def configure(setting: str | None = None) -> State:
    """Choose and load the CPU BLAS, once per process (later calls return the first answer);
    `setting` None reads `AIP_CPU_BLAS`. Must run before mlx is imported to take effect: after,
    the report says what serves instead. Raises ValueError for a bad setting and
    BlasUnavailable when MKL is required but cannot be loaded."""
    global _state
    with _lock:
        if _state is not None:
            return _state
        text = os.environ.get(SETTING) if setting is None else setting
        try:
            chosen = parse_setting(text)
        except ValueError as exc:
            raise ValueError(f"{SETTING}={text!r}: {exc}") from None
        if "mlx.core" in sys.modules and chosen != "bundled" and _linux_x86():
            _state = State(chosen, "bundled", "mlx was imported before the BLAS was chosen")
        else:
            _state = _decide(chosen)
        return _state


def serving_library() -> str | None:
    """The file MLX's `cblas_sgemm` calls go to, as the dynamic linker binds libmlx's undefined
    symbol: the first definition in the global scope, else the one among libmlx's own
    dependencies (or the reverse when Python loads extensions with RTLD_DEEPBIND). None off
    Linux or before mlx is imported."""
    if sys.platform != "linux" or "mlx.core" not in sys.modules:
        return None
    libmlx = _dist_file("mlx-cpu", "libmlx.so") or _dist_file("mlx", "libmlx.so")
    scopes: list[ctypes.CDLL] = [ctypes.CDLL(None)]
    if libmlx is not None:
        scopes.append(ctypes.CDLL(str(libmlx), mode=os.RTLD_NOLOAD))
    if sys.getdlopenflags() & getattr(os, "RTLD_DEEPBIND", 0):
        scopes.reverse()
    for scope in scopes:
        try:
            symbol = scope.cblas_sgemm
        except AttributeError:
            continue
        return _file_of(ctypes.cast(symbol, ctypes.c_void_p).value)
    return None


class _DlInfo(ctypes.Structure):
    _fields_ = [
        ("dli_fname", ctypes.c_char_p),
        ("dli_fbase", ctypes.c_void_p),
        ("dli_sname", ctypes.c_char_p),
        ("dli_saddr", ctypes.c_void_p),
    ]


def _file_of(address: int | None) -> str | None:
    info = _DlInfo()
    if not address or not ctypes.CDLL(None).dladdr(ctypes.c_void_p(address), ctypes.byref(info)):
        return None
    return info.dli_fname.decode(errors="replace") if info.dli_fname else None


def measure(n: int = 256, repeats: int = 5) -> State:
    """Import mlx (after `configure`), time an n x n float32 GEMM on the CPU stream, note
    which library served it, and keep both in the report; returns the report. A few ms with a
    fast BLAS, tens with the bundled one. Raises as `configure` does."""
    state = configure()
    import mlx.core as mx

    a = mx.random.normal((n, n), key=mx.random.key(0), stream=mx.cpu)
    b = mx.random.normal((n, n), key=mx.random.key(1), stream=mx.cpu)
    mx.eval(mx.matmul(a, b, stream=mx.cpu))  # warm: threads started, symbol bound
    best = float("inf")
    for _ in range(repeats):
        began = time.perf_counter()
        mx.eval(mx.matmul(a, b, stream=mx.cpu))
        best = min(best, time.perf_counter() - began)
    library = serving_library()
    global _state
    with _lock:
        _state = replace(
            state,
            library=Path(library).name if library else None,
            gflops=round(2 * n**3 / best / 1e9, 1),
        )
        return _state


def describe() -> dict[str, Any] | None:
    """The report as plain data, or None before `configure`; never imports mlx."""
    with _lock:
        return None if _state is None else asdict(_state)


class _BeforeMlx:
    """A meta-path finder that only watches: the first `import mlx` anywhere in the process
    runs `configure()` first, so no import site can come before the BLAS is chosen."""

    def find_spec(self, name: str, path: Any = None, target: Any = None) -> None:
        if name == "mlx":
            configure()  # raises for a bad setting, which stops the import with the reason
            if self in sys.meta_path:
                sys.meta_path.remove(self)


def install_hook() -> None:
    """Arrange for `configure()` to run right before mlx is first imported; idempotent."""
    with _lock:
        if "mlx" in sys.modules or any(isinstance(f, _BeforeMlx) for f in sys.meta_path):
            return
        sys.meta_path.insert(0, _BeforeMlx())

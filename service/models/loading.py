"""The model thread's side of loads and unloads: open a checkpoint in stages and wrap it as its
role's runtime (or call a stand-in loader once), measure what it holds, give memory back, and
read MLX's counters. Called by the host on its model thread; knows no budget and no roles'
states."""

from __future__ import annotations

import gc
import sys
from collections.abc import Callable
from pathlib import Path
from typing import Any

from service.models import mlx_runtime


def on_cpu() -> bool:
    return mlx_runtime.on_cpu()


def multimodal_skip() -> Callable[[str], bool]:
    """mlx-vlm's own rule for what its converter leaves unquantised (vision towers...)."""
    from mlx_vlm.utils import skip_multimodal_module

    return skip_multimodal_module


def memory() -> dict[str, int]:
    """MLX's allocator: bytes in live arrays, the peak since the last reset, the free cache."""
    import mlx.core as mx

    return {
        "active_bytes": int(mx.get_active_memory()),
        "peak_bytes": int(mx.get_peak_memory()),
        "cache_bytes": int(mx.get_cache_memory()),
    }


def memory_if_imported() -> dict[str, int] | None:
    """The counters for a report, without importing MLX into a process that has not."""
    return memory() if "mlx.core" in sys.modules else None


def recommended_working_set() -> int | None:
    """The GPU's recommended working set, where MLX reports one (Apple silicon); else None."""
    import mlx.core as mx

    if mlx_runtime.on_cpu():
        return None
    size = mx.device_info().get("max_recommended_working_set_size")
    return int(size) if size else None


def give_back_memory() -> None:
    """After dropping a model: collect it (modules hold reference cycles) and hand MLX's buffer
    cache back, or the freed bytes stay reserved by this process."""
    gc.collect()
    if "mlx.core" in sys.modules:
        import mlx.core as mx

        mx.clear_cache()


def _mark() -> int:
    """Start measuring a load: reset MLX's peak and return the bytes live now."""
    import mlx.core as mx

    mx.reset_peak_memory()
    return int(mx.get_active_memory())


def _runtime(role: str, model: Any, processor: Any) -> Any:
    from service.models import falcon, gemma

    return (falcon.FalconDetector if role == "detector" else gemma.GemmaReasoner)(model, processor)


class Staged:
    """A real runtime on its way in: `step()` until it returns True, then `finish()`."""

    def __init__(self, role: str, path: Path) -> None:
        self.role = role
        self._start = _mark()
        self._load: mlx_runtime.StagedLoad | None = mlx_runtime.StagedLoad(path)

    @property
    def fraction(self) -> float:
        return self._load.fraction if self._load else 1.0

    def step(self) -> bool:
        return self._load is None or self._load.step()

    def finish(self) -> tuple[Any, int, int]:
        """The runtime, its resident bytes (its live arrays) and the load's peak above start."""
        import mlx.core as mx

        assert self._load is not None
        model, processor = self._load.model, self._load.processor
        self._load = None  # the host keeps the runtime only
        peak = int(mx.get_peak_memory()) - self._start
        return _runtime(self.role, model, processor), mlx_runtime.parameter_bytes(model), peak


def open_staged(role: str, path: Path) -> Staged:
    return Staged(role, path)


def one_shot(loader: Callable[[Path], Any], path: Path) -> tuple[Any, int, int]:
    """A stand-in loader called once; what it holds is what MLX's live bytes grew by."""
    import mlx.core as mx

    start = _mark()
    runtime = loader(path)
    return runtime, max(int(mx.get_active_memory()) - start, 0), int(mx.get_peak_memory()) - start

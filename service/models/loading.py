"""The model thread's side of loads and unloads: open a checkpoint in stages and wrap it as its
role's runtime (or call a stand-in loader once), measure what it holds, warm it up, give
memory back, and read MLX's counters. Called by the host on its model thread; decides no budget
(it only sizes its loading steps by the budget module's arithmetic) and knows no roles' states."""

from __future__ import annotations

import ctypes
import gc
import sys
import time
from collections.abc import Callable
from pathlib import Path
from typing import Any

from service.models import budget, mlx_runtime

# A load hands the model thread back to jobs this often. Each hand-back is two thread wake-ups,
# which take milliseconds on a busy machine: one per (small) chunk made loads 1.5x slower.
STEP_SECONDS = 0.05


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


def give_back_memory() -> None:
    """After dropping what may hold weights (a failed load's leftovers): collect it and hand
    the memory back to the system."""
    gc.collect()
    _hand_back()


def let_go(drop: Callable[[], object], held: int) -> None:
    """Run `drop()`, which lets go of a model holding `held` bytes of arrays (0: none), and hand
    its memory back. Reference counting frees most models at once; a full collection, which
    costs about 0.1 s with mlx-vlm and transformers imported, runs only when it did not (mlx-vlm's
    Falcon Perception keeps a reference to its parent model: a cycle)."""
    if "mlx.core" not in sys.modules:
        drop()
        gc.collect()
        return
    import mlx.core as mx

    before = int(mx.get_active_memory())
    drop()
    if held and before - int(mx.get_active_memory()) < held:
        gc.collect()
    _hand_back()


def _hand_back() -> None:
    """MLX's buffer cache, then the C allocator's free pages: freed arrays go back to malloc,
    and glibc keeps freed heap pages (all but the largest blocks) in this process until
    trimmed: measured, 70 MiB stayed resident after unloading two small models."""
    if "mlx.core" in sys.modules:
        import mlx.core as mx

        mx.clear_cache()
    if _malloc_trim is not None:
        _malloc_trim(0)


def _find_malloc_trim() -> Callable[[int], int] | None:
    """glibc's `malloc_trim`, where the C library has one (Linux); None elsewhere."""
    if not sys.platform.startswith("linux"):
        return None
    try:
        libc = ctypes.CDLL(None)
        trim: Callable[[int], int] = libc.malloc_trim
    except (OSError, AttributeError):
        return None
    return trim


_malloc_trim = _find_malloc_trim()


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
        chunk = budget.chunk_for(
            budget.estimate_load(budget.read_tensors(path), cpu=on_cpu()).resident_bytes
        )
        self._load: mlx_runtime.StagedLoad | None = mlx_runtime.StagedLoad(path, chunk)

    @property
    def fraction(self) -> float:
        return self._load.fraction if self._load else 1.0

    def step(self, seconds: float = STEP_SECONDS) -> bool:
        """Materialise chunks for about `seconds`; True once every weight is in memory."""
        if self._load is None:
            return True
        until = time.perf_counter() + seconds
        while not self._load.step():
            if time.perf_counter() >= until:
                return False
        return True

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


# A warm-up's input: small, so it costs little on the CPU, yet a real image and a real prompt,
# so it runs the kernels (and compiled graphs) a job's first call would.
WARMUP_IMAGE = (128, 96)
WARMUP_TOKENS = 8


def warm_up(role: str, runtime: Any) -> str:
    """One small inference through a runtime just loaded, on the model thread, before it
    serves: MLX compiles its kernels (on CUDA into MLX_PTX_CACHE_DIR, 40-50 s on a fresh
    machine) and mlx-vlm sets up its lazy state on first use, which a job would otherwise pay.
    Leaves no prompt state behind: the model holds what a load leaves. Returns what it ran,
    for the log."""
    from PIL import Image

    image = Image.new("RGB", WARMUP_IMAGE, (90, 120, 150))
    image.paste((200, 60, 40), (32, 24, 96, 72))
    size = "x".join(map(str, WARMUP_IMAGE))
    if role == "detector":
        runtime.detect(image, "object", max_new_tokens=WARMUP_TOKENS)
        # mlx-vlm's Falcon Perception keeps its last prompt's pixels and attention mask on the
        # model until the next one replaces them: here that would be the warm-up's.
        model = getattr(runtime, "model", None)
        _forget(model, "_prefill_pixel_values")
        _forget(getattr(model, "language_model", None), "_full_attn_mask")
        return f"one query on a {size} image"
    runtime.reason(image, "Describe the image.", max_tokens=WARMUP_TOKENS)
    prefixes = getattr(runtime, "prefixes", None)
    if prefixes is not None:
        prefixes.clear()
    return f"up to {WARMUP_TOKENS} tokens over a {size} image"


def _forget(owner: Any, name: str) -> None:
    if getattr(owner, name, None) is not None:
        setattr(owner, name, None)

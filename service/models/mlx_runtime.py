"""What both MLX runtimes share: staged loading, the CPU dtype rule, user-text hygiene,
thread teardown."""

from __future__ import annotations

import sys
import warnings
from collections.abc import Sequence
from pathlib import Path
from typing import Any

from service.models.budget import CHUNK_BYTES


def on_cpu() -> bool:
    import mlx.core as mx

    return bool(mx.default_device().type == mx.DeviceType.cpu)


def _fast_dtype_casts(model: Any) -> list[tuple[str, Any]]:
    """On the CPU backend MLX multiplies bfloat16/float16 far slower than float32 (the E2B
    vision tower: 175 s vs 24 s per image), so unquantised floating weights become float32
    there. Quantised layers keep their packed weights and scales; GPUs keep what was loaded.
    The casts are lazy: nothing is computed until they are evaluated."""
    import mlx.core as mx
    import mlx.nn as nn
    from mlx.utils import tree_flatten

    if not on_cpu():
        return []
    quantised = tuple(
        f"{name}."
        for name, module in model.named_modules()
        if isinstance(module, nn.QuantizedLinear | nn.QuantizedEmbedding)
    )
    return [
        (name, value.astype(mx.float32))
        for name, value in dict(tree_flatten(model.parameters())).items()
        if value.dtype in (mx.bfloat16, mx.float16) and not name.startswith(quantised)
    ]


def use_fast_dtype(model: Any) -> int:
    """The dtype rule above on a model already in memory. Returns how many arrays were cast."""
    import mlx.core as mx

    cast = _fast_dtype_casts(model)
    if cast:
        model.load_weights(cast, strict=False)
        mx.eval(model.parameters())
    return len(cast)


class StagedLoad:
    """A checkpoint opened lazily (`mlx_vlm.load(lazy=True)`: only config, processor and the
    safetensors headers are read), its CPU dtype casts set up lazily too, then its weights
    materialised `CHUNK_BYTES` at a time by `step()`. Each array goes from file to its final
    dtype and the source copy is dropped as soon as its chunk is done, so the peak stays near
    the final size instead of holding two copies (measured: 1.5x with load-then-cast). Between
    steps the caller may run other work on the same thread, and reads `fraction` for progress."""

    def __init__(self, path: Path, chunk_bytes: int = CHUNK_BYTES) -> None:
        import mlx_vlm
        from mlx.utils import tree_flatten

        with warnings.catch_warnings():
            # mlx-vlm builds Gemma 4's audio front end with defaults that trip this; no audio.
            warnings.filterwarnings("ignore", message="At least one mel filter has all zero")
            self.model, self.processor = mlx_vlm.load(str(path), lazy=True)
        cast = _fast_dtype_casts(self.model)
        if cast:
            self.model.load_weights(cast, strict=False)
        self._pending = list(dict(tree_flatten(self.model.parameters())).values())
        self._pending.reverse()  # popped from the end: the model's own order
        self.total_bytes = sum(value.nbytes for value in self._pending)
        self.done_bytes = 0
        self._chunk = chunk_bytes

    @property
    def fraction(self) -> float:
        return self.done_bytes / self.total_bytes if self.total_bytes else 1.0

    def step(self) -> bool:
        """Materialise the next chunk; True once every weight is in memory."""
        import mlx.core as mx

        chunk: list[Any] = []
        size = 0
        while self._pending and (not chunk or size + self._pending[-1].nbytes <= self._chunk):
            chunk.append(self._pending.pop())
            size += chunk[-1].nbytes
        if chunk:
            mx.eval(*chunk)
            self.done_bytes += size
        return not self._pending


def load(path: Path) -> tuple[Any, Any]:
    """`mlx_vlm.load` on a local folder with the dtype rule above, all steps at once."""
    staged = StagedLoad(path)
    while not staged.step():
        pass
    return staged.model, staged.processor


def parameter_bytes(model: Any) -> int:
    """What a loaded model's arrays hold: its resident size, measured on the live arrays."""
    from mlx.utils import tree_flatten

    return sum(value.nbytes for value in dict(tree_flatten(model.parameters())).values())


def special_tokens(processor: Any) -> tuple[str, ...]:
    """The tokenizer's special-token strings, longest first."""
    tokenizer = getattr(processor, "tokenizer", processor)
    added = getattr(tokenizer, "added_tokens_decoder", {}).values()
    return tuple(sorted({t.content for t in added if t.special}, key=len, reverse=True))


def plain_text(text: str, specials: Sequence[str]) -> str:
    """User text with special tokens taken out: typed into a query or prompt they would be
    parsed as control tokens, and an extra image placeholder makes the processor fail.
    Repeated, because taking one out can join the pieces of another."""
    while any(token in text for token in specials):
        for token in specials:
            text = text.replace(token, "")
    return text


def release_thread_streams() -> None:
    """MLX streams belong to the thread that made them. A thread that ran inference must call
    this before it ends, or the process aborts ("terminate called without an active
    exception"); mlx-vlm's atexit hook covers the main thread only. No-op without mlx."""
    mx = sys.modules.get("mlx.core")
    if mx is not None and hasattr(mx, "clear_streams"):
        mx.clear_streams()

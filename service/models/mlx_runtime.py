"""What both MLX runtimes share: loading, the CPU dtype rule, user-text hygiene, thread teardown."""

from __future__ import annotations

import sys
import warnings
from collections.abc import Sequence
from pathlib import Path
from typing import Any


def on_cpu() -> bool:
    import mlx.core as mx

    return bool(mx.default_device().type == mx.DeviceType.cpu)


def use_fast_dtype(model: Any) -> int:
    """On the CPU backend MLX multiplies bfloat16/float16 far slower than float32 (the E2B
    vision tower: 175 s vs 24 s per image), so unquantised floating weights become float32
    there. Quantised layers keep their packed weights and scales; GPUs keep what was loaded.
    Returns how many arrays were cast."""
    import mlx.core as mx
    import mlx.nn as nn
    from mlx.utils import tree_flatten

    if not on_cpu():
        return 0
    quantised = tuple(
        f"{name}."
        for name, module in model.named_modules()
        if isinstance(module, nn.QuantizedLinear | nn.QuantizedEmbedding)
    )
    cast = [
        (name, value.astype(mx.float32))
        for name, value in dict(tree_flatten(model.parameters())).items()
        if value.dtype in (mx.bfloat16, mx.float16) and not name.startswith(quantised)
    ]
    if cast:
        model.load_weights(cast, strict=False)
        mx.eval(model.parameters())
    return len(cast)


def load(path: Path) -> tuple[Any, Any]:
    """`mlx_vlm.load` on a local folder, then the dtype rule above."""
    import mlx_vlm

    with warnings.catch_warnings():
        # mlx-vlm builds Gemma 4's audio front end with defaults that trip this; no audio here.
        warnings.filterwarnings("ignore", message="At least one mel filter has all zero values")
        model, processor = mlx_vlm.load(str(path))
    use_fast_dtype(model)
    return model, processor


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

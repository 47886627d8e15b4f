"""What both MLX runtimes share: loading a checkpoint folder and picking the fast weight dtype."""

from __future__ import annotations

import warnings
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
        f"{name}." for name, module in model.named_modules()
        if isinstance(module, nn.QuantizedLinear | nn.QuantizedEmbedding)
    )
    cast = [
        (name, value.astype(mx.float32))
        for name, value in tree_flatten(model.parameters())
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

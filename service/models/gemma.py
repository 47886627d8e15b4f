"""The reasoner runtime: Gemma 4 through mlx-vlm, one image and one prompt in, text out."""

from __future__ import annotations

import threading
from pathlib import Path
from typing import Any, cast

from PIL import Image

from service.models import mlx_runtime


class GemmaReasoner:
    """One loaded checkpoint; greedy decoding, so the same input gives the same text."""

    def __init__(self, model: Any, processor: Any) -> None:
        self.model = model
        self.processor = processor
        self._specials = mlx_runtime.special_tokens(processor)
        self._lock = threading.Lock()

    def reason(self, image: Image.Image, prompt: str, *, max_tokens: int = 64) -> str:
        from mlx_vlm import generate
        from mlx_vlm.prompt_utils import apply_chat_template

        rgb = image if image.mode == "RGB" else image.convert("RGB")
        text = mlx_runtime.plain_text(prompt, self._specials)
        formatted = apply_chat_template(self.processor, self.model.config, text, num_images=1)
        with self._lock:
            result = generate(
                self.model,
                self.processor,
                cast(str, formatted),
                image=cast(Any, [rgb]),  # typed as paths, but PIL images are accepted
                max_tokens=max_tokens,
                temperature=0.0,  # explicit: the checkpoint's generation_config may ask to sample
                skip_special_tokens=True,
                verbose=False,
            )
        return str(result.text)


def load(path: Path) -> GemmaReasoner:
    model, processor = mlx_runtime.load(path)
    return GemmaReasoner(model, processor)

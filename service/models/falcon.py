"""The detector runtime: Falcon Perception through mlx-vlm, raw output turned into Detections."""

from __future__ import annotations

import threading
from pathlib import Path
from typing import Any

from PIL import Image

from service.detection import Detection, encode_mask
from service.models import mlx_runtime


def to_detections(
    raw: list[dict[str, Any]], query: str, image_size: tuple[int, int]
) -> list[Detection]:
    """Convert `generate_perception` output (normalised centre `xy`, size `hw`, optional
    boolean `mask` of the image's shape) into Detections in pixels of the original image."""
    out = []
    for item in raw:
        xy, hw = item["xy"], item["hw"]
        mask = item.get("mask")
        out.append(
            Detection.from_center_size(
                label=query,
                center=(float(xy["x"]), float(xy["y"])),
                size=(float(hw["w"]), float(hw["h"])),
                image_size=image_size,
                mask=encode_mask(_to_numpy(mask)) if mask is not None else None,
            )
        )
    return out


def _to_numpy(mask: Any) -> Any:
    import numpy as np

    return np.array(mask, dtype=bool)  # accepts mx.array, numpy arrays and nested lists


class FalconDetector:
    """One loaded checkpoint. `generate_perception` keeps per-call state on the model (it is
    reset at the start of every call), so calls are serialised."""

    def __init__(self, model: Any, processor: Any) -> None:
        self.model = model
        self.processor = processor
        self._specials = mlx_runtime.special_tokens(processor)
        self._lock = threading.Lock()

    def detect(
        self, image: Image.Image, query: str, *, max_new_tokens: int = 64
    ) -> list[Detection]:
        """Boxes for one referring expression; each is labelled with `query` as given."""
        rgb = image if image.mode == "RGB" else image.convert("RGB")
        text = mlx_runtime.plain_text(query, self._specials)
        with self._lock:
            raw = self.model.generate_perception(
                self.processor, image=rgb, query=text, max_new_tokens=max_new_tokens
            )
        return to_detections(raw, query, rgb.size)


def load(path: Path) -> FalconDetector:
    model, processor = mlx_runtime.load(path)
    return FalconDetector(model, processor)

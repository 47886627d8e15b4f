"""The detector runtime: Falcon Perception through mlx-vlm (driven by falcon_engine), raw output
turned into Detections."""

from __future__ import annotations

import threading
from collections.abc import Callable, Sequence
from pathlib import Path
from typing import Any

from PIL import Image

from service.detection import Detection, encode_mask
from service.models import mlx_runtime
from service.models.falcon_engine import FalconEngine


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
    """One loaded checkpoint. mlx-vlm's model keeps per-prompt state on itself, so calls are
    serialised. Detection runs through FalconEngine: the image is prefilled once for all of
    its queries, and the boxes equal one `generate_perception` call per query."""

    def __init__(self, model: Any, processor: Any) -> None:
        self.model = model
        self.processor = processor
        self.engine = FalconEngine(model, processor)
        self._specials = mlx_runtime.special_tokens(processor)
        self._lock = threading.Lock()

    @property
    def native_side(self) -> int:
        """The largest square side the processor takes unresized: mlx-vlm's Falcon Perception
        preprocessing shrinks a side over 1024 pixels, then rounds each side to its patch size
        within 28 * 28 * 1280 pixels. A tile of this side is seen at full resolution."""
        patch = int(getattr(self.processor, "spatial_patch_size", 16))
        side = 1024 // patch * patch
        while side * side > 28 * 28 * 1280:
            side -= patch
        return side

    def detect(
        self, image: Image.Image, query: str, *, max_new_tokens: int = 64
    ) -> list[Detection]:
        """Boxes for one referring expression; each is labelled with `query` as given."""
        return self.detect_many(image, [query], max_new_tokens=max_new_tokens)[0]

    def detect_many(
        self,
        image: Image.Image,
        queries: Sequence[str],
        *,
        max_new_tokens: int = 64,
        on_group: Callable[[list[str]], None] | None = None,
    ) -> list[list[Detection]]:
        """Boxes for each query, in order. The image is encoded once; queries decode together
        in groups, and `on_group(queries)` is called (with the queries as given) before each
        group starts: it may raise to stop there."""
        rgb = image if image.mode == "RGB" else image.convert("RGB")
        texts = [mlx_runtime.plain_text(q, self._specials) for q in queries]
        given = dict(zip(reversed(texts), reversed(queries), strict=True))  # text -> first query

        def started(group: Sequence[str]) -> None:
            if on_group is not None:
                on_group([given[text] for text in group])

        with self._lock:
            raw = self.engine.detect(rgb, texts, max_new_tokens=max_new_tokens, on_group=started)
        return [to_detections(r, q, rgb.size) for r, q in zip(raw, queries, strict=True)]


def load(path: Path) -> FalconDetector:
    model, processor = mlx_runtime.load(path)
    return FalconDetector(model, processor)

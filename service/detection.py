"""The one value type for a detected object; knows geometry, not models or storage."""

from __future__ import annotations

from dataclasses import dataclass
from typing import Any


def _clamp(value: float, low: float, high: float) -> float:
    return min(max(value, low), high)


@dataclass(frozen=True, slots=True)
class Detection:
    """One detected instance: a label and a box in pixels of the original image.

    Boxes are `[x1, y1, x2, y2]` with x1 <= x2 and y1 <= y2, clipped to the image.
    `mask` is an optional run-length encoding (see `encode_mask`) when segmentation is on.
    """

    label: str
    box: tuple[float, float, float, float]
    image_size: tuple[int, int]  # (width, height) the box refers to
    mask: dict[str, Any] | None = None

    def __post_init__(self) -> None:
        width, height = self.image_size
        if width <= 0 or height <= 0:
            raise ValueError(f"image size must be positive, got {self.image_size}")
        x1, y1, x2, y2 = self.box
        if not (x1 <= x2 and y1 <= y2):
            raise ValueError(f"box corners out of order: {self.box}")

    @classmethod
    def from_center_size(
        cls,
        label: str,
        center: tuple[float, float],
        size: tuple[float, float],
        image_size: tuple[int, int],
        mask: dict[str, Any] | None = None,
    ) -> Detection:
        """From a normalised centre `(cx, cy)` and size `(w, h)`, as Falcon Perception emits."""
        width, height = image_size
        cx, cy = center
        w, h = abs(size[0]), abs(size[1])
        x1 = _clamp((cx - w / 2) * width, 0.0, float(width))
        y1 = _clamp((cy - h / 2) * height, 0.0, float(height))
        x2 = _clamp((cx + w / 2) * width, 0.0, float(width))
        y2 = _clamp((cy + h / 2) * height, 0.0, float(height))
        return cls(label=label, box=(x1, y1, x2, y2), image_size=image_size, mask=mask)

    @property
    def normalized_box(self) -> tuple[float, float, float, float]:
        width, height = self.image_size
        x1, y1, x2, y2 = self.box
        return (x1 / width, y1 / height, x2 / width, y2 / height)

    def to_dict(self) -> dict[str, Any]:
        out: dict[str, Any] = {
            "label": self.label,
            "box": [round(v, 2) for v in self.box],
            "box_normalized": [round(v, 6) for v in self.normalized_box],
        }
        if self.mask is not None:
            out["mask"] = self.mask
        return out


def encode_mask(rows: list[list[bool]] | Any) -> dict[str, Any]:
    """Run-length encode a binary mask (row-major, starting with a run of zeros)."""
    import numpy as np

    array = np.asarray(rows, dtype=bool)
    flat = array.reshape(-1)
    if flat.size == 0:
        return {"size": list(array.shape), "counts": []}
    changes = np.flatnonzero(flat[1:] != flat[:-1]) + 1
    bounds = np.concatenate(([0], changes, [flat.size]))
    counts = np.diff(bounds).tolist()
    if flat[0]:
        counts = [0, *counts]
    return {"size": [int(array.shape[0]), int(array.shape[1])], "counts": counts}


def decode_mask(mask: dict[str, Any]) -> Any:
    """The boolean (height, width) array an `encode_mask` result stands for."""
    import numpy as np

    height, width = mask["size"]
    flat = np.zeros(height * width, dtype=bool)
    position, value = 0, False
    for run in mask["counts"]:
        flat[position : position + run] = value
        position, value = position + run, not value
    return flat.reshape(height, width)

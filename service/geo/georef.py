"""One frame's georeference in the JSON shapes stored on the job: the frame and each box."""

from __future__ import annotations

from collections.abc import Sequence
from typing import Any

from service.geo.camera import Unlocated, camera_from_exif
from service.geo.ground import locate


def georeference(
    exif: dict[str, Any] | None,
    width: int,
    height: int,
    boxes: Sequence[Sequence[float]],
    ground_elevation: float | None = None,
) -> tuple[dict[str, Any], list[dict[str, Any]]]:
    """(FRAME_GEO, [DETECTION_GEO per box]) for an upright image of `width` x `height` whose boxes
    are in its pixels; a frame or box that cannot be placed gets a reason, never an exception."""
    camera = camera_from_exif(exif, width, height, ground_elevation=ground_elevation)
    boxes = list(boxes) if isinstance(boxes, Sequence) and not isinstance(boxes, str) else []
    if isinstance(camera, Unlocated):
        frame = {"reason": camera.reason, "assumptions": list(camera.assumptions)}
        return frame, [{"reason": f"the frame is not located: {camera.reason}"} for _ in boxes]
    return locate(camera, boxes)

"""Privacy redaction: which detections to hide, the blur that hides them, the stored redacted
copy, and which file a job's image may be handed out from; pixels over PIL and files, knows no
store and no HTTP."""

from __future__ import annotations

import math
from collections.abc import Sequence
from pathlib import Path
from typing import IO

import numpy as np
import numpy.typing as npt
from PIL import Image, ImageFilter

from service.atomic import write_atomically
from service.detection import Detection, decode_mask
from service.errors import Conflict, Gone
from service.intake import open_stored

# Cells across a region's longer side: a face or a plate keeps its colours and rough shape,
# never its features or characters, whatever its size in pixels.
CELLS = 8
MIN_CELL = 2  # a region a few pixels across becomes one or two flat cells
_LOSSLESS = frozenset({"PNG", "BMP", "TIFF", "GIF"})
REDACTED_DIR = "redacted"


def regions(detections: Sequence[Detection], classes: Sequence[str]) -> list[Detection]:
    """The detections whose label is one of `classes`, ignoring case and outer spaces."""
    wanted = {c.strip().casefold() for c in classes if c.strip()}
    return [d for d in detections if d.label.strip().casefold() in wanted]


def _area(
    region: Detection, size: tuple[int, int]
) -> tuple[tuple[int, int, int, int], npt.NDArray[np.bool_]]:
    """The pixel rectangle to rework and the boolean array (its size) of pixels that change:
    the mask where there is one with any pixel set, else the whole box. Boxes and masks may
    refer to another size of the same image; they are scaled to `size`."""
    width, height = size
    sx, sy = width / region.image_size[0], height / region.image_size[1]
    if region.mask is not None:
        mask = decode_mask(region.mask)
        if mask.any():
            full = Image.fromarray(mask.astype(np.uint8) * 255, mode="L")
            if full.size != size:
                full = full.resize(size, Image.Resampling.NEAREST)
            left, top, right, bottom = full.getbbox() or (0, 0, 0, 0)
            inside = np.asarray(full.crop((left, top, right, bottom))) > 0
            return (left, top, right, bottom), inside
    x1, y1, x2, y2 = region.box
    left, top = max(0, math.floor(x1 * sx)), max(0, math.floor(y1 * sy))
    right, bottom = min(width, math.ceil(x2 * sx)), min(height, math.ceil(y2 * sy))
    shape = (max(0, bottom - top), max(0, right - left))
    return (left, top, right, bottom), np.ones(shape, dtype=bool)


def _obscure(patch: Image.Image) -> Image.Image:
    """Pixelated to about CELLS cells across its longer side, then blurred by about a cell,
    computed from the patch alone so nothing outside it is read or written."""
    width, height = patch.size
    cell = max(MIN_CELL, math.ceil(max(width, height) / CELLS))
    cells = (max(1, math.ceil(width / cell)), max(1, math.ceil(height / cell)))
    coarse = patch.resize(cells, Image.Resampling.BOX).resize(patch.size, Image.Resampling.NEAREST)
    return coarse.filter(ImageFilter.GaussianBlur(radius=cell / 2))


def blur(image: Image.Image, regions: Sequence[Detection]) -> Image.Image:
    """A copy of `image` (RGB) in which only the pixels of each region (its mask when it has
    one, else its box) are replaced by a pixelated, blurred version of that region."""
    out = image.convert("RGB") if image.mode != "RGB" else image.copy()
    for region in regions:
        (left, top, right, bottom), inside = _area(region, out.size)
        if right <= left or bottom <= top or not inside.any():
            continue
        rect = (left, top, right, bottom)
        hidden = _obscure(out.crop(rect))
        out.paste(hidden, rect, Image.fromarray(inside.astype(np.uint8) * 255, mode="L"))
    return out


def write_copy(data_dir: Path, image_path: str, job_id: int, regions: Sequence[Detection]) -> str:
    """The stored image at full size, upright, with `regions` blurred, written atomically
    (a temporary file, then a rename) as `redacted/<job_id>.png` for a lossless source and
    `.jpg` (quality 95) otherwise; returns that path, relative to `data_dir`."""
    with Image.open(data_dir / image_path) as header:
        lossless = header.format in _LOSSLESS
    redacted = blur(open_stored(data_dir, image_path), regions)
    relative = f"{REDACTED_DIR}/{job_id}.{'png' if lossless else 'jpg'}"

    def save(out: IO[bytes]) -> None:
        if lossless:
            # Speed over size: a 40-megapixel frame at the default level takes seconds.
            redacted.save(out, format="PNG", compress_level=1)
        else:
            redacted.save(out, format="JPEG", quality=95)

    write_atomically(data_dir / relative, save)
    return relative


def redacted_copy(
    data_dir: Path,
    job_id: int,
    redact: Sequence[str],
    redacted_path: str | None,
    status: str = "",
) -> Path | None:
    """The file a job that redacts `redact` hands out instead of its original; None for a job
    that redacts nothing. Its original is never handed out: until the copy is written that is
    a Conflict (`redaction_pending`), and a copy since removed is Gone."""
    if not redact:
        return None
    if redacted_path is None and status in ("failed", "cancelled"):
        raise Conflict(
            f"job {job_id} was {status} before its redacted copy was written, so it has no "
            "image to hand out (its original never is); retry it to make one",
            code="no_redacted_copy",
        )
    if redacted_path is None:
        raise Conflict(
            f"job {job_id} blurs {', '.join(redact)} in every image it hands out and its "
            "redacted copy is not written yet (it is written when the job succeeds); its "
            "original is never handed out",
            code="redaction_pending",
        )
    path = data_dir / redacted_path
    if not path.is_file():
        raise Gone(
            f"job {job_id}'s redacted image is no longer in the data directory", code="image_gone"
        )
    return path

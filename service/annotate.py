"""Draws a job's detections on its image: numbered boxes (the numbers the reasoning prompt
used), labels and masks, sized to stay legible on a 64 px thumbnail and a 40 MP frame; label
tags of coinciding boxes are stacked so that none hides another."""

from __future__ import annotations

import io
import math
from collections.abc import Sequence
from typing import Any

import numpy as np
from PIL import Image, ImageDraw, ImageFont

from service.detection import decode_mask

PALETTE = [
    (230, 25, 75), (60, 180, 75), (255, 225, 25), (0, 130, 200), (245, 130, 48),
    (145, 30, 180), (70, 240, 240), (240, 50, 230), (210, 245, 60), (250, 190, 212),
]  # fmt: skip


Rect = tuple[int, int, int, int]  # left, top, right, bottom


def _overlap(a: Rect, b: Rect) -> int:
    width = min(a[2], b[2]) - max(a[0], b[0])
    height = min(a[3], b[3]) - max(a[1], b[1])
    return width * height if width > 0 and height > 0 else 0


def _clamped(x: float, y: float, w: int, h: int, size: tuple[int, int]) -> Rect:
    left = round(max(0.0, min(x, size[0] - w)))
    top = round(max(0.0, min(y, size[1] - h)))
    return (left, top, left + w, top + h)


def label_layout(
    boxes: Sequence[Sequence[float]], tags: Sequence[tuple[int, int]], size: tuple[int, int]
) -> list[Rect]:
    """Where each box's label tag (`tags`: width, height) goes in an image of `size`: above
    its box (inside it at the top edge), else the nearest free row above or below, else the
    next column over; always inside the image, and overlapping no other tag unless the image
    has no room left (then wherever it overlaps least)."""
    placed: list[Rect] = []
    for (x1, y1, _x2, _y2), (w, h) in zip(boxes, tags, strict=True):
        home_y = y1 - h if y1 - h >= 0 else y1
        rows = max(1, size[1] // max(h, 1))
        columns = max(1, size[0] // max(w, 1))
        best: Rect | None = None
        best_cost = -1
        for column in range(columns):
            x = x1 + column * w if x1 + (column + 1) * w <= size[0] else x1 - column * w
            for step in range(2 * rows + 1):
                # 0, up 1, down 1, up 2, down 2, ...: the nearest free row to the box
                offset = (step + 1) // 2 * (-1 if step % 2 else 1)
                candidate = _clamped(x, home_y + offset * h, w, h, size)
                cost = sum(_overlap(candidate, other) for other in placed)
                if best is None or cost < best_cost:
                    best, best_cost = candidate, cost
                if cost == 0:
                    break
            if best_cost == 0:
                break
        assert best is not None
        placed.append(best)
    return placed


def annotate(image: Image.Image, detections: list[dict[str, Any]]) -> Image.Image:
    """A copy of `image` with every detection drawn; colours follow the label."""
    canvas = image.convert("RGB")
    short_side = min(canvas.size)
    line = max(1, round(short_side / 250))
    font = ImageFont.load_default(size=max(10, round(short_side / 35)))
    colours: dict[str, tuple[int, int, int]] = {}
    for d in detections:
        colour = colours.setdefault(d["label"], PALETTE[len(colours) % len(PALETTE)])
        if d.get("mask"):
            region = Image.fromarray(decode_mask(d["mask"]).astype(np.uint8) * 96, mode="L")
            if region.size != canvas.size:
                region = region.resize(canvas.size, Image.Resampling.NEAREST)
            canvas.paste(Image.new("RGB", canvas.size, colour), mask=region)
    draw = ImageDraw.Draw(canvas)
    for d in detections:
        draw.rectangle(tuple(d["box"]), outline=colours[d["label"]], width=line)
    # Tags go on after every box, so no box line crosses another box's label.
    captions = [f"{d['number']} {d['label']}" for d in detections]
    extents = [draw.textbbox((0, 0), caption, font=font) for caption in captions]
    pad = 2 * line
    tags = [(math.ceil(r - lft) + pad, math.ceil(b - t) + pad) for lft, t, r, b in extents]
    places = label_layout([d["box"] for d in detections], tags, canvas.size)
    for d, caption, (left, top, _r, _b), place in zip(
        detections, captions, extents, places, strict=True
    ):
        colour = colours[d["label"]]
        draw.rectangle((place[0], place[1], place[2] - 1, place[3] - 1), fill=colour)
        brightness = sum(c * k for c, k in zip(colour, (0.299, 0.587, 0.114), strict=True))
        draw.text(
            (place[0] + line - left, place[1] + line - top),
            caption,
            font=font,
            fill=(0, 0, 0) if brightness > 150 else (255, 255, 255),
        )
    return canvas


def to_jpeg(image: Image.Image) -> bytes:
    buffer = io.BytesIO()
    image.save(buffer, format="JPEG", quality=90)
    return buffer.getvalue()

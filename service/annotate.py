"""Draws a job's detections on its image: numbered boxes (the numbers the reasoning prompt
used), labels and masks, sized to stay legible on a 64 px thumbnail and a 40 MP frame."""

from __future__ import annotations

import io
from typing import Any

import numpy as np
from PIL import Image, ImageDraw, ImageFont

from service.detection import decode_mask

PALETTE = [
    (230, 25, 75), (60, 180, 75), (255, 225, 25), (0, 130, 200), (245, 130, 48),
    (145, 30, 180), (70, 240, 240), (240, 50, 230), (210, 245, 60), (250, 190, 212),
]  # fmt: skip


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
        colour = colours[d["label"]]
        x1, y1, x2, y2 = d["box"]
        draw.rectangle((x1, y1, x2, y2), outline=colour, width=line)
        caption = f"{d['number']} {d['label']}"
        left, top, right, bottom = draw.textbbox((0, 0), caption, font=font)
        w, h = right - left + 2 * line, bottom - top + 2 * line
        # The caption sits above the box, or inside it when the box touches the top edge.
        tx, ty = max(0.0, min(x1, canvas.width - w)), y1 - h if y1 - h >= 0 else y1
        draw.rectangle((tx, ty, tx + w, ty + h), fill=colour)
        brightness = sum(c * k for c, k in zip(colour, (0.299, 0.587, 0.114), strict=True))
        draw.text(
            (tx + line - left, ty + line - top),
            caption,
            font=font,
            fill=(0, 0, 0) if brightness > 150 else (255, 255, 255),
        )
    return canvas


def to_jpeg(image: Image.Image) -> bytes:
    buffer = io.BytesIO()
    image.save(buffer, format="JPEG", quality=90)
    return buffer.getvalue()

"""Decodes an image file once into the upright 8-bit RGB the models take, in memory bounded by
the file's pixel count: reduced while loading where the format allows, converted band by band
elsewhere. Knows Pillow and the PNG container, not the models, HTTP or the store."""

from __future__ import annotations

import math
import struct
import zlib
from collections.abc import Callable, Iterator
from dataclasses import dataclass
from typing import IO

from PIL import ExifTags, Image

# Longest side of the image the models receive. Falcon Perception's processor shrinks to a
# longest side of 1024 and Gemma 4 to its soft-token budget (a few hundred pixels), so any
# larger original is first reduced by a whole factor to a longest side in (1024, 2048]: the
# models' own resize still sets their final resolution, from a box-filtered (antialiased)
# source, and the working image never exceeds 2048 x 2048 x 4 bytes = 16 MiB.
WORKING_SIDE = 2048
_BAND_PIXELS = 1 << 18  # pixels converted at a time: a few MiB in flight

_TRANSPOSE = {
    2: Image.Transpose.FLIP_LEFT_RIGHT,
    3: Image.Transpose.ROTATE_180,
    4: Image.Transpose.FLIP_TOP_BOTTOM,
    5: Image.Transpose.TRANSPOSE,
    6: Image.Transpose.ROTATE_270,
    7: Image.Transpose.TRANSVERSE,
    8: Image.Transpose.ROTATE_90,
}
# The formats the service accepts (README, "Accepted formats"); MPO is a JPEG with extra frames.
# Pillow opens MPO through its JPEG opener.
FORMATS = ("JPEG", "PNG", "WEBP", "TIFF", "BMP", "GIF")
_SIXTEEN_BIT = ("I;16", "I;16B", "I;16L", "I;16N", "I")


@dataclass(frozen=True)
class Decoded:
    image: Image.Image  # upright 8-bit RGB, longest side <= the requested bound
    original_size: tuple[int, int]  # (width, height) of the original, upright


def orientation(image: Image.Image) -> int:
    """The EXIF orientation (1..8), read without decoding pixels (a PNG whose eXIf chunk
    follows the pixel data counts as upright)."""
    if image.format == "PNG" and "exif" not in image.info:
        return 1  # Pillow would decode the whole image to look further
    value = image.getexif().get(ExifTags.Base.Orientation, 1)
    return value if isinstance(value, int) and value in _TRANSPOSE else 1


def upright_size(image: Image.Image) -> tuple[int, int]:
    width, height = image.size
    return (height, width) if orientation(image) in (5, 6, 7, 8) else (width, height)


def decode(fp: IO[bytes], *, max_side: int | None = WORKING_SIDE) -> Decoded:
    """Decode the image in `fp` to upright RGB, reduced by a whole factor so its longest side
    is at most `max_side` (None: full size). Raises what Pillow raises on bad data (OSError,
    SyntaxError, ValueError, EOFError; UnidentifiedImageError for other formats)."""
    with Image.open(fp, formats=FORMATS) as image:
        turn = orientation(image)
        width, height = image.size
        original = (height, width) if turn in (5, 6, 7, 8) else (width, height)
        factor = max(1, math.ceil(max(width, height) / max_side)) if max_side else 1
        if factor > 1 and image.format in ("JPEG", "MPO"):
            # DCT scaling: libjpeg decodes at 1/2, 1/4 or 1/8 size, never below the target.
            image.draft(None, (math.ceil(width / factor), math.ceil(height / factor)))
            if image.size != (width, height):
                factor = max(1, math.ceil(max(image.size) / max_side)) if max_side else 1
        streamed = _png_rows(image, fp) if factor > 1 else None
        if streamed is not None:
            rgb = _assemble(image.size, factor, streamed, lambda band: band)
        else:
            image.load()
            if factor == 1 and image.mode == "RGB":
                rgb = image  # already what the models take: no second copy
            else:
                rgb = _assemble(image.size, factor, _bands_of(image), _contrast(image))
    if turn in _TRANSPOSE:
        rgb = rgb.transpose(_TRANSPOSE[turn])
    return Decoded(rgb, original)


def _contrast(image: Image.Image) -> Callable[[Image.Image], Image.Image]:
    """High-bit-depth greys are stretched so their brightest value is white (the whole
    image's maximum, so bands agree); every other mode converts as Pillow converts it."""
    if image.mode not in _SIXTEEN_BIT:
        return lambda band: band
    import numpy as np

    top = int(image.getextrema()[1]) or 1  # type: ignore[arg-type]

    def stretch(band: Image.Image) -> Image.Image:
        # In place, in 32 bits when that holds 65535 * 255: a band, never the whole image.
        values = np.array(band, dtype=np.int64 if band.mode == "I" else np.uint32)
        np.clip(values, 0, top, out=values)
        np.multiply(values, 255, out=values)
        np.floor_divide(values, top, out=values)
        return Image.fromarray(values.astype(np.uint8))

    return stretch


def _to_rgb(band: Image.Image) -> Image.Image:
    """Palette and alpha over white, CMYK and the rest as Pillow converts them."""
    if band.mode == "P":
        band = band.convert("RGBA")
    if band.mode in ("RGBA", "LA", "PA", "La", "RGBa"):
        rgba = band.convert("RGBA")
        background = Image.new("RGB", band.size, (255, 255, 255))
        background.paste(rgba, mask=rgba.getchannel("A"))
        return background
    return band if band.mode == "RGB" else band.convert("RGB")


def _band_rows(width: int, factor: int) -> int:
    return factor * max(1, _BAND_PIXELS // max(1, width * factor))


def _bands_of(image: Image.Image) -> Iterator[Image.Image]:
    width, height = image.size
    step = _band_rows(width, 1)
    for top in range(0, height, step):
        yield image.crop((0, top, width, min(top + step, height)))


def _assemble(
    size: tuple[int, int],
    factor: int,
    bands: Iterator[Image.Image],
    prepare: Callable[[Image.Image], Image.Image],
) -> Image.Image:
    """Convert bands of rows to RGB and reduce each by `factor` into one output image. Bands
    are regrouped on multiples of `factor` rows, so the box filter sees the same pixels as a
    reduction of the whole image would (no seams)."""
    width, height = size
    out = Image.new("RGB", (math.ceil(width / factor), math.ceil(height / factor)))
    if factor == 1:
        top = 0
        for band in bands:
            out.paste(_to_rgb(prepare(band)), (0, top))
            top += band.height
        return out
    pending: list[Image.Image] = []
    rows = top = 0
    group = _band_rows(width, factor)

    def flush(count: int) -> None:
        nonlocal pending, rows, top
        joined = pending[0] if len(pending) == 1 else _stack(pending, width)
        chunk, rest = joined.crop((0, 0, width, count)), joined.crop((0, count, width, rows))
        out.paste(_to_rgb(prepare(chunk)).reduce(factor), (0, top // factor))
        top += count
        pending, rows = ([rest] if rest.height else []), rows - count

    for band in bands:
        pending.append(band)
        rows += band.height
        while rows >= group:
            flush(group)
    if rows:
        flush(rows)
    return out


def _stack(parts: list[Image.Image], width: int) -> Image.Image:
    joined = Image.new(parts[0].mode, (width, sum(p.height for p in parts)))
    top = 0
    for part in parts:
        joined.paste(part, (0, top))
        top += part.height
    return joined


# -- PNG streamed by strips --------------------------------------------------------------------
# Pillow decodes a PNG whole, and holds RGB, RGBA and LA at 4 bytes per pixel. For those, the
# pixel stream is inflated here a strip at a time and each strip is decoded by Pillow as a small
# PNG of its own, led by the previous strip's last row unfiltered, so PNG's row filters see
# the same rows they would in the whole image.

_STREAMED = {2: ("RGB", 3), 4: ("LA", 2), 6: ("RGBA", 4)}  # colour type: Pillow mode, bytes/px


def _png_rows(image: Image.Image, fp: IO[bytes]) -> Iterator[Image.Image] | None:
    if image.format != "PNG":
        return None
    fp.seek(0)
    header = fp.read(33)
    if len(header) < 33 or header[12:16] != b"IHDR":
        return None
    width, height, depth, colour, _, _, interlace = struct.unpack(">IIBBBBB", header[16:29])
    if depth != 8 or interlace != 0 or colour not in _STREAMED:
        return None
    return _png_strips(fp, width, height, colour)


def _chunks(fp: IO[bytes]) -> Iterator[bytes]:
    """The data of every IDAT chunk, checked against its CRC."""
    fp.seek(8)
    while True:
        head = fp.read(8)
        if len(head) < 8:
            raise OSError("the PNG ends before its last chunk")
        length, kind = struct.unpack(">I4s", head)
        data = fp.read(length)
        crc = fp.read(4)
        if len(data) < length or len(crc) < 4:
            raise OSError("the PNG is truncated")
        if zlib.crc32(kind + data) != struct.unpack(">I", crc)[0]:
            raise SyntaxError(f"broken PNG chunk {kind!r} (CRC mismatch)")
        if kind == b"IDAT":
            yield data
        elif kind == b"IEND":
            return


def _inflate(chunks: Iterator[bytes], limit: int = 1 << 20) -> Iterator[bytes]:
    inflater = zlib.decompressobj()
    try:
        for data in chunks:
            while data:
                out = inflater.decompress(data, limit)
                data = inflater.unconsumed_tail
                if out:
                    yield out
            while more := inflater.decompress(b"", limit):
                yield more
            if inflater.eof:
                return
    except zlib.error as exc:
        raise ValueError(f"the PNG pixel data is corrupt: {exc}") from None
    raise OSError("the PNG pixel data is truncated")


def _png_chunk(kind: bytes, data: bytes) -> bytes:
    return struct.pack(">I", len(data)) + kind + data + struct.pack(">I", zlib.crc32(kind + data))


def _png_strips(fp: IO[bytes], width: int, height: int, colour: int) -> Iterator[Image.Image]:
    import io

    mode, pixel_bytes = _STREAMED[colour]
    stride = 1 + width * pixel_bytes
    rows_per_strip = max(1, _BAND_PIXELS // width)
    stream = _inflate(_chunks(fp))
    pending = bytearray()
    previous: bytes | None = None
    for top in range(0, height, rows_per_strip):
        count = min(rows_per_strip, height - top)
        while len(pending) < count * stride:
            piece = next(stream, None)
            if piece is None:
                raise OSError("the PNG has fewer rows than its header says")
            pending += piece
        rows = bytes(pending[: count * stride])
        del pending[: count * stride]
        lead = 0 if previous is None else 1
        if previous is not None:
            rows = b"\x00" + previous + rows
        ihdr = struct.pack(">IIBBBBB", width, count + lead, 8, colour, 0, 0, 0)
        strip_png = b"".join(
            (
                b"\x89PNG\r\n\x1a\n",
                _png_chunk(b"IHDR", ihdr),
                _png_chunk(b"IDAT", zlib.compress(rows, 0)),
                _png_chunk(b"IEND", b""),
            )
        )
        del rows
        with Image.open(io.BytesIO(strip_png)) as strip:
            strip.load()
            previous = strip.crop((0, count + lead - 1, width, count + lead)).tobytes("raw", mode)
            yield strip.crop((0, lead, width, count + lead)) if lead else strip.copy()

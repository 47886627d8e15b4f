"""Turns untrusted bytes into a validated, content-addressed stored image; knows no HTTP."""

from __future__ import annotations

import hashlib
import io
import math
import re
import warnings
from pathlib import Path
from typing import Any

from PIL import ExifTags, Image, UnidentifiedImageError

from service.atomic import write_once
from service.decode import FORMATS, decode
from service.errors import InvalidInput, PayloadTooLarge, UnsupportedMedia
from service.store.queue import ImageRecord

# The service enforces its own pixel limit (AIP_MAX_PIXELS) from the header before anything is
# decoded; Pillow's built-in guard would refuse some images under that limit, mislabelled.
Image.MAX_IMAGE_PIXELS = None

_EXTENSIONS = {
    "JPEG": ".jpg",
    "PNG": ".png",
    "WEBP": ".webp",
    "TIFF": ".tif",
    "BMP": ".bmp",
    "GIF": ".gif",
    "MPO": ".jpg",
}
_READABLE = "JPEG, PNG, WebP, TIFF, BMP or GIF"


def _rational(value: Any) -> float:
    """A finite number from an EXIF rational; ValueError for 0/0, x/0 and anything else."""
    number = float(value[0]) / float(value[1]) if isinstance(value, tuple) else float(value)
    if not math.isfinite(number):
        raise ValueError(f"not a finite number: {value!r}")
    return number


def _gps(gps: dict[int, Any]) -> dict[str, float] | None:
    """Latitude, longitude (and altitude) in degrees and metres; None when any part is
    missing, not a number, or out of range, so a bad tag never reaches the stored job."""
    try:
        lat = sum(_rational(v) / 60**i for i, v in enumerate(gps[2]))
        lon = sum(_rational(v) / 60**i for i, v in enumerate(gps[4]))
    except (KeyError, TypeError, ValueError, ZeroDivisionError, OverflowError):
        return None
    if not (abs(lat) <= 90 and abs(lon) <= 180):
        return None
    if gps.get(1) in ("S", b"S"):
        lat = -lat
    if gps.get(3) in ("W", b"W"):
        lon = -lon
    out = {"latitude": round(lat, 7), "longitude": round(lon, 7)}
    if 6 in gps:
        try:
            altitude = _rational(gps[6])
            out["altitude"] = round(-altitude if gps.get(5) in (1, b"\x01") else altitude, 2)
        except (TypeError, ValueError, ZeroDivisionError, OverflowError):
            pass
    return out


def read_exif(image: Image.Image) -> dict[str, Any] | None:
    """The EXIF fields people search by: capture time, camera, orientation, GPS."""
    if image.format == "PNG" and "exif" not in image.info:
        return None  # an eXIf chunk after the pixels: Pillow would decode them all to find it
    exif = image.getexif()
    if not exif:
        return None
    ifd = exif.get_ifd(ExifTags.IFD.Exif)
    out: dict[str, Any] = {}
    taken = ifd.get(ExifTags.Base.DateTimeOriginal) or exif.get(ExifTags.Base.DateTime)
    for key, value in (
        ("captured_at", taken),
        ("make", exif.get(ExifTags.Base.Make)),
        ("model", exif.get(ExifTags.Base.Model)),
        ("orientation", exif.get(ExifTags.Base.Orientation)),
    ):
        if key == "orientation" and not (isinstance(value, int) and 1 <= value <= 8):
            continue
        if isinstance(value, bytes):
            value = value.decode(errors="replace")
        if isinstance(value, str):
            value = value.strip("\x00 ").strip()
        if value not in (None, ""):
            out[key] = value
    for key, tag in (
        ("focal_length", ExifTags.Base.FocalLength),
        ("focal_length_35mm", ExifTags.Base.FocalLengthIn35mmFilm),
    ):
        try:
            focal = _rational(ifd[tag])
        except (KeyError, TypeError, ValueError, ZeroDivisionError, OverflowError, IndexError):
            continue
        if focal > 0:
            out[key] = round(focal, 4)
    gps = _gps(dict(exif.get_ifd(ExifTags.IFD.GPSInfo)))
    if gps:
        out["gps"] = gps
    return out or None


_DJI_NAMES = {
    b"RelativeAltitude": "relative_altitude",
    b"AbsoluteAltitude": "absolute_altitude",
    b"GimbalPitchDegree": "gimbal_pitch",
    b"GimbalYawDegree": "gimbal_yaw",
    b"GimbalRollDegree": "gimbal_roll",
    b"FlightYawDegree": "flight_yaw",
    b"CalibratedFocalLength": "calibrated_focal_length",
    b"CalibratedOpticalCenterX": "calibrated_optical_center_x",
    b"CalibratedOpticalCenterY": "calibrated_optical_center_y",
    b"RtkFlag": "rtk_flag",
}
# Most models write `drone-dji:Name="+80.00"` attributes; some write `<drone-dji:Name>` elements.
_DJI = re.compile(
    rb"drone-dji:(" + b"|".join(_DJI_NAMES) + rb')\s*=\s*"\s*([-+0-9.]+)\s*"'
    rb"|<drone-dji:(" + b"|".join(_DJI_NAMES) + rb")>\s*([-+0-9.]+)\s*</drone-dji:"
)


def read_dji_xmp(data: bytes) -> dict[str, float] | None:
    """DJI drones write flight and gimbal attitude into an XMP packet near the file's start."""
    found = {}
    for attribute, attribute_value, element, element_value in _DJI.findall(data[: 512 * 1024]):
        name, value = (attribute, attribute_value) if attribute else (element, element_value)
        try:
            number = float(value)
        except ValueError:
            continue
        if math.isfinite(number):
            key = _DJI_NAMES[name]
            found[key] = int(number) if key == "rtk_flag" and number.is_integer() else number
    return found or None


def inspect_image(data: bytes, *, max_pixels: int) -> ImageRecord:
    """Validate fully (format, header, pixel count, every byte decodes) and describe the image
    as it will be seen upright (EXIF orientation applied). Decoding costs what the worker's
    decode costs: the pixels are reduced while they are read, never held twice."""
    if not data:
        raise InvalidInput("the image is empty (0 bytes)", code="empty_image")
    try:
        with warnings.catch_warnings():
            warnings.simplefilter("error", Image.DecompressionBombWarning)
            with Image.open(io.BytesIO(data), formats=FORMATS) as image:
                width, height = image.size
                if width * height > max_pixels:
                    raise PayloadTooLarge(
                        f"the image is {width}x{height} = {width * height:,} pixels; the limit "
                        f"is {max_pixels:,} (AIP_MAX_PIXELS)",
                        code="too_many_pixels",
                    )
                fmt = image.format or "unknown"
                exif = read_exif(image)
            dji = read_dji_xmp(data)
            if dji:
                exif = {**(exif or {}), "dji": dji}
            width, height = decode(io.BytesIO(data)).original_size
    except (UnidentifiedImageError, Image.DecompressionBombError, Image.DecompressionBombWarning):
        raise UnsupportedMedia(
            f"the file is not an image this service reads; send a {_READABLE} file",
            code="not_an_image",
        ) from None
    except (OSError, SyntaxError, ValueError, EOFError) as exc:
        raise InvalidInput(f"the image could not be decoded: {exc}", code="corrupt_image") from None
    sha = hashlib.sha256(data).hexdigest()
    path = f"images/{sha[:2]}/{sha}{_EXTENSIONS[fmt]}"
    return ImageRecord(
        sha256=sha,
        bytes=len(data),
        width=width,
        height=height,
        format=fmt,
        path=path,
        exif=exif,
    )


def store_image(data: bytes, record: ImageRecord, data_dir: Path) -> Path:
    """Write once, named by content; atomic so a crash never leaves a partial file."""
    target = data_dir / record.path
    write_once(target, data)
    return target


def open_stored(data_dir: Path, record_path: str) -> Image.Image:
    """A stored input at full size, upright RGB (for drawing on; the models take
    `open_for_models`)."""
    with (data_dir / record_path).open("rb") as f:
        return decode(f, max_side=None).image


def open_for_models(data_dir: Path, record_path: str) -> tuple[Image.Image, tuple[int, int]]:
    """A stored input decoded for inference: upright RGB no larger than the models use, and
    the original's upright size, which detections are mapped back to."""
    with (data_dir / record_path).open("rb") as f:
        decoded = decode(f)
    return decoded.image, decoded.original_size

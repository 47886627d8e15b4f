"""Turns untrusted bytes into a validated, content-addressed stored image; knows no HTTP."""

from __future__ import annotations

import hashlib
import io
import os
import re
import tempfile
import warnings
from pathlib import Path
from typing import Any

from PIL import ExifTags, Image, ImageOps, UnidentifiedImageError

from service.errors import Forbidden, InvalidInput, NotFound, PayloadTooLarge, UnsupportedMedia
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
    "HEIF": ".heic",
}


def _rational(value: Any) -> float:
    return float(value[0]) / float(value[1]) if isinstance(value, tuple) else float(value)


def _gps(gps: dict[int, Any]) -> dict[str, float] | None:
    try:
        lat = sum(_rational(v) / 60**i for i, v in enumerate(gps[2]))
        lon = sum(_rational(v) / 60**i for i, v in enumerate(gps[4]))
    except (KeyError, TypeError, ValueError, ZeroDivisionError):
        return None
    if gps.get(1) == "S":
        lat = -lat
    if gps.get(3) == "W":
        lon = -lon
    out = {"latitude": round(lat, 7), "longitude": round(lon, 7)}
    if 6 in gps:
        try:
            altitude = _rational(gps[6])
            out["altitude"] = round(-altitude if gps.get(5) in (1, b"\x01") else altitude, 2)
        except (TypeError, ValueError, ZeroDivisionError):
            pass
    return out


def read_exif(image: Image.Image) -> dict[str, Any] | None:
    """The EXIF fields people search by: capture time, camera, orientation, GPS."""
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
        if isinstance(value, bytes):
            value = value.decode(errors="replace")
        if isinstance(value, str):
            value = value.strip("\x00 ").strip()
        if value not in (None, ""):
            out[key] = value
    gps = _gps(dict(exif.get_ifd(ExifTags.IFD.GPSInfo)))
    if gps:
        out["gps"] = gps
    return out or None


_DJI = re.compile(
    rb"drone-dji:(RelativeAltitude|AbsoluteAltitude|GimbalPitchDegree|GimbalYawDegree|"
    rb'GimbalRollDegree|FlightYawDegree)\s*=\s*"([-+0-9.]+)"'
)
_DJI_NAMES = {
    b"RelativeAltitude": "relative_altitude",
    b"AbsoluteAltitude": "absolute_altitude",
    b"GimbalPitchDegree": "gimbal_pitch",
    b"GimbalYawDegree": "gimbal_yaw",
    b"GimbalRollDegree": "gimbal_roll",
    b"FlightYawDegree": "flight_yaw",
}


def read_dji_xmp(data: bytes) -> dict[str, float] | None:
    """DJI drones write flight and gimbal attitude into an XMP packet near the file's start."""
    found = {}
    for name, value in _DJI.findall(data[: 512 * 1024]):
        try:
            found[_DJI_NAMES[name]] = float(value)
        except ValueError:
            continue
    return found or None


def inspect_image(data: bytes, *, max_pixels: int) -> ImageRecord:
    """Validate fully (header, pixel count, every byte decodes) and describe the image as it
    will be seen upright (EXIF orientation applied)."""
    if not data:
        raise InvalidInput("the image is empty (0 bytes)", code="empty_image")
    try:
        with warnings.catch_warnings():
            warnings.simplefilter("error", Image.DecompressionBombWarning)
            image = Image.open(io.BytesIO(data))
            width, height = image.size
            if width * height > max_pixels:
                raise PayloadTooLarge(
                    f"the image is {width}x{height} = {width * height:,} pixels; the limit is "
                    f"{max_pixels:,} (AIP_MAX_PIXELS)",
                    code="too_many_pixels",
                )
            fmt = image.format or "unknown"
            exif = read_exif(image)
            dji = read_dji_xmp(data)
            if dji:
                exif = {**(exif or {}), "dji": dji}
            image.load()
            if exif and exif.get("orientation") in (5, 6, 7, 8):
                width, height = height, width
    except (UnidentifiedImageError, Image.DecompressionBombError, Image.DecompressionBombWarning):
        raise UnsupportedMedia(
            "the upload is not an image this service can read (JPEG, PNG, WebP, TIFF, BMP, GIF)",
            code="not_an_image",
        ) from None
    except (OSError, SyntaxError, ValueError, EOFError) as exc:
        raise InvalidInput(f"the image could not be decoded: {exc}", code="corrupt_image") from None
    sha = hashlib.sha256(data).hexdigest()
    path = f"images/{sha[:2]}/{sha}{_EXTENSIONS.get(fmt, '.img')}"
    record = ImageRecord(
        sha256=sha,
        bytes=len(data),
        width=width,
        height=height,
        format=fmt,
        path=path,
        exif=exif,
    )
    return record


def _to_rgb(image: Image.Image) -> Image.Image:
    """RGB for the models: palette and alpha over white, 16-bit scaled, CMYK converted."""
    if image.mode in ("I;16", "I;16B", "I;16L", "I"):
        import numpy as np

        array = np.asarray(image, dtype=np.float64)
        top = array.max() or 1.0
        image = Image.fromarray((array / top * 255.0).astype("uint8"), mode="L")
    if image.mode == "P":
        image = image.convert("RGBA")
    if image.mode in ("RGBA", "LA", "PA"):
        background = Image.new("RGB", image.size, (255, 255, 255))
        background.paste(image, mask=image.getchannel("A"))
        return background
    return image.convert("RGB")


def store_image(data: bytes, record: ImageRecord, data_dir: Path) -> Path:
    """Write once, named by content; atomic so a crash never leaves a partial file."""
    target = data_dir / record.path
    if target.exists() and target.stat().st_size == record.bytes:
        os.utime(target)  # fresh mtime: a retention run in progress will leave it alone
        return target
    target.parent.mkdir(parents=True, exist_ok=True)
    fd, tmp = tempfile.mkstemp(dir=target.parent, prefix=".incoming-")
    try:
        with os.fdopen(fd, "wb") as out:
            out.write(data)
            out.flush()
            os.fsync(out.fileno())
        os.replace(tmp, target)
    except BaseException:
        Path(tmp).unlink(missing_ok=True)
        raise
    return target


def open_stored(data_dir: Path, record_path: str) -> Image.Image:
    """Decode a stored input for inference: upright RGB, the same as at intake."""
    with Image.open(data_dir / record_path) as image:
        image.load()
        return _to_rgb(ImageOps.exif_transpose(image))


def confined_path(raw: str, allowed: tuple[Path, ...]) -> Path:
    """Resolve a path named by a client, refusing anything outside the allowed folders
    (after following symlinks, so neither `..` nor a link can escape)."""
    if not allowed:
        raise Forbidden(
            "path submissions are off: set AIP_ALLOWED_DIRS to the folders clients may name",
            code="path_not_allowed",
        )
    try:
        resolved = Path(raw).expanduser().resolve()
    except (OSError, ValueError) as exc:
        raise InvalidInput(f"not a usable path: {exc}", code="invalid_path") from None
    for folder in allowed:
        if resolved.is_relative_to(folder.expanduser().resolve()):
            try:
                if not resolved.is_file():
                    raise NotFound(f"no file at {raw}", code="file_not_found")
            except OSError as exc:
                raise InvalidInput(f"not a usable path: {exc}", code="invalid_path") from None
            return resolved
    raise Forbidden(
        f"{raw} is outside the folders this service may read (AIP_ALLOWED_DIRS)",
        code="path_not_allowed",
    )


def read_confined(path: Path, max_bytes: int) -> bytes:
    """Read a file `confined_path` resolved, refusing a symlink swapped in since then."""
    try:
        fd = os.open(path, os.O_RDONLY | getattr(os, "O_NOFOLLOW", 0))
    except OSError as exc:
        raise Forbidden(
            f"{path.name} could not be opened safely: {exc.strerror}", code="path_not_allowed"
        ) from None
    with os.fdopen(fd, "rb") as f:
        data = f.read(max_bytes + 1)
    if len(data) > max_bytes:
        raise PayloadTooLarge(f"{path.name} is larger than {max_bytes:,} bytes")
    return data

"""Intake of untrusted bytes: what is accepted, what is refused, and how it is described."""

from __future__ import annotations

import io
from pathlib import Path

import pytest
from PIL import Image

from service.errors import Forbidden, InvalidInput, PayloadTooLarge, UnsupportedMedia
from service.intake import confined_path, inspect_image, open_stored, store_image
from tests.conftest import make_image

LIMIT = 50_000_000


def test_a_jpeg_is_described_and_stored_by_content(tmp_path: Path) -> None:
    data = make_image(64, 48)
    record = inspect_image(data, max_pixels=LIMIT)
    assert (record.width, record.height, record.format, record.bytes) == (64, 48, "JPEG", len(data))
    path = store_image(data, record, tmp_path)
    assert path.read_bytes() == data
    assert record.sha256 in path.name and path == tmp_path / record.path
    assert store_image(data, record, tmp_path) == path  # same content, same file


@pytest.mark.parametrize(
    ("data", "error", "code"),
    [
        (b"", InvalidInput, "empty_image"),
        (b"hello, I am text renamed to .jpg", UnsupportedMedia, "not_an_image"),
        (make_image(200, 200)[:400], InvalidInput, "corrupt_image"),
    ],
    ids=["empty", "text", "truncated"],
)
def test_bad_bytes_are_refused_with_a_code(data: bytes, error: type, code: str) -> None:
    with pytest.raises(error) as caught:
        inspect_image(data, max_pixels=LIMIT)
    assert caught.value.code == code


def test_decompression_bomb_is_refused_before_decoding() -> None:
    data = make_image(4000, 4000, fmt="PNG")
    with pytest.raises(PayloadTooLarge) as caught:
        inspect_image(data, max_pixels=1_000_000)
    assert "16,000,000 pixels" in caught.value.message


@pytest.mark.parametrize("mode", ["CMYK", "P", "I;16", "LA", "RGBA", "L"])
def test_unusual_modes_are_accepted_and_decode_to_rgb(tmp_path: Path, mode: str) -> None:
    image = Image.new("RGB", (40, 30), (200, 10, 10)).convert(mode)
    fmt = "TIFF" if mode == "CMYK" else "PNG"
    buffer = io.BytesIO()
    image.save(buffer, format=fmt)
    data = buffer.getvalue()
    record = inspect_image(data, max_pixels=LIMIT)
    store_image(data, record, tmp_path)
    decoded = open_stored(tmp_path, record.path)
    assert decoded.mode == "RGB" and decoded.size == (40, 30)


def test_exif_rotation_is_applied_and_gps_read(tmp_path: Path) -> None:
    image = Image.new("RGB", (60, 20), (0, 0, 0))
    exif = Image.Exif()
    exif[0x0112] = 6  # rotate 90° clockwise to view
    exif[0x010F] = "DJI"
    gps = {1: "N", 2: (46.0, 30.0, 0.0), 3: "W", 4: (7.0, 15.0, 0.0), 5: 0, 6: 120.5}
    exif[0x8825] = gps
    buffer = io.BytesIO()
    image.save(buffer, format="JPEG", exif=exif)
    data = buffer.getvalue()
    record = inspect_image(data, max_pixels=LIMIT)
    assert (record.width, record.height) == (20, 60)
    assert record.exif is not None
    assert record.exif["make"] == "DJI" and record.exif["orientation"] == 6
    assert record.exif["gps"] == {"latitude": 46.5, "longitude": -7.25, "altitude": 120.5}
    store_image(data, record, tmp_path)
    assert open_stored(tmp_path, record.path).size == (20, 60)


def test_paths_are_confined_to_allowed_folders(tmp_path: Path) -> None:
    allowed = tmp_path / "allowed"
    allowed.mkdir()
    (allowed / "a.jpg").write_bytes(make_image())
    outside = tmp_path / "secret.jpg"
    outside.write_bytes(make_image())
    (allowed / "link.jpg").symlink_to(outside)
    assert confined_path(str(allowed / "a.jpg"), (allowed,)) == (allowed / "a.jpg").resolve()
    for escape in (str(allowed / ".." / "secret.jpg"), str(allowed / "link.jpg"), str(outside)):
        with pytest.raises(Forbidden):
            confined_path(escape, (allowed,))
    with pytest.raises(Forbidden):
        confined_path(str(allowed / "a.jpg"), ())


def test_the_pixel_limit_is_ours_not_pillows() -> None:
    def bitmap(width: int, height: int) -> bytes:
        buffer = io.BytesIO()
        Image.new("1", (width, height)).save(buffer, format="PNG")
        return buffer.getvalue()

    # 90 M pixels: over Pillow's own warning threshold, under the configured limit.
    assert inspect_image(bitmap(10_000, 9_000), max_pixels=100_000_000).width == 10_000
    # Over twice Pillow's threshold: still our 413 with the numbers, not "not an image".
    with pytest.raises(PayloadTooLarge) as caught:
        inspect_image(bitmap(20_000, 9_500), max_pixels=100_000_000)
    assert caught.value.code == "too_many_pixels"


def test_unusable_paths_are_a_clear_refusal(tmp_path: Path) -> None:
    with pytest.raises(InvalidInput):
        confined_path("frame\x00.jpg", (tmp_path,))
    with pytest.raises(InvalidInput):
        confined_path(str(tmp_path / ("x" * 300 + ".jpg")), (tmp_path,))

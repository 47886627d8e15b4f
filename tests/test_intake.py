"""Intake of untrusted bytes: what is accepted, what is refused, and how it is described."""

from __future__ import annotations

import io
import json
import sqlite3
from collections.abc import Callable
from pathlib import Path
from typing import Any

import numpy as np
import pytest
from PIL import Image
from PIL.TiffImagePlugin import IFDRational
from pycocotools import mask as coco_mask

from service.config import Settings
from service.decode import WORKING_SIDE, decode
from service.detection import Detection, encode_mask
from service.errors import AipError, InvalidInput, PayloadTooLarge, UnsupportedMedia
from service.exports import _coco_rle
from service.intake import (
    _gps,
    inspect_image,
    open_for_models,
    open_stored,
    read_dji_xmp,
    store_image,
)
from service.pipeline import to_original
from tests.conftest import RunningService, make_image
from tests.geo_frames import dji_jpeg

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
def test_bad_bytes_are_refused_with_a_code(data: bytes, error: type[AipError], code: str) -> None:
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


# -- decoding for the models: upright 8-bit RGB at a bounded size ------------------------------

WIDE = (4200, 90)  # longest side over 2 x 2048: reduced by 3 to 1400 x 30


def _halves(mode: str, left: Any, right: Any, size: tuple[int, int] = WIDE) -> Image.Image:
    image = Image.new(mode, size, left)
    image.paste(right, (size[0] // 2, 0, size[0], size[1]))
    return image


def _encoded(image: Image.Image, fmt: str, **save: Any) -> bytes:
    buffer = io.BytesIO()
    image.save(buffer, format=fmt, **save)
    return buffer.getvalue()


def _palette_with_transparency() -> Image.Image:
    image = _halves("P", 0, 1)
    image.putpalette([0, 0, 0, 255, 0, 0] + [0] * 762)
    image.info["transparency"] = 0
    return image


CASES = {
    # name: (encoded file, colour expected on the left, on the right)
    "16-bit grey (brightest becomes white)": (
        _encoded(_halves("I;16", 0, 1000), "PNG"),
        (0, 0, 0),
        (255, 255, 255),
    ),
    "palette with a transparent index": (
        _encoded(_palette_with_transparency(), "PNG"),
        (255, 255, 255),
        (255, 0, 0),
    ),
    "CMYK TIFF": (
        _encoded(_halves("CMYK", (0, 0, 0, 0), (0, 255, 255, 0)), "TIFF"),
        (255, 255, 255),
        (255, 0, 0),
    ),
    "CMYK JPEG": (
        _encoded(_halves("CMYK", (0, 0, 0, 0), (0, 255, 255, 0)), "JPEG", quality=95),
        (255, 255, 255),
        (255, 0, 0),
    ),
    "RGBA over white": (
        _encoded(_halves("RGBA", (0, 0, 0, 0), (0, 0, 255, 255)), "PNG"),
        (255, 255, 255),
        (0, 0, 255),
    ),
    "grey and alpha": (
        _encoded(_halves("LA", (0, 0), (0, 255)), "PNG"),
        (255, 255, 255),
        (0, 0, 0),
    ),
    "RGB JPEG": (
        _encoded(_halves("RGB", (255, 0, 0), (0, 0, 255)), "JPEG", quality=95),
        (255, 0, 0),
        (0, 0, 255),
    ),
    "small RGB PNG, not reduced": (
        _encoded(_halves("RGB", (255, 0, 0), (0, 0, 255), (64, 32)), "PNG"),
        (255, 0, 0),
        (0, 0, 255),
    ),
}


@pytest.mark.parametrize("name", list(CASES))
def test_each_kind_of_image_decodes_to_rgb_at_a_bounded_size(tmp_path: Path, name: str) -> None:
    data, left, right = CASES[name]
    record = inspect_image(data, max_pixels=LIMIT)
    store_image(data, record, tmp_path)
    width, height = Image.open(io.BytesIO(data)).size
    assert (record.width, record.height) == (width, height)
    image, original = open_for_models(tmp_path, record.path)
    assert original == (width, height)
    assert image.mode == "RGB"
    if max(width, height) <= WORKING_SIDE:
        assert image.size == (width, height)
    else:  # reduced by a whole factor (JPEG: partly while decoding) to over half the bound
        assert WORKING_SIDE // 2 < max(image.size) <= WORKING_SIDE
        factor = round(width / image.width)
        assert image.size == (-(-width // factor), -(-height // factor))
    y = image.height // 2
    for x, expected in ((image.width // 8, left), (image.width * 7 // 8, right)):
        pixel = image.getpixel((x, y))
        assert isinstance(pixel, tuple)
        assert max(abs(a - b) for a, b in zip(pixel, expected, strict=True)) <= 12, (x, pixel)
    assert open_stored(tmp_path, record.path).size == (width, height)  # drawing: full size


def test_exif_rotation_is_applied_to_the_reduced_image(tmp_path: Path) -> None:
    exif = Image.Exif()
    exif[0x0112] = 6  # stored sideways: view it turned 90° clockwise
    data = _encoded(_halves("RGB", (255, 0, 0), (0, 0, 255)), "JPEG", quality=95, exif=exif)
    record = inspect_image(data, max_pixels=LIMIT)
    assert (record.width, record.height) == (90, 4200)
    store_image(data, record, tmp_path)
    image, original = open_for_models(tmp_path, record.path)
    assert original == (90, 4200)
    assert image.size == (23, 1050)  # JPEG: decoded at 1/2 scale, then reduced by 2
    top, bottom = image.getpixel((11, 100)), image.getpixel((11, 950))
    assert isinstance(top, tuple) and isinstance(bottom, tuple)
    assert top[0] > 200 > top[2] and bottom[2] > 200 > bottom[0]  # the stored left is on top


@pytest.mark.parametrize("mode", ["RGB", "RGBA"])
def test_a_png_decoded_by_strips_equals_the_whole_image_reduced(mode: str) -> None:
    """PNG row filters reach into the previous row: strips must join without a seam."""
    rng = np.random.default_rng(3)
    noise = rng.integers(0, 256, (1300, 2100, len(mode)), dtype=np.uint8)
    noise[:, :1000] //= 8  # smooth and noisy regions, so the encoder picks varied filters
    data = _encoded(Image.fromarray(noise, mode=mode), "PNG")
    whole = Image.open(io.BytesIO(data))
    whole.load()
    flat = Image.new("RGB", whole.size, (255, 255, 255))
    flat.paste(whole, mask=whole.getchannel("A") if mode == "RGBA" else None)
    expected = np.asarray(flat.reduce(2))
    got = np.asarray(decode(io.BytesIO(data)).image)
    assert got.shape == expected.shape and np.array_equal(got, expected)


def test_a_truncated_png_is_refused_as_corrupt() -> None:
    data = _encoded(Image.fromarray(np.full((1300, 2100, 3), 7, np.uint8)), "PNG")
    with pytest.raises(InvalidInput) as caught:
        inspect_image(data[: len(data) // 2], max_pixels=LIMIT)
    assert caught.value.code == "corrupt_image"


class _CentreDetector:
    """Finds one object covering the middle half of whatever image it is given."""

    def __init__(self) -> None:
        self.seen: list[tuple[int, int]] = []

    def detect(self, image: Image.Image, query: str, **_: Any) -> list[Detection]:
        self.seen.append(image.size)
        return [Detection.from_center_size(query, (0.5, 0.5), (0.5, 0.5), image.size)]


def test_boxes_found_on_the_reduced_image_are_in_original_pixels(
    settings: Settings, serve: Callable[..., RunningService], monkeypatch: pytest.MonkeyPatch
) -> None:
    service = serve(settings)
    detector = _CentreDetector()
    monkeypatch.setattr(service.services.host.roles["detector"], "runtime", detector)
    exif = Image.Exif()
    exif[0x0112] = 6
    data = _encoded(_halves("RGB", (255, 0, 0), (0, 0, 255)), "JPEG", exif=exif)
    response = service.submit(data, queries="roof", tiling="off")  # the reduced image alone
    assert response.status_code == 202, response.text
    job = service.wait(response.json()["id"])
    assert job["status"] == "succeeded", job["error"]
    assert detector.seen == [(23, 1050)]
    (found,) = job["result"]["detections"]
    assert found["box"] == [22.5, 1050.0, 67.5, 3150.0]  # of the upright 90 x 4200 original
    assert found["box_normalized"] == [0.25, 0.25, 0.75, 0.75]


def test_to_original_scales_boxes_and_keeps_masks() -> None:
    mask = {"size": [30, 1400], "counts": [3, 4]}
    small = Detection("car", (10.0, 3.0, 20.0, 6.0), (1400, 30), mask)
    (big,) = to_original([small], (4200, 90))
    assert big.box == (30.0, 9.0, 60.0, 18.0) and big.image_size == (4200, 90)
    assert big.mask == mask
    assert to_original([small], (1400, 30)) == [small]


# -- formats: exactly the README's list ---------------------------------------------------------


@pytest.mark.parametrize("fmt", ["PPM", "ICO", "TGA", "PCX", "EPS"])
def test_formats_outside_the_list_are_refused_with_the_list(fmt: str) -> None:
    image = Image.new("RGB", (32, 32), (9, 9, 9))
    if fmt == "EPS":
        data = b"%!PS-Adobe-3.0 EPSF-3.0\n%%BoundingBox: 0 0 32 32\n"
    else:
        data = _encoded(image, fmt)
    with pytest.raises(UnsupportedMedia) as caught:
        inspect_image(data, max_pixels=LIMIT)
    message = caught.value.message
    assert caught.value.code == "not_an_image" and "upload" not in message
    assert all(name in message for name in ("JPEG", "PNG", "WebP", "TIFF", "BMP", "GIF"))


@pytest.mark.parametrize("fmt", ["JPEG", "PNG", "WEBP", "TIFF", "BMP", "GIF"])
def test_every_listed_format_is_accepted(fmt: str) -> None:
    assert inspect_image(make_image(48, 32, fmt=fmt), max_pixels=LIMIT).format == fmt


def test_an_mpo_is_accepted_as_a_jpeg(tmp_path: Path) -> None:
    frames = [Image.new("RGB", (40, 30), c) for c in ((200, 0, 0), (0, 200, 0))]
    data = _encoded(frames[0], "MPO", save_all=True, append_images=frames[1:])
    record = inspect_image(data, max_pixels=LIMIT)
    assert record.format == "MPO" and record.path.endswith(".jpg")


# -- EXIF: only finite, plausible values are kept -----------------------------------------------


def _jpeg_with_broken_gps() -> bytes:
    exif = Image.Exif()
    exif[0x010F] = "DJI"
    exif[0x8825] = {
        1: "N",
        2: (IFDRational(46, 0), IFDRational(0, 0), IFDRational(0, 1)),
        3: "W",
        4: (IFDRational(7, 1), IFDRational(15, 1), IFDRational(0, 1)),
        5: 0,
        6: IFDRational(1, 0),
    }
    return _encoded(Image.new("RGB", (64, 48), (50, 90, 20)), "JPEG", exif=exif)


def test_gps_with_zero_denominators_is_dropped() -> None:
    record = inspect_image(_jpeg_with_broken_gps(), max_pixels=LIMIT)
    assert record.exif == {"make": "DJI"}
    json.dumps(record.exif, allow_nan=False)


@pytest.mark.parametrize(
    ("gps", "expected"),
    [
        ({1: "N", 2: (91.0, 0.0, 0.0), 3: "E", 4: (7.0, 0.0, 0.0)}, None),  # latitude > 90
        ({1: "N", 2: (46.0, 0.0, 0.0), 3: "E", 4: (7.0, 0.0, float("inf"))}, None),
        ({1: "N", 2: (46.0,), 3: "E", 4: "east"}, None),
        (
            {1: "S", 2: (46.0, 30.0, 0.0), 3: "E", 4: (7.0, 0.0, 0.0), 6: float("nan")},
            {"latitude": -46.5, "longitude": 7.0},
        ),
    ],
    ids=["out-of-range", "infinite", "not-numbers", "nan-altitude"],
)
def test_implausible_gps_values_never_reach_the_record(
    gps: dict[int, Any], expected: dict[str, float] | None
) -> None:
    assert _gps(gps) == expected


def test_dji_values_that_are_not_finite_are_dropped() -> None:
    packet = b'drone-dji:RelativeAltitude="' + b"9" * 400 + b'" drone-dji:GimbalYawDegree="-12.5"'
    assert read_dji_xmp(packet) == {"gimbal_yaw": -12.5}


def _strict(text: str) -> Any:
    def refuse(name: str) -> None:
        raise ValueError(f"{name} in an export")

    return json.loads(text, parse_constant=refuse)


def test_a_jpeg_with_broken_gps_is_accepted_and_exports_stay_strict_json(
    settings: Settings, serve: Callable[..., RunningService]
) -> None:
    service = serve(settings)
    response = service.submit(_jpeg_with_broken_gps())
    assert response.status_code == 202, response.text
    job_id = response.json()["id"]
    assert response.json()["input"]["exif"] == {"make": "DJI"}
    # A row an older version stored, NaN and all, next to a valid one.
    other = service.submit(make_image(40, 30)).json()["id"]
    db = sqlite3.connect(settings.database)
    db.execute(
        "UPDATE images SET exif = ? WHERE sha256 = (SELECT image_sha256 FROM jobs WHERE id = ?)",
        ('{"gps": {"latitude": NaN, "longitude": 7.0, "altitude": Infinity}}', other),
    )
    db.commit()
    db.close()
    lines = service.client.get("/v1/exports/jobs.jsonl").text.splitlines()
    jobs = {job["id"]: job for job in map(_strict, lines)}
    assert jobs[job_id]["input"]["exif"] == {"make": "DJI"}
    assert jobs[other]["input"]["exif"] == {"gps": {"longitude": 7.0}}
    collection = _strict(service.client.get("/v1/exports/jobs.geojson").text)
    assert collection["features"] == []  # neither job has a usable position
    _strict(service.client.get("/v1/exports/jobs.coco").text)
    assert "nan" not in service.client.get("/v1/exports/jobs.csv").text.lower()
    shown = service.client.get(f"/v1/jobs/{other}")  # the job itself, not only the exports
    assert shown.status_code == 200 and _strict(shown.text)["input"]["exif"]["gps"] == {
        "longitude": 7.0
    }


@pytest.mark.parametrize(
    ("mask_size", "image_size"),
    [((30, 40), (30, 40)), ((30, 40), (95, 121)), ((50, 20), (200, 80)), ((7, 5), (3, 2))],
)
def test_coco_masks_are_scaled_to_the_original_image(
    mask_size: tuple[int, int], image_size: tuple[int, int]
) -> None:
    """Masks come from the reduced image; COCO readers need them at the image's size."""
    small = np.random.default_rng(1).random(mask_size) < 0.3
    small[:, :2] = True
    height, width = image_size
    rle = _coco_rle(encode_mask(small), width, height)
    rows = ((np.arange(height) + 0.5) * mask_size[0] / height).astype(int)  # nearest pixel
    cols = ((np.arange(width) + 0.5) * mask_size[1] / width).astype(int)
    expected = small[rows][:, cols]
    decoded = coco_mask.decode(coco_mask.frPyObjects(rle, height, width)).astype(bool)
    assert decoded.shape == (height, width) and np.array_equal(decoded, expected)


# -- camera metadata for georeferencing (issue 16) ---------------------------------------------


def test_focal_lengths_are_read_only_when_they_are_numbers() -> None:
    frame = {"lat": 46.5, "lon": 7.25, "relative_altitude": 80.0}
    exif = inspect_image(dji_jpeg(**frame), max_pixels=LIMIT).exif
    assert exif is not None
    assert (exif["focal_length"], exif["focal_length_35mm"]) == (8.8, 24.0)
    bare = inspect_image(
        dji_jpeg(**frame, focal_length=None, focal_length_35mm=0), max_pixels=LIMIT
    ).exif
    assert bare is not None and "focal_length" not in bare and "focal_length_35mm" not in bare


@pytest.mark.parametrize("element_form", [False, True], ids=["attributes", "elements"])
def test_dji_calibration_and_rtk_are_read_in_either_xmp_form(element_form: bool) -> None:
    data = dji_jpeg(
        lat=46.5,
        lon=7.25,
        relative_altitude=80.0,
        absolute_altitude=433.79,
        gimbal_pitch=-89.9,
        gimbal_yaw=-3.4,
        flight_yaw=-1.1,
        calibrated=(3666.666504, 2736.0, 1824.0),
        rtk_flag=50,
        element_form=element_form,
    )
    assert read_dji_xmp(data) == {
        "absolute_altitude": 433.79,
        "relative_altitude": 80.0,
        "gimbal_roll": 0.0,
        "gimbal_yaw": -3.4,
        "gimbal_pitch": -89.9,
        "flight_yaw": -1.1,
        "calibrated_focal_length": 3666.666504,
        "calibrated_optical_center_x": 2736.0,
        "calibrated_optical_center_y": 1824.0,
        "rtk_flag": 50,
    }

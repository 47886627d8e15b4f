"""Synthetic drone frames for the geo tests: real JPEGs with EXIF, GPS and a DJI XMP packet."""

from __future__ import annotations

import io
from collections.abc import Sequence

import pymap3d
from PIL import ExifTags, Image, ImageDraw

Box = Sequence[float]
Color = tuple[int, int, int]


def _dms(value: float) -> tuple[float, float, float]:
    value = abs(value)
    degrees = int(value)
    minutes = int((value - degrees) * 60)
    seconds = (value - degrees - minutes / 60) * 3600
    return (float(degrees), float(minutes), round(seconds, 6))


def _signed(value: float) -> str:
    return f"{value:+.2f}"


def dji_xmp(values: dict[str, str], *, element_form: bool = False) -> bytes:
    """An XMP packet laid out as DJI cameras write it: `drone-dji:Name="+80.00"` attributes on
    rdf:Description (or, as some models do, `<drone-dji:Name>+80.00</drone-dji:Name>` elements)."""
    if element_form:
        attributes = ""
        elements = "".join(f"   <drone-dji:{k}>{v}</drone-dji:{k}>\n" for k, v in values.items())
    else:
        attributes = "".join(f'\n   drone-dji:{k}="{v}"' for k, v in values.items())
        elements = ""
    text = (
        '<?xpacket begin="\ufeff" id="W5M0MpCehiHzreSzNTczkc9d"?>\n'
        '<x:xmpmeta xmlns:x="adobe:ns:meta/">\n'
        ' <rdf:RDF xmlns:rdf="http://www.w3.org/1999/02/22-rdf-syntax-ns#">\n'
        '  <rdf:Description rdf:about="DJI Meta Data"\n'
        '   xmlns:tiff="http://ns.adobe.com/tiff/1.0/"\n'
        '   xmlns:dc="http://purl.org/dc/elements/1.1/"\n'
        '   xmlns:drone-dji="http://www.dji.com/drone-dji/1.0/"\n'
        '   tiff:Make="DJI"\n'
        f'   dc:format="image/jpg"{attributes}>\n'
        f"{elements}"
        "  </rdf:Description>\n"
        " </rdf:RDF>\n"
        "</x:xmpmeta>\n"
        '<?xpacket end="w"?>'
    )
    return text.encode()


def dji_jpeg(
    width: int = 800,
    height: int = 600,
    *,
    lat: float,
    lon: float,
    relative_altitude: float | None,
    absolute_altitude: float | None = None,
    gimbal_pitch: float | None = -90.0,
    gimbal_yaw: float | None = 0.0,
    gimbal_roll: float | None = 0.0,
    flight_yaw: float | None = None,
    focal_length: float | None = 8.8,
    focal_length_35mm: float | None = 24.0,
    make: str = "DJI",
    model: str = "FC6310",
    captured_at: str = "2026:11:23 08:00:05",
    calibrated: tuple[float, float, float] | None = None,
    rtk_flag: int | None = None,
    orientation: int | None = None,
    gps_altitude: float | None = None,
    element_form: bool = False,
    xmp: bool = True,
    color: Color = (90, 120, 90),
    draw: Sequence[tuple[Box, Color]] | None = None,
) -> bytes:
    """A JPEG as a DJI drone writes it. `width` x `height` and the `draw` boxes are in pixels of
    the sensor image as stored (before any EXIF `orientation` is applied by a viewer). The GPS
    altitude defaults to the absolute altitude. `None` leaves a tag or XMP value out."""
    image = Image.new("RGB", (width, height), color)
    painter = ImageDraw.Draw(image)
    for box, fill in draw or ():
        x1, y1, x2, y2 = box
        painter.rectangle((x1, y1, x2 - 1, y2 - 1), fill=fill)

    exif = Image.Exif()
    exif[ExifTags.Base.Make] = make
    exif[ExifTags.Base.Model] = model
    if orientation is not None:
        exif[ExifTags.Base.Orientation] = orientation
    details: dict[int, object] = {ExifTags.Base.DateTimeOriginal: captured_at}
    if focal_length is not None:
        details[ExifTags.Base.FocalLength] = float(focal_length)
    if focal_length_35mm is not None:
        details[ExifTags.Base.FocalLengthIn35mmFilm] = round(focal_length_35mm)
    exif[ExifTags.IFD.Exif] = details
    altitude = absolute_altitude if gps_altitude is None else gps_altitude
    gps: dict[int, object] = {
        ExifTags.GPS.GPSVersionID: b"\x02\x03\x00\x00",
        ExifTags.GPS.GPSLatitudeRef: "N" if lat >= 0 else "S",
        ExifTags.GPS.GPSLatitude: _dms(lat),
        ExifTags.GPS.GPSLongitudeRef: "E" if lon >= 0 else "W",
        ExifTags.GPS.GPSLongitude: _dms(lon),
    }
    if altitude is not None:
        gps[ExifTags.GPS.GPSAltitudeRef] = 1 if altitude < 0 else 0
        gps[ExifTags.GPS.GPSAltitude] = abs(float(altitude))
    exif[ExifTags.IFD.GPSInfo] = gps

    values: dict[str, str] = {}
    for name, value in (
        ("AbsoluteAltitude", absolute_altitude),
        ("RelativeAltitude", relative_altitude),
        ("GimbalRollDegree", gimbal_roll),
        ("GimbalYawDegree", gimbal_yaw),
        ("GimbalPitchDegree", gimbal_pitch),
        ("FlightYawDegree", gimbal_yaw if flight_yaw is None else flight_yaw),
    ):
        if value is not None:
            values[name] = _signed(value)
    if calibrated is not None:
        focal_px, cx, cy = calibrated
        values["CalibratedFocalLength"] = f"{focal_px:.6f}"
        values["CalibratedOpticalCenterX"] = f"{cx:.6f}"
        values["CalibratedOpticalCenterY"] = f"{cy:.6f}"
    if rtk_flag is not None:
        values["RtkFlag"] = str(rtk_flag)

    save: dict[str, object] = {"exif": exif, "quality": 90}
    if xmp:
        save["xmp"] = dji_xmp(values, element_form=element_form)
    buffer = io.BytesIO()
    image.save(buffer, format="JPEG", **save)
    return buffer.getvalue()


def no_pose_jpeg(width: int = 800, height: int = 600, *, model: str = "FC6310") -> bytes:
    """A DJI-like JPEG with camera tags but no GPS and no XMP: nothing to place it with."""
    image = Image.new("RGB", (width, height), (90, 120, 90))
    exif = Image.Exif()
    exif[ExifTags.Base.Make] = "DJI"
    exif[ExifTags.Base.Model] = model
    exif[ExifTags.IFD.Exif] = {
        ExifTags.Base.DateTimeOriginal: "2026:11:23 08:00:05",
        ExifTags.Base.FocalLength: 8.8,
        ExifTags.Base.FocalLengthIn35mmFilm: 24,
    }
    buffer = io.BytesIO()
    image.save(buffer, format="JPEG", exif=exif, quality=90)
    return buffer.getvalue()


def lonlat(east: float, north: float, origin: tuple[float, float]) -> list[float]:
    """[lon, lat] of a point `east`, `north` metres from `origin` (lat, lon) on the ellipsoid."""
    lat, lon, _ = pymap3d.enu2geodetic(east, north, 0.0, *origin, 0.0)
    return [float(lon), float(lat)]


def square(
    east: float, north: float, side: float, origin: tuple[float, float]
) -> list[list[float]]:
    """A closed footprint ring of a side x side metre square centred at east/north."""
    h = side / 2
    corners = [(-h, -h), (h, -h), (h, h), (-h, h), (-h, -h)]
    return [lonlat(east + dx, north + dy, origin) for dx, dy in corners]

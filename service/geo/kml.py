"""KML 2.2 for Google Earth and QGIS from the exports' GeoJSON features: one Folder per kind."""

from __future__ import annotations

import json
import math
import re
import tempfile
from collections.abc import AsyncIterator
from typing import Any
from xml.sax.saxutils import escape, quoteattr

MEDIA_TYPE = "application/vnd.google-earth.kml+xml"
# Folder titles in the order written. A reader such as QGIS makes a layer of each Folder, so
# the features are grouped by kind, not by job.
FOLDERS = {"frame": "Frames", "footprint": "Footprints", "detection": "Detections"}

# What XML 1.0 cannot hold at all, escaped or not: most C0 controls, lone surrogates and the
# two non-characters U+FFFE/U+FFFF. Names and labels are user text.
_FORBIDDEN = re.compile("[^\t\n\r\x20-\ud7ff\ue000-\ufffd\U00010000-\U0010ffff]")
# KML colours are aabbggrr.
_STYLES = (
    '<Style id="frame"><IconStyle><color>ffffc000</color><scale>0.8</scale></IconStyle>'
    "<LabelStyle><scale>0.7</scale></LabelStyle></Style>"
    '<Style id="footprint"><LineStyle><color>ffffc000</color><width>1</width></LineStyle>'
    "<PolyStyle><color>22ffc000</color></PolyStyle></Style>"
    '<Style id="detection"><LineStyle><color>ff0000ff</color><width>2</width></LineStyle>'
    "<PolyStyle><color>550000ff</color></PolyStyle>"
    "<IconStyle><color>ff0000ff</color></IconStyle></Style>"
)
_compact = json.JSONEncoder(allow_nan=False, ensure_ascii=False, separators=(",", ":")).encode


def text(value: Any) -> str:
    """Any property value as escaped XML character data; text XML 1.0 forbids is dropped."""
    if value is None:
        return ""
    if isinstance(value, bool):
        shown = "true" if value else "false"
    elif isinstance(value, str):
        shown = value
    elif isinstance(value, int | float):
        shown = str(value)
    else:
        shown = _compact(value)
    # A carriage return as a reference: a parser turns a literal one into a line feed.
    return escape(_FORBIDDEN.sub("", shown), {"\r": "&#13;"})


def _number(value: float) -> str:
    """A coordinate without an exponent (1e-05 is not a number every KML reader takes)."""
    return f"{value:.9f}".rstrip("0").rstrip(".")


def _coordinates(positions: list[list[float]]) -> str:
    return " ".join(",".join(_number(c) for c in position) for position in positions)


def geometry(shape: dict[str, Any]) -> str:
    """A GeoJSON Point or Polygon (exterior ring only) as KML, draped on the ground."""
    if shape["type"] == "Point":
        return (
            "<Point><altitudeMode>clampToGround</altitudeMode>"
            f"<coordinates>{_coordinates([shape['coordinates']])}</coordinates></Point>"
        )
    if shape["type"] == "Polygon":
        ring = _coordinates(shape["coordinates"][0])
        return (
            "<Polygon><tessellate>1</tessellate><altitudeMode>clampToGround</altitudeMode>"
            f"<outerBoundaryIs><LinearRing><coordinates>{ring}</coordinates></LinearRing>"
            "</outerBoundaryIs></Polygon>"
        )
    raise ValueError(f"no KML for a GeoJSON {shape['type']}")


def _metres(value: Any, unit: str = "m") -> str | None:
    if isinstance(value, int | float) and math.isfinite(value):
        return f"{value:.1f} {unit}"
    return None


def name_of(properties: dict[str, Any]) -> str:
    """A placemark's name: the image's for a frame, "label #number" for a detection."""
    kind = properties["kind"]
    if kind == "detection":
        return f"{properties['label']} #{properties['number']}"
    if kind == "footprint":
        return f"{properties['name']} footprint"
    return str(properties["name"])


def description_of(properties: dict[str, Any]) -> str:
    """A line of plain text a reader shows in the placemark's balloon."""
    job = f"job {properties['job_id']}"
    if properties["kind"] != "detection":
        gsd = properties.get("gsd_cm")
        parts = [job, properties.get("name"), properties.get("captured_at")]
        if isinstance(gsd, int | float):
            parts.append(f"{gsd:.2f} cm per pixel")
        return ", ".join(str(p) for p in parts if p)
    width, height = _metres(properties.get("width_m")), _metres(properties.get("height_m"))
    if width and height:
        area = _metres(properties.get("area_m2"), "m²")
        size = f"{width} × {height}" + (f", {area}" if area else "")
    else:
        size = "size unknown: part of the box is above the horizon"
    said = [size]
    if error := _metres(properties.get("uncertainty_m")):
        said.append(f"position ± {error}")
    if distance := _metres(properties.get("distance_m")):
        said.append(f"{distance} from the camera")
    return "; ".join([*said, job])


def placemark(feature: dict[str, Any]) -> str:
    """One GeoJSON feature of the exports (properties with a `kind`) as a KML Placemark, its
    properties as ExtendedData."""
    properties = feature["properties"]
    data = "".join(
        f"<Data name={quoteattr(key)}><value>{text(value)}</value></Data>"
        for key, value in properties.items()
    )
    return (
        f"<Placemark><name>{text(name_of(properties))}</name>"
        f"<description>{text(description_of(properties))}</description>"
        f"<styleUrl>#{properties['kind']}</styleUrl>"
        f"<ExtendedData>{data}</ExtendedData>{geometry(feature['geometry'])}</Placemark>\n"
    )


def _spool() -> tempfile.SpooledTemporaryFile[str]:
    # UTF-8 whatever the locale, and text read back as written.
    return tempfile.SpooledTemporaryFile(
        max_size=8 * 1024 * 1024, mode="w+", encoding="utf-8", newline=""
    )


async def document(
    pages: AsyncIterator[list[dict[str, Any]]], title: str = "aip export"
) -> AsyncIterator[str]:
    """A KML Document over pages of features, a chunk per page: frames are written as they
    come, footprints and detections wait in temporary files for their Folders."""
    yield (
        '<?xml version="1.0" encoding="UTF-8"?>\n<kml xmlns="http://www.opengis.net/kml/2.2">'
        f"<Document><name>{text(title)}</name>{_STYLES}\n"
        f"<Folder><name>{FOLDERS['frame']}</name>\n"
    )
    with (
        _spool() as footprints,
        _spool() as detections,
    ):
        spools = {"footprint": footprints, "detection": detections}
        async for page in pages:
            frames = []
            for feature in page:
                kind = feature["properties"]["kind"]
                if kind == "frame":
                    frames.append(placemark(feature))
                else:
                    spools[kind].write(placemark(feature))
            if frames:
                yield "".join(frames)
        yield "</Folder>\n"
        for kind, spool in spools.items():
            yield f"<Folder><name>{FOLDERS[kind]}</name>\n"
            spool.seek(0)
            while chunk := spool.read(64 * 1024):
                yield chunk
            yield "</Folder>\n"
    yield "</Document></kml>\n"

"""Exports with geometry read back by their reference readers: GeoJSON detection polygons
checked by the `geojson` validator and for RFC 7946 ring orientation, KML parsed by fastkml,
CSV by csv.DictReader, over pages of job views in the shape the store serves."""

from __future__ import annotations

import asyncio
import copy
import csv
import io
import json
import warnings
import xml.etree.ElementTree as ET
from collections.abc import AsyncIterator, Callable
from typing import Any

import geojson
import pytest
from shapely.geometry import LinearRing

from service.exports import CSV_COLUMNS, FORMATS, PROJECTIONS, WRITERS, to_csv, to_geojson, to_kml
from service.geo import kml as kml_writer

with warnings.catch_warnings():  # fastkml warns that lxml is missing: the stdlib parser serves
    warnings.simplefilter("ignore")
    from fastkml import kml

LAT, LON = 51.5, -0.12
D = 0.00002  # half a box, in degrees
TRICKY = 'roof "A" <&> \x01\x0b\ud800\ufffe\x7f end'
TRICKY_SHOWN = 'roof "A" <&> \x7f end'  # what XML 1.0 can hold of it
NON_LATIN = "автомобиль 車"


def _square(lon: float, lat: float, half: float, clockwise: bool) -> list[list[float]]:
    """A closed ring of box corners as georef gives them: top-left, top-right, bottom-right,
    bottom-left, which is clockwise on the ground for a nadir frame looking north."""
    ring = [
        [lon - half, lat + half],
        [lon + half, lat + half],
        [lon + half, lat - half],
        [lon - half, lat - half],
    ]
    if not clockwise:
        ring.reverse()
    return [*ring, ring[0]]


def _located(lon: float, lat: float, **sizes: Any) -> dict[str, Any]:
    geo = {
        "lat": lat,
        "lon": lon,
        "footprint": _square(lon, lat, D, clockwise=True),
        "width_m": 2.8,
        "height_m": 2.2,
        "area_m2": 6.2,
        "distance_m": 80.5,
        "uncertainty_m": 3.4,
    }
    return geo | sizes


def _job(
    job_id: int,
    name: str,
    *,
    gps: bool = True,
    flight: str | None = "site-a/f1",
    frame_geo: dict[str, Any] | None = None,
    detections: list[dict[str, Any]] | None = None,
    result: bool = True,
) -> dict[str, Any]:
    exif = {"gps": {"latitude": LAT, "longitude": LON, "altitude": 120.3}} if gps else None
    view: dict[str, Any] = {
        "id": job_id,
        "status": "succeeded" if result else "queued",
        "source": "path",
        "source_path": f"site-a/f1/{name}",
        "flight": flight,
        "created_at": "2026-11-28T10:00:00Z",
        "finished_at": "2026-11-28T10:00:09Z" if result else None,
        "input": {
            "name": name,
            "width": 4000,
            "height": 3000,
            "captured_at": "2026-11-23T08:00:05",
            "exif": exif,
        },
        "result": None,
    }
    if result:
        view["result"] = {"detections": detections or [], "reasoning": "seen", "answer": None}
        if frame_geo is not None:
            view["result"]["geo"] = frame_geo
    return view


def _detection(number: int, label: str, geo: dict[str, Any] | None) -> dict[str, Any]:
    found: dict[str, Any] = {"number": number, "label": label, "box": [10.0, 20.5, 110.0, 90.0]}
    if geo is not None:
        found["geo"] = geo
    return found


FRAME_FOOTPRINT = _square(LON, LAT, 0.0008, clockwise=True)
FRAME_GEO: dict[str, Any] = {
    "camera": {"lat": LAT, "lon": LON, "height_m": 80.0, "yaw": 0.0, "pitch": -90.0, "roll": 0.0},
    "assumptions": ["flat ground at take-off height"],
    "centre": {"lat": LAT, "lon": LON},
    "footprint": FRAME_FOOTPRINT,
    "gsd_cm": 2.19,
    "uncertainty_m": 3.1,
}


def _history() -> list[list[dict[str, Any]]]:
    """Three pages: a located frame with a located detection (tricky label), one whose
    footprint is unknown, and one not located; a frame not located; a job from before geo;
    a job without GPS; a queued job."""
    located = _job(
        1,
        'DJI_0001 "north" <&>.JPG',
        frame_geo=FRAME_GEO,
        detections=[
            _detection(1, TRICKY, _located(LON + 0.0001, LAT + 0.0002)),
            _detection(
                2,
                NON_LATIN,
                _located(LON - 0.0003, LAT, footprint=None, width_m=None, height_m=None)
                | {"area_m2": None},
            ),
            _detection(3, "car", {"reason": "the box centre is above the horizon"}),
        ],
    )
    unlocated = _job(
        2,
        "DJI_0002.JPG",
        flight=None,
        frame_geo={"reason": "no relative altitude in the DJI XMP", "assumptions": []},
        detections=[_detection(1, "car", {"reason": "the frame is not located"})],
    )
    before_geo = _job(3, f"{NON_LATIN}.jpg", flight=None, detections=[_detection(1, "car", None)])
    no_gps = _job(4, "plain.png", gps=False, detections=[_detection(1, "roof", None)])
    queued = _job(5, "later.jpg", result=False)
    # Counter-clockwise and unclosed as given: the export must close it and keep the order.
    second = _job(
        6,
        "DJI_0003.JPG",
        frame_geo=FRAME_GEO | {"footprint": _square(LON, LAT, 0.0008, clockwise=False)[:-1]},
        detections=[_detection(1, "roof", _located(LON + 0.0004, LAT - 0.0001))],
    )
    return [[located, unlocated], [before_geo, no_gps], [queued, second]]


def _run(writer: Callable[[AsyncIterator[list[dict[str, Any]]]], AsyncIterator[str]]) -> str:
    async def pages() -> AsyncIterator[list[dict[str, Any]]]:
        for page in _history():
            yield copy.deepcopy(page)

    async def collect() -> str:
        return "".join([chunk async for chunk in writer(pages())])

    return asyncio.run(collect())


def _strict(text: str) -> Any:
    def refuse(constant: str) -> None:
        raise AssertionError(f"non-standard JSON constant {constant}")

    return json.loads(text, parse_constant=refuse)


def _geojson() -> tuple[Any, dict[str, list[dict[str, Any]]]]:
    text = _run(to_geojson)
    collection = geojson.loads(text)  # for its validator: it rounds coordinates to 6 places
    by_kind: dict[str, list[dict[str, Any]]] = {"frame": [], "footprint": [], "detection": []}
    for feature in _strict(text)["features"]:
        by_kind[feature["properties"]["kind"]].append(feature)
    return collection, by_kind


def _corners(ring: list[list[float]]) -> set[tuple[float, float]]:
    return {(lon, lat) for lon, lat in ring}


def test_geojson_validates_with_frames_footprints_and_detection_polygons() -> None:
    collection, by_kind = _geojson()
    assert collection.is_valid, collection.errors()
    assert sum(map(len, by_kind.values())) == len(collection["features"])

    # Every geotagged job keeps its camera Point and today's properties.
    frames = by_kind["frame"]
    assert [f["properties"]["job_id"] for f in frames] == [1, 2, 3, 5, 6]
    assert frames[0]["geometry"]["coordinates"] == [LON, LAT, 120.3]
    assert frames[0]["properties"] == {
        "kind": "frame",
        "job_id": 1,
        "name": 'DJI_0001 "north" <&>.JPG',
        "status": "succeeded",
        "captured_at": "2026-11-23T08:00:05",
        "counts": {TRICKY: 1, NON_LATIN: 1, "car": 1},
        "reasoning": "seen",
        "flight": "site-a/f1",
        "gsd_cm": 2.19,
    }
    assert [f["properties"]["gsd_cm"] for f in frames] == [2.19, None, None, None, 2.19]
    assert [f["properties"]["flight"] for f in frames] == [
        "site-a/f1",
        None,
        None,
        "site-a/f1",
        "site-a/f1",
    ]

    # Footprints only for located frames, as closed counter-clockwise rings (RFC 7946 3.1.6).
    assert [f["properties"]["job_id"] for f in by_kind["footprint"]] == [1, 6]
    assert by_kind["footprint"][0]["properties"] == {
        "kind": "footprint",
        "job_id": 1,
        "name": 'DJI_0001 "north" <&>.JPG',
        "captured_at": "2026-11-23T08:00:05",
        "flight": "site-a/f1",
        "gsd_cm": 2.19,
        "uncertainty_m": 3.1,
    }
    for footprint in by_kind["footprint"]:
        (ring,) = footprint["geometry"]["coordinates"]
        assert len(ring) == 5 and ring[0] == ring[-1]
        assert LinearRing(ring).is_ccw
        assert _corners(ring) == _corners(FRAME_FOOTPRINT)

    # One feature per located detection: a Polygon, or a Point where the footprint is unknown.
    detections = by_kind["detection"]
    assert [(f["properties"]["job_id"], f["properties"]["number"]) for f in detections] == [
        (1, 1),
        (1, 2),
        (6, 1),
    ]
    first, centre_only, other = detections
    assert first["properties"] == {
        "kind": "detection",
        "job_id": 1,
        "number": 1,
        "label": TRICKY,
        "confidence": None,
        "width_m": 2.8,
        "height_m": 2.2,
        "area_m2": 6.2,
        "uncertainty_m": 3.4,
        "distance_m": 80.5,
        "flight": "site-a/f1",
        "captured_at": "2026-11-23T08:00:05",
    }
    assert first["geometry"]["type"] == other["geometry"]["type"] == "Polygon"
    for polygon, (lon, lat) in (
        (first, (LON + 0.0001, LAT + 0.0002)),
        (other, (LON + 0.0004, LAT - 0.0001)),
    ):
        (ring,) = polygon["geometry"]["coordinates"]
        assert ring[0] == ring[-1] and LinearRing(ring).is_ccw
        assert _corners(ring) == _corners(_square(lon, lat, D, clockwise=True))
    assert centre_only["geometry"] == {"type": "Point", "coordinates": [LON - 0.0003, LAT]}
    assert centre_only["properties"]["label"] == NON_LATIN
    assert centre_only["properties"]["width_m"] is None
    assert centre_only["properties"]["area_m2"] is None
    assert centre_only["properties"]["distance_m"] == 80.5


@pytest.mark.parametrize(
    ("footprint", "expected"),
    [
        (_square(LON, LAT, D, clockwise=False), "Polygon"),
        (_square(LON, LAT, D, clockwise=True)[:-1], "Polygon"),  # unclosed
        ([[LON, LAT], [LON + D, LAT], [LON + 2 * D, LAT], [LON, LAT]], "Point"),  # no area
        ([[LON, LAT], [LON + D, LAT + D], [LON, LAT]], "Point"),  # too few corners
        ([[LON, LAT], [float("nan"), LAT], [LON + D, LAT + D], [LON, LAT + D]], "Point"),
    ],
)
def test_a_detection_footprint_becomes_a_valid_ring_or_its_centre(
    footprint: list[list[float]], expected: str
) -> None:
    job = _job(
        9, "x.jpg", detections=[_detection(1, "car", _located(LON, LAT, footprint=footprint))]
    )

    async def pages() -> AsyncIterator[list[dict[str, Any]]]:
        yield [job]

    async def collect() -> str:
        return "".join([chunk async for chunk in to_geojson(pages())])

    text = asyncio.run(collect())
    _strict(text)
    collection = geojson.loads(text)
    assert collection.is_valid, collection.errors()
    (detection,) = [f for f in collection["features"] if f["properties"]["kind"] == "detection"]
    assert detection["geometry"]["type"] == expected
    if expected == "Polygon":
        (ring,) = detection["geometry"]["coordinates"]
        assert ring[0] == ring[-1] and LinearRing(ring).is_ccw


def _kml() -> tuple[str, dict[str, list[Any]]]:
    text = _run(to_kml)
    document: Any = kml.KML.from_string(text).features[0]
    folders = {str(folder.name): list(folder.features) for folder in document.features}
    return text, folders


def _flat(positions: Any) -> list[float]:
    return [c for position in positions for c in position]


def _data(placemark: Any) -> dict[str, str | None]:
    return {d.name: d.value for d in placemark.extended_data.elements}


def test_kml_parses_with_folders_names_and_coordinates() -> None:
    text, folders = _kml()
    assert FORMATS["kml"] == kml_writer.MEDIA_TYPE == "application/vnd.google-earth.kml+xml"
    assert list(folders) == ["Frames", "Footprints", "Detections"]
    ET.fromstring(text.encode())  # well-formed for the strict stdlib parser too
    _, by_kind = _geojson()

    frames = folders["Frames"]
    assert [p.name for p in frames] == [f["properties"]["name"] for f in by_kind["frame"]]
    assert frames[0].name == 'DJI_0001 "north" <&>.JPG'
    assert frames[2].name == f"{NON_LATIN}.jpg"
    assert (frames[0].geometry.x, frames[0].geometry.y) == (LON, LAT)
    assert all(p.style_url.url == "#frame" for p in frames)
    assert _data(frames[0])["flight"] == "site-a/f1"
    assert _data(frames[0])["gsd_cm"] == "2.19"

    footprints = folders["Footprints"]
    assert [_data(p)["job_id"] for p in footprints] == ["1", "6"]
    for placemark, feature in zip(footprints, by_kind["footprint"], strict=True):
        assert _flat(placemark.geometry.exterior.coords) == pytest.approx(
            _flat(feature["geometry"]["coordinates"][0])
        )

    detections = folders["Detections"]
    assert [p.name for p in detections] == [f"{TRICKY_SHOWN} #1", f"{NON_LATIN} #2", "roof #1"]
    first, centre_only, _ = detections
    assert first.description == (
        "2.8 m × 2.2 m, 6.2 m²; position ± 3.4 m; 80.5 m from the camera; job 1"
    )
    assert "size unknown" in centre_only.description
    assert _data(first) | {"confidence": None} == {
        "kind": "detection",
        "job_id": "1",
        "number": "1",
        "label": TRICKY_SHOWN,
        "confidence": None,
        "width_m": "2.8",
        "height_m": "2.2",
        "area_m2": "6.2",
        "uncertainty_m": "3.4",
        "distance_m": "80.5",
        "flight": "site-a/f1",
        "captured_at": "2026-11-23T08:00:05",
    }
    for placemark, feature in zip(detections, by_kind["detection"], strict=True):
        assert placemark.style_url.url == "#detection"
        if feature["geometry"]["type"] == "Polygon":
            coords = _flat(placemark.geometry.exterior.coords)
            assert coords == pytest.approx(_flat(feature["geometry"]["coordinates"][0]))
        else:
            point = [placemark.geometry.x, placemark.geometry.y]
            assert point == pytest.approx(feature["geometry"]["coordinates"])
    assert text.count("<altitudeMode>clampToGround</altitudeMode>") == sum(
        map(len, folders.values())
    )


def test_kml_text_holds_only_what_xml_allows() -> None:
    text, _ = _kml()
    for forbidden in ("\x01", "\x0b", "\ud800", "\ufffe", "\x00"):
        assert forbidden not in text
    assert kml_writer.text("a\rb\x00<c>") == "a&#13;b&lt;c&gt;"
    root = ET.fromstring(kml_writer.placemark(
        {
            "type": "Feature",
            "geometry": {"type": "Point", "coordinates": [1e-05, -2e-07]},
            "properties": {"kind": "frame", "job_id": 1, "name": "a\r\nb"},
        }
    ))  # fmt: skip
    assert root.findtext("name") == "a\r\nb"
    assert root.findtext("Point/coordinates") == "0.00001,-0.0000002"


def test_kml_streams_large_spools_in_utf8() -> None:
    """Past the spools' memory threshold the detections go through files on disk, whatever
    the locale's encoding."""
    count = 12000

    async def pages() -> AsyncIterator[list[dict[str, Any]]]:
        for start in range(0, count, 1000):
            yield [
                {
                    "type": "Feature",
                    "geometry": {"type": "Point", "coordinates": [LON, LAT]},
                    "properties": {
                        "kind": "detection",
                        "job_id": n,
                        "number": 1,
                        "label": NON_LATIN + " " + "x" * 500,
                    },
                }
                for n in range(start, start + 1000)
            ]

    async def collect() -> list[str]:
        return [chunk async for chunk in kml_writer.document(pages())]

    text = "".join(asyncio.run(collect()))
    assert len(text.encode()) > 8 * 1024 * 1024
    root = ET.fromstring(text.encode())
    ns = {"k": "http://www.opengis.net/kml/2.2"}
    names = [p.findtext("k:name", namespaces=ns) for p in root.iterfind(".//k:Placemark", ns)]
    assert len(names) == count and all(n and n.startswith(NON_LATIN) for n in names)


def test_csv_rows_gain_detection_place_and_size() -> None:
    text = _run(to_csv)
    reader = csv.DictReader(io.StringIO(text))
    assert reader.fieldnames == CSV_COLUMNS
    geo_columns = ["detection_lat", "detection_lon", "width_m", "height_m", "area_m2"]
    geo_columns.append("uncertainty_m")
    assert CSV_COLUMNS.index("y2") + 1 == CSV_COLUMNS.index("detection_lat")
    assert CSV_COLUMNS[CSV_COLUMNS.index("detection_lat") :][:6] == geo_columns
    rows = list(reader)
    by_key = {(int(r["job_id"]), r["detection"]): r for r in rows}
    assert len(by_key) == len(rows) == 8

    located = by_key[(1, "1")]
    assert located["label"] == TRICKY
    assert [float(located[c]) for c in geo_columns] == pytest.approx(
        [LAT + 0.0002, LON + 0.0001, 2.8, 2.2, 6.2, 3.4]
    )
    assert [located[c] for c in ("latitude", "longitude", "altitude")] == ["51.5", "-0.12", "120.3"]
    assert [float(located[c]) for c in ("x1", "y1", "x2", "y2")] == [10.0, 20.5, 110.0, 90.0]
    centre_only = by_key[(1, "2")]
    assert centre_only["label"] == NON_LATIN
    assert [centre_only[c] for c in geo_columns] == [str(LAT), str(LON - 0.0003), "", "", "", "3.4"]
    for key in ((1, "3"), (2, "1"), (3, "1"), (4, "1"), (5, "")):
        assert [by_key[key][c] for c in geo_columns] == [""] * 6, key
    assert by_key[(4, "1")]["latitude"] == ""
    assert by_key[(5, "")]["reasoning"] == ""


def test_kml_is_an_export_format_over_the_located_projection() -> None:
    assert WRITERS["kml"] is to_kml
    assert PROJECTIONS["kml"] is PROJECTIONS["geojson"]

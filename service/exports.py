"""Exports of job history in formats other tools read: CSV, JSON Lines, GeoJSON, KML, COCO. Each
is a stream of text chunks over a stream of pages of job views, one chunk per page, so memory
stays flat at any size and the response is written in few, large pieces. A format that
writes only part of a view reads pages of just that part (PROJECTIONS): the same values,
built for less."""

from __future__ import annotations

import csv
import io
import itertools
import json
import math
import tempfile
from collections.abc import AsyncIterator, Callable, Sequence
from typing import Any

from service import __version__
from service.detection import decode_mask
from service.geo import kml
from service.store.reads import Projection, annotated_view, listed_view, located_view

# Pages of job views, or of the PROJECTIONS of jobs, as Reads.stream gives them.
Pages = AsyncIterator[list[dict[str, Any]]]
FORMATS = {
    "csv": "text/csv; charset=utf-8",
    "jsonl": "application/x-ndjson",
    "geojson": "application/geo+json",
    "kml": kml.MEDIA_TYPE,
    "coco": "application/json",
}
CSV_COLUMNS = [
    "job_id", "status", "source", "source_path", "input_name", "created_at", "finished_at",
    "width", "height", "captured_at", "latitude", "longitude", "altitude",
    "detection", "label", "x1", "y1", "x2", "y2",
    "detection_lat", "detection_lon", "width_m", "height_m", "area_m2", "uncertainty_m",
    "reasoning",
]  # fmt: skip
# A detection's place and real size, from its `geo` (empty cells when it was not located).
_GEO_CELLS = ("lat", "lon", "width_m", "height_m", "area_m2", "uncertainty_m")
# A located detection's measures in the GeoJSON and KML properties.
_SIZES = ("width_m", "height_m", "area_m2", "uncertainty_m", "distance_m")


# Strict JSON: a non-finite number that slipped through fails loudly instead of writing NaN.
# Encoders made once: json.dumps with any option builds a new encoder on every call.
_dumps = json.JSONEncoder(allow_nan=False).encode
_dumps_text = json.JSONEncoder(allow_nan=False, ensure_ascii=False).encode  # UTF-8 as is
_compact = json.JSONEncoder(allow_nan=False, ensure_ascii=False, separators=(",", ":")).encode


def _gps(job: dict[str, Any]) -> dict[str, Any]:
    exif = job["input"].get("exif") or {}
    return exif.get("gps") or {}


def _line(values: list[Any]) -> str:
    buffer = io.StringIO()
    csv.writer(buffer, lineterminator="\r\n").writerow(values)
    return buffer.getvalue()


def _cell(value: Any) -> Any:
    """A structured answer's field as a CSV cell: text and numbers as they are, anything else
    (true/false, null, lists, objects) as compact JSON."""
    if isinstance(value, str) or (isinstance(value, int | float) and not isinstance(value, bool)):
        return value
    return _compact(value)


def _answer_cells(answer: Any, fields: Sequence[str]) -> list[Any]:
    if not isinstance(answer, dict):
        return [""] * len(fields)
    return [_cell(answer[name]) if name in answer else "" for name in fields]


async def to_csv(pages: Pages, answer_fields: Sequence[str] = ()) -> AsyncIterator[str]:
    """One row per detection, and one row for each job without detections; after the fixed
    columns, one `answer.<field>` column per top-level field of the structured answers.

    The header comes first but the answers arrive page by page, so the fields are read
    before the export starts (Reads.answer_fields: those of the answers stored, and those
    the schemas of unfinished jobs name), not gathered while it streams; a two-pass export
    through a spool would delay the first byte until the last page and write every row
    twice. A field only a job finishing during the export brings, which its schema does not
    name, has no column: the JSON Lines export carries whole answers."""
    fields = list(answer_fields)
    yield _line([*CSV_COLUMNS, *(f"answer.{name}" for name in fields)])
    async for page in pages:
        rows: list[list[Any]] = []
        for job in page:
            gps, result = _gps(job), job.get("result") or {}
            base = [
                job["id"], job["status"], job["source"], job.get("source_path") or "",
                job["input"]["name"], job["created_at"], job["finished_at"] or "",
                job["input"]["width"], job["input"]["height"],
                job["input"].get("captured_at") or "",
                gps.get("latitude", ""), gps.get("longitude", ""), gps.get("altitude", ""),
            ]  # fmt: skip
            reasoning = result.get("reasoning", "")
            detections = result.get("detections") or []
            answer = _answer_cells(result.get("answer"), fields) if fields else []
            if not detections:
                rows.append([*base, *[""] * 12, reasoning, *answer])
            for d in detections:
                geo = _located(d.get("geo"))
                place = [_cell_or_empty(geo.get(k)) for k in _GEO_CELLS] if geo else [""] * 6
                rows.append([*base, d["number"], d["label"], *d["box"], *place, reasoning, *answer])
        buffer = io.StringIO()
        csv.writer(buffer, lineterminator="\r\n").writerows(rows)
        yield buffer.getvalue()


async def to_jsonl(pages: Pages) -> AsyncIterator[str]:
    async for page in pages:
        yield "".join([_dumps_text(job) + "\n" for job in page])


def _counts(job: dict[str, Any]) -> dict[str, int]:
    counts: dict[str, int] = {}
    for d in (job.get("result") or {}).get("detections") or []:
        counts[d["label"]] = counts.get(d["label"], 0) + 1
    return counts


def _finite(value: Any) -> float | None:
    """A number as it is; None for anything else, and for NaN or infinity (strict JSON)."""
    if isinstance(value, int | float) and not isinstance(value, bool) and math.isfinite(value):
        return value
    return None


def _cell_or_empty(value: Any) -> Any:
    number = _finite(value)
    return "" if number is None else number


def _located(geo: Any) -> dict[str, Any] | None:
    """A frame's or detection's `geo` when it holds a place; None when it says why not."""
    if isinstance(geo, dict) and "reason" not in geo:
        return geo
    return None


def _ring(points: Any) -> list[list[float]] | None:
    """A footprint as an RFC 7946 exterior ring: closed, counter-clockwise (right-hand rule)
    in longitude/latitude; None when it is not a ring of finite [lon, lat] pairs that
    encloses an area."""
    if not isinstance(points, list):
        return None
    ring: list[list[float]] = []
    for point in points:
        if not (isinstance(point, list | tuple) and len(point) >= 2):
            return None
        lon, lat = _finite(point[0]), _finite(point[1])
        if lon is None or lat is None:
            return None
        ring.append([lon, lat])
    if ring and ring[0] != ring[-1]:
        ring.append(ring[0])
    if len(ring) < 4:
        return None
    # Shoelace about the first corner: a box of a few metres is ~1e-9 square degrees.
    x0, y0 = ring[0]
    twice_area = sum(
        (x1 - x0) * (y2 - y0) - (x2 - x0) * (y1 - y0)
        for (x1, y1), (x2, y2) in itertools.pairwise(ring)
    )
    if twice_area == 0:
        return None
    return ring if twice_area > 0 else ring[::-1]


def _point(geo: dict[str, Any]) -> list[float] | None:
    lon, lat = _finite(geo.get("lon")), _finite(geo.get("lat"))
    return None if lon is None or lat is None else [lon, lat]


def _shape(geo: dict[str, Any]) -> dict[str, Any] | None:
    """A located detection's ground footprint as a Polygon; a Point at its centre when the
    footprint is unknown (a corner above the horizon); None without a usable place."""
    ring = _ring(geo.get("footprint"))
    if ring is not None:
        return {"type": "Polygon", "coordinates": [ring]}
    centre = _point(geo)
    return None if centre is None else {"type": "Point", "coordinates": centre}


def _frame(job: dict[str, Any], frame: dict[str, Any] | None) -> dict[str, Any] | None:
    """The job as a Point where the camera was (longitude, latitude[, altitude]); None when
    it has no position."""
    gps = _gps(job)
    if "latitude" not in gps or "longitude" not in gps:
        return None
    position = [gps["longitude"], gps["latitude"]]
    if "altitude" in gps:
        position.append(gps["altitude"])
    return {
        "type": "Feature",
        "geometry": {"type": "Point", "coordinates": position},
        "properties": {
            "kind": "frame",
            "job_id": job["id"],
            "name": job["input"]["name"],
            "status": job["status"],
            "captured_at": job["input"].get("captured_at"),
            "counts": _counts(job),
            "reasoning": (job.get("result") or {}).get("reasoning"),
            "flight": job.get("flight"),
            "gsd_cm": _finite((frame or {}).get("gsd_cm")),
        },
    }


def _features(job: dict[str, Any]) -> list[dict[str, Any]]:
    """A job's features: the camera's Point, the frame's ground footprint, and one feature per
    located detection. `confidence` is always null: the detector gives boxes no score, and
    the key is kept so every detection has the same fields."""
    result = job.get("result") or {}
    frame = _located(result.get("geo"))
    features = []
    if (point := _frame(job, frame)) is not None:
        features.append(point)
    captured_at, flight = job["input"].get("captured_at"), job.get("flight")
    if frame is not None and (ring := _ring(frame.get("footprint"))) is not None:
        properties = {
            "kind": "footprint",
            "job_id": job["id"],
            "name": job["input"]["name"],
            "captured_at": captured_at,
            "flight": flight,
            "gsd_cm": _finite(frame.get("gsd_cm")),
            "uncertainty_m": _finite(frame.get("uncertainty_m")),
        }
        polygon = {"type": "Polygon", "coordinates": [ring]}
        features.append({"type": "Feature", "geometry": polygon, "properties": properties})
    for d in result.get("detections") or []:
        geo = _located(d.get("geo"))
        shape = None if geo is None else _shape(geo)
        if geo is None or shape is None:
            continue
        properties = {
            "kind": "detection",
            "job_id": job["id"],
            "number": d["number"],
            "label": d["label"],
            "confidence": None,
            **{k: _finite(geo.get(k)) for k in _SIZES},
            "flight": flight,
            "captured_at": captured_at,
        }
        features.append({"type": "Feature", "geometry": shape, "properties": properties})
    return features


async def to_geojson(pages: Pages) -> AsyncIterator[str]:
    """A FeatureCollection: for each geotagged job a Point where the camera was (`kind`
    "frame"), its ground footprint (`kind` "footprint") and its located detections (`kind`
    "detection": ground footprint Polygons, or Points where the footprint is unknown)."""
    yield '{"type": "FeatureCollection", "features": ['
    first = True
    async for page in pages:
        chunk = []
        for job in page:
            for feature in _features(job):
                chunk.append(("" if first else ",") + "\n" + _dumps_text(feature))
                first = False
        if chunk:
            yield "".join(chunk)
    yield "\n]}\n"


async def _feature_pages(pages: Pages) -> AsyncIterator[list[dict[str, Any]]]:
    async for page in pages:
        yield [feature for job in page for feature in _features(job)]


def to_kml(pages: Pages) -> AsyncIterator[str]:
    """KML 2.2: the GeoJSON export's features in a Folder per kind."""
    return kml.document(_feature_pages(pages))


def _coco_rle(mask: dict[str, Any], width: int, height: int) -> dict[str, Any]:
    """Our row-major run lengths to COCO's column-major uncompressed RLE at the image's size.
    Masks are computed on the reduced image the models saw; they are scaled (nearest pixel)
    run by run, never expanded to a full-size array."""
    import numpy as np

    small = decode_mask(mask)
    rows, cols = small.shape
    if not (rows and cols and width and height):
        return {"size": [height, width], "counts": [height * width]}
    # Output rows each source row covers, and the source column of every output column.
    source_row = np.minimum(((np.arange(height) + 0.5) * rows / height).astype(np.int64), rows - 1)
    covered = np.bincount(source_row, minlength=rows)
    source_col = np.minimum(((np.arange(width) + 0.5) * cols / width).astype(np.int64), cols - 1)
    runs_of: dict[int, list[tuple[bool, int]]] = {}
    counts: list[int] = []
    value, length = False, 0
    for col in source_col.tolist():
        if col not in runs_of:
            column = small[:, col]
            starts = np.concatenate(([0], np.flatnonzero(column[1:] != column[:-1]) + 1))
            lengths = np.add.reduceat(covered, starts)
            runs_of[col] = list(zip(column[starts].tolist(), lengths.tolist(), strict=True))
        for run_value, run_length in runs_of[col]:
            if run_length == 0:
                continue
            if run_value == value:
                length += run_length
            else:
                counts.append(length)
                value, length = run_value, run_length
    counts.append(length)
    return {"size": [height, width], "counts": counts}


def _annotation(
    annotation_id: int, job_id: int, d: dict[str, Any], category_id: int, width: int, height: int
) -> dict[str, Any]:
    x1, y1, x2, y2 = d["box"]
    annotation: dict[str, Any] = {
        "id": annotation_id,
        "image_id": job_id,
        "category_id": category_id,
        "bbox": [x1, y1, round(x2 - x1, 2), round(y2 - y1, 2)],
        "area": round((x2 - x1) * (y2 - y1), 2),
        "iscrowd": 0,
    }
    if d.get("mask"):
        annotation["segmentation"] = _coco_rle(d["mask"], width, height)
    return annotation


async def to_coco(pages: Pages) -> AsyncIterator[str]:
    """COCO detection JSON: images, then annotations (bbox [x, y, w, h]), then categories.
    Annotations wait in a temporary file so the jobs are read once."""
    header = _dumps({"info": {"description": "aip export", "version": __version__}, "licenses": []})
    yield header[:-1]
    yield ', "images": ['
    categories: dict[str, int] = {}
    with tempfile.SpooledTemporaryFile(max_size=8 * 1024 * 1024, mode="w+") as spool:
        first_image = first_annotation = True
        annotation_id = 0
        async for page in pages:
            images, annotations = [], []
            for job in page:
                if job.get("result") is None:
                    continue
                width, height = job["input"]["width"], job["input"]["height"]
                image = {
                    "id": job["id"],
                    "file_name": job.get("source_path") or job["input"]["name"],
                    "width": width,
                    "height": height,
                }
                images.append(("" if first_image else ",") + _dumps_text(image))
                first_image = False
                for d in job["result"]["detections"]:
                    annotation_id += 1
                    category = categories.setdefault(d["label"], len(categories) + 1)
                    annotation = _annotation(annotation_id, job["id"], d, category, width, height)
                    annotations.append(("" if first_annotation else ",") + _dumps(annotation))
                    first_annotation = False
            spool.write("".join(annotations))
            if images:
                yield "".join(images)
        yield '], "annotations": ['
        spool.seek(0)
        while chunk := spool.read(64 * 1024):
            yield chunk
    names = [{"id": i, "name": name, "supercategory": "object"} for name, i in categories.items()]
    yield '], "categories": ' + _dumps_text(names) + "}\n"


WRITERS: dict[str, Callable[[Pages], AsyncIterator[str]]] = {
    "csv": to_csv,
    "jsonl": to_jsonl,
    "geojson": to_geojson,
    "kml": to_kml,
    "coco": to_coco,
}
# What each writer reads of a job (None: the full view). Each projection holds every field
# its writer uses, and leaves out the jobs the writer would skip.
PROJECTIONS: dict[str, Projection | None] = {
    "csv": listed_view,
    "jsonl": None,
    "geojson": located_view,
    "kml": located_view,
    "coco": annotated_view,
}

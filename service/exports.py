"""Exports of job history in formats other tools read: CSV, JSON Lines, GeoJSON, COCO. Each
is a stream of text chunks over a stream of pages of job views, one chunk per page, so memory
stays flat at any size and the response is written in few, large pieces. A format that
writes only part of a view reads pages of just that part (PROJECTIONS): the same values,
built for less."""

from __future__ import annotations

import csv
import io
import json
import tempfile
from collections.abc import AsyncIterator, Callable, Sequence
from typing import Any

from service import __version__
from service.detection import decode_mask
from service.store.reads import Projection, annotated_view, listed_view, located_view

# Pages of job views, or of the PROJECTIONS of jobs, as Reads.stream gives them.
Pages = AsyncIterator[list[dict[str, Any]]]
FORMATS = {
    "csv": "text/csv; charset=utf-8",
    "jsonl": "application/x-ndjson",
    "geojson": "application/geo+json",
    "coco": "application/json",
}
CSV_COLUMNS = [
    "job_id", "status", "source", "source_path", "input_name", "created_at", "finished_at",
    "width", "height", "captured_at", "latitude", "longitude", "altitude",
    "detection", "label", "x1", "y1", "x2", "y2", "reasoning",
]  # fmt: skip


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
                rows.append([*base, "", "", "", "", "", "", reasoning, *answer])
            for d in detections:
                rows.append([*base, d["number"], d["label"], *d["box"], reasoning, *answer])
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


def _feature(job: dict[str, Any]) -> dict[str, Any] | None:
    """The job as a Point (longitude, latitude[, altitude]); None when it has no position."""
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
            "job_id": job["id"],
            "name": job["input"]["name"],
            "status": job["status"],
            "captured_at": job["input"].get("captured_at"),
            "counts": _counts(job),
            "reasoning": (job.get("result") or {}).get("reasoning"),
        },
    }


async def to_geojson(pages: Pages) -> AsyncIterator[str]:
    """A FeatureCollection with one Point per geotagged job."""
    yield '{"type": "FeatureCollection", "features": ['
    first = True
    async for page in pages:
        chunk = []
        for job in page:
            feature = _feature(job)
            if feature is None:
                continue
            chunk.append(("" if first else ",") + "\n" + _dumps_text(feature))
            first = False
        if chunk:
            yield "".join(chunk)
    yield "\n]}\n"


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
    "coco": to_coco,
}
# What each writer reads of a job (None: the full view). Each projection holds every field
# its writer uses, and leaves out the jobs the writer would skip.
PROJECTIONS: dict[str, Projection | None] = {
    "csv": listed_view,
    "jsonl": None,
    "geojson": located_view,
    "coco": annotated_view,
}

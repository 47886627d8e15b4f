"""What changed between two flights, shown to the reasoner: per new, gone or moved object a
side-by-side picture of its place in both flights (north up, same ground scale, the object
outlined), built from the images the jobs may hand out and queued as an ordinary job."""

from __future__ import annotations

import asyncio
import io
import math
import re
import textwrap
from collections.abc import Sequence
from dataclasses import dataclass
from typing import Any

import numpy as np
import pymap3d
from PIL import Image, ImageDraw, ImageFont

from service import flights
from service.errors import AipError, InvalidInput
from service.geo.camera import Camera, Unlocated, camera_from_exif
from service.geo.changes import Change, ObjectRef
from service.geo.project import project
from service.handout import handed_out
from service.intake import open_stored
from service.jobspec import parse_options, resolve
from service.services import Services
from service.uploads import announce, store_image

KINDS = ("new", "gone", "moved")
# A call may queue this many descriptions unasked; more need an explicit `limit`, never over
# MAX_LIMIT, so one big comparison cannot flood the queue.
MAX_UNASKED = 20
MAX_LIMIT = 100
HALF_PX = 448  # each half is square: the same ground span on both sides
BAND_PX = 30  # the title band above each half
GAP_PX = 6
MIN_SPAN_M = 10.0
MARGIN = 3.0  # the span is this many times the object's larger ground size
MAX_SPAN_M = 1000.0
OUTLINE = (255, 215, 0)
BACKGROUND = (24, 24, 24)
EMPTY = (96, 96, 96)

Ring = list[tuple[float, float]]  # (lat, lon) around an object


@dataclass(frozen=True)
class Described:
    """One change and the job that describes it (None, with the reason, when none could be
    made)."""

    change: Change
    job_id: int | None
    reason: str | None = None

    def to_dict(self) -> dict[str, Any]:
        def ref(found: ObjectRef | None) -> dict[str, int] | None:
            return None if found is None else {"job_id": found.job_id, "number": found.number}

        out: dict[str, Any] = {
            "kind": self.change.kind,
            "label": self.change.label,
            "before": ref(self.change.before),
            "after": ref(self.change.after),
            "job_id": self.job_id,
        }
        if self.change.kind == "moved" and self.change.distance_m is not None:
            out["distance_m"] = round(self.change.distance_m, 2)
        if self.reason is not None:
            out["reason"] = self.reason
        return out


@dataclass
class _Half:
    """One side of the picture: the ground around `centre`, seen by one frame (or why not)."""

    title: str
    centre: tuple[float, float]
    outline: Ring | None
    camera: Camera | None = None
    source: str | None = None
    reason: str | None = None
    job_id: int | None = None


def parse_kinds(text: str | None) -> tuple[str, ...]:
    """`new,gone,moved` (any of them, in any order) as a tuple in report order."""
    if text is None or not text.strip():
        return KINDS
    asked = {part.strip() for part in text.split(",") if part.strip()}
    unknown = asked - set(KINDS)
    if unknown:
        raise InvalidInput(
            f"kinds: {', '.join(sorted(unknown))[:200]} unknown; give any of new, gone, moved",
            code="invalid_kinds",
        )
    return tuple(kind for kind in KINDS if kind in asked)


async def describe(
    svc: Services,
    before: str,
    after: str,
    *,
    kinds: Sequence[str] = KINDS,
    limit: int | None = None,
) -> list[Described]:
    """Queue one describing job per new, gone or moved change (of `kinds`) between the two
    flights, at most `limit` of them (first in report order); without `limit` more than
    MAX_UNASKED changes is refused."""
    if limit is not None and not 1 <= limit <= MAX_LIMIT:
        raise InvalidInput(f"limit must be 1..{MAX_LIMIT}", code="invalid_limit")
    found = await flights.changes(svc, before, after)
    chosen = [change for kind in KINDS if kind in kinds for change in found.of(kind)]
    if limit is None and len(chosen) > MAX_UNASKED:
        raise InvalidInput(
            f"{len(chosen)} changes between {before!r} and {after!r}; at most {MAX_UNASKED} are "
            f"described unasked: give limit (1..{MAX_LIMIT}) to describe the first ones, or "
            "fewer kinds",
            code="too_many_changes",
        )
    views: dict[int, dict[str, Any] | AipError] = {}
    # Every picture and job's parameters first: a refusal then queues nothing.
    ready: list[tuple[Change, bytes, dict[str, Any]] | Described] = []
    for change in chosen[: limit or MAX_UNASKED]:
        halves = [
            await _half(svc, views, change, side, name)
            for side, name in (("before", before), ("after", after))
        ]
        if all(half.source is None for half in halves):
            reasons = "; ".join(f"{half.title}: {half.reason}" for half in halves)
            ready.append(Described(change, None, f"no image of the place ({reasons})"))
            continue
        picture = await asyncio.to_thread(_compose, svc, halves, _span(views, change))
        params = await _params(svc, change.label, _prompt(change, before, after))
        ready.append((change, picture, params))
    return [
        item
        if isinstance(item, Described)
        else Described(item[0], await _enqueue(svc, item[1], _name(item[0]), item[2]))
        for item in ready
    ]


def _prompt(change: Change, before: str, after: str) -> str:
    state = change.kind
    if change.kind == "moved" and change.distance_m is not None:
        state = f"moved by {change.distance_m:.1f} m"
    return (
        f"Left: the place in flight {before}; right: the same place in flight {after}. "
        f"The object outlined is a {change.label} that is {state}. "
        "Describe what changed, in one or two sentences."
    )


def _name(change: Change) -> str:
    label = re.sub(r"[^A-Za-z0-9_-]+", "-", change.label).strip("-")[:40] or "object"
    return f"change-{change.kind}-{label}.jpg"


async def _view(
    svc: Services, views: dict[int, dict[str, Any] | AipError], job_id: int
) -> dict[str, Any] | AipError:
    if job_id not in views:
        try:
            views[job_id] = await svc.reads.job(job_id)
        except AipError as exc:  # deleted since the comparison read it
            views[job_id] = exc
    return views[job_id]


def _detection(view: dict[str, Any] | AipError, number: int) -> dict[str, Any]:
    if isinstance(view, AipError):
        return {}
    for detection in (view.get("result") or {}).get("detections") or []:
        if detection.get("number") == number:
            return detection
    return {}


def _camera(view: dict[str, Any]) -> Camera | Unlocated:
    image = view.get("input") or {}
    return camera_from_exif(
        image.get("exif"),
        image.get("width"),
        image.get("height"),
        ground_elevation=(view.get("params") or {}).get("ground_elevation"),
    )


def _outline(view: dict[str, Any] | AipError, ref: ObjectRef) -> Ring | None:
    ring = (_detection(view, ref.number).get("geo") or {}).get("footprint")
    if not isinstance(ring, list) or len(ring) < 4:
        return None
    return [(float(lat), float(lon)) for lon, lat in ring]


def _span(views: dict[int, dict[str, Any] | AipError], change: Change) -> float:
    """The ground span of each half: the object's larger size with a margin around it."""
    size = 0.0
    for ref in (change.before, change.after):
        if ref is None:
            continue
        geo = _detection(views.get(ref.job_id, {}), ref.number).get("geo") or {}
        for key in ("width_m", "height_m"):
            value = geo.get(key)
            if isinstance(value, int | float) and math.isfinite(value):
                size = max(size, float(value))
    return min(MAX_SPAN_M, max(MIN_SPAN_M, MARGIN * size))


async def _half(
    svc: Services,
    views: dict[int, dict[str, Any] | AipError],
    change: Change,
    side: str,
    flight: str,
) -> _Half:
    """The half for one flight: centred on the object where that flight saw it, else where the
    other flight did, seen by its own frame or by the frame of this flight that best covers
    the spot."""
    own = change.before if side == "before" else change.after
    other = change.after if side == "before" else change.before
    place = own or other
    assert place is not None
    half = _Half(f"{side}: {flight}", (place.lat, place.lon), None)
    half.outline = _outline(await _view(svc, views, place.job_id), place)
    candidates = [own.job_id] if own is not None else list(change.covered_by)
    best: tuple[float, int, Camera] | None = None
    half.reason = "no frame of this flight covers the place"
    for job_id in candidates:
        view = await _view(svc, views, job_id)
        if isinstance(view, AipError):
            half.reason = view.message
            continue
        camera = _camera(view)
        if isinstance(camera, Unlocated):
            half.reason = f"job {job_id} is not on the ground: {camera.reason}"
            continue
        seen = project(camera, *half.centre)
        if seen is None:
            half.reason = f"job {job_id}'s frame does not show the place"
            continue
        width, height = camera.image_size
        off_centre = math.hypot(seen[0] / width - 0.5, seen[1] / height - 0.5)
        if best is None or off_centre < best[0]:
            best = (off_centre, job_id, camera)
    if best is None:
        return half
    _, half.job_id, half.camera = best
    try:
        half.source = (await handed_out(svc, half.job_id)).relative
        half.reason = None
    except AipError as exc:
        half.reason = exc.message
    return half


# -- pixels (on a worker thread) --------------------------------------------------------------


def _homography(
    points: Sequence[tuple[float, float]], targets: Sequence[tuple[float, float]]
) -> tuple[float, ...]:
    """PIL's PERSPECTIVE coefficients taking each output point to its target in the input."""
    rows: list[list[float]] = []
    values: list[float] = []
    for (x, y), (u, v) in zip(points, targets, strict=True):
        rows.append([x, y, 1.0, 0.0, 0.0, 0.0, -x * u, -y * u])
        rows.append([0.0, 0.0, 0.0, x, y, 1.0, -x * v, -y * v])
        values.extend((u, v))
    return tuple(float(c) for c in np.linalg.solve(np.array(rows), np.array(values)))


def _to_half(
    centre: tuple[float, float], span: float, lat: float, lon: float
) -> tuple[float, float]:
    """Output pixel of (lat, lon) in a north-up half of `span` metres around `centre`."""
    east, north, _ = pymap3d.geodetic2enu(lat, lon, 0.0, centre[0], centre[1], 0.0)
    scale = HALF_PX / span
    return (float(east) + span / 2) * scale, (span / 2 - float(north)) * scale


def rectified(
    image: Image.Image, camera: Camera, centre: tuple[float, float], span: float
) -> Image.Image | str:
    """The ground `span` metres square around `centre` (lat, lon) as the upright `image` shows
    it, north up, HALF_PX square (grey where the frame does not reach); or why there is none.
    Flat ground under a pinhole is a plane seen in perspective: one homography maps it."""
    corners = [(0.0, 0.0), (HALF_PX, 0.0), (HALF_PX, HALF_PX), (0.0, HALF_PX)]
    seen = []
    for x, y in corners:
        east, north = x * span / HALF_PX - span / 2, span / 2 - y * span / HALF_PX
        lat, lon, _ = pymap3d.enu2geodetic(
            east, north, 0.0, centre[0], centre[1], camera.ground_altitude_m
        )
        found = project(camera, float(lat), float(lon), inside=False)
        if found is None:
            return "the place is too near the horizon in this frame"
        seen.append(found)
    xs, ys = [p[0] for p in seen], [p[1] for p in seen]
    left, top = max(0, math.floor(min(xs))), max(0, math.floor(min(ys)))
    right, bottom = min(image.width, math.ceil(max(xs))), min(image.height, math.ceil(max(ys)))
    if right <= left or bottom <= top:
        return "the place is outside this frame"
    # Many source pixels to one output pixel: average them first, or the half aliases.
    longest = max(math.dist(seen[i], seen[i - 1]) for i in range(4))
    step = max(1, int(longest / HALF_PX))
    region = image.crop((left, top, right, bottom))
    if step > 1:
        region = region.reduce(step)
    targets = [((x - left) / step, (y - top) / step) for x, y in seen]
    return region.transform(
        (HALF_PX, HALF_PX),
        Image.Transform.PERSPECTIVE,
        _homography(corners, targets),
        Image.Resampling.BILINEAR,
        fillcolor=EMPTY,
    )


def _compose(svc: Services, halves: Sequence[_Half], span: float) -> bytes:
    """Both halves side by side under their titles, as a JPEG (no EXIF: the picture is no
    frame of any flight)."""
    canvas = Image.new("RGB", (2 * HALF_PX + GAP_PX, BAND_PX + HALF_PX), BACKGROUND)
    draw = ImageDraw.Draw(canvas)
    font = ImageFont.load_default(size=18)
    small = ImageFont.load_default(size=15)
    for index, half in enumerate(halves):
        x0 = index * (HALF_PX + GAP_PX)
        draw.text((x0 + 8, 6), half.title[:44], font=font, fill=(255, 255, 255))
        patch: Image.Image | str = half.reason or "no image"
        if half.source is not None and half.camera is not None:
            try:
                patch = rectified(
                    open_stored(svc.files.root, half.source), half.camera, half.centre, span
                )
            except FileNotFoundError:
                patch = "the stored image is no longer in the data directory"
            except (OSError, ValueError, np.linalg.LinAlgError) as exc:
                patch = f"the stored image could not be shown: {exc}"
        if isinstance(patch, str):
            draw.rectangle((x0, BAND_PX, x0 + HALF_PX - 1, BAND_PX + HALF_PX - 1), fill=EMPTY)
            for row, line in enumerate(textwrap.wrap(patch, 44)[:8]):
                draw.text(
                    (x0 + 12, BAND_PX + 12 + 20 * row), line, font=small, fill=(255, 255, 255)
                )
            continue
        canvas.paste(patch, (x0, BAND_PX))
        if half.outline is not None:
            points = [_to_half(half.centre, span, lat, lon) for lat, lon in half.outline]
            draw.line([(x0 + x, BAND_PX + y) for x, y in points], fill=OUTLINE, width=2)
        else:  # no ground footprint (a corner above the horizon): a ring round the centre
            r = HALF_PX / 8
            c = HALF_PX / 2
            draw.ellipse(
                (x0 + c - r, BAND_PX + c - r, x0 + c + r, BAND_PX + c + r), outline=OUTLINE, width=2
            )
    out = io.BytesIO()
    canvas.save(out, format="JPEG", quality=92)
    return out.getvalue()


# -- intake -----------------------------------------------------------------------------------


async def _params(svc: Services, label: str, prompt: str) -> dict[str, Any]:
    """The job's parameters as an upload's are made: checked, then resolved over the default
    profile and the settings."""
    given = parse_options({"queries": [label], "prompt": prompt}, "the change description")
    return (await resolve(given, None, svc.profiles, svc.settings)).to_dict()


async def _enqueue(svc: Services, data: bytes, name: str, params: dict[str, Any]) -> int:
    """Queue the picture as an upload is: the image inspected and stored by content, the job
    enqueued and announced."""
    record = await store_image(svc, data)
    job_id, _ = await svc.queue.enqueue(
        record,
        params,
        input_name=name,
        source="api",
        max_attempts=svc.settings.max_attempts,
    )
    announce(svc, job_id, "api", name)
    return job_id

"""A flight's report as one self-contained HTML document (header, map, counts and sizes,
frames, answers, assumptions, changes) built from plain job and flight dicts; the map is drawn
by report_map, the style read from report.css and inlined, so the document refers to nothing
outside itself: it opens offline, prints, and converts to PDF as it is."""

from __future__ import annotations

import base64
import io
import json
import math
from collections import Counter
from collections.abc import Iterable, Mapping, Sequence
from datetime import UTC, datetime
from html import escape
from importlib import resources
from typing import Any

from PIL import Image

from service.annotate import PALETTE
from service.geo.report_map import (
    SVG_NS,
    ChangeMark,
    DetectionMark,
    Footprint,
    Layers,
    Point,
    map_section,
    swatch,
)

__all__ = ["SVG_NS", "render_report"]

MAX_IMAGE_PX = 1600  # longest side of an embedded frame: about 200 dpi across A4
# Inlined, never linked: the document must refer to nothing outside itself.
STYLE = resources.files("service.geo").joinpath("report.css").read_text(encoding="utf-8")
TALLIES = {
    "new": "new",
    "gone": "gone",
    "moved": "moved",
    "same": "unchanged",
    "unseen": "not seen again (outside this flight's frames)",
    "unseen_before": "outside the earlier flight's frames",
}


def render_report(
    flight: dict[str, Any],
    jobs: Sequence[dict[str, Any]],
    frames: Mapping[int, bytes],
    *,
    changes: dict[str, Any] | None = None,
    title: str | None = None,
    generated_at: str,
) -> str:
    """The report of `flight` (a flight summary dict) over its `jobs` (job view dicts);
    `frames` maps a job id to its annotated image (JPEG or PNG bytes), shown for the frames
    that hold detections; `changes` (a comparison with an earlier flight) adds its section
    and its marks on the map."""
    ordered = sorted(jobs, key=_capture_key)
    colours = _label_colours(flight, ordered)
    heading = title or f"Flight report: {flight.get('id', '')}"
    body = [
        _header(heading, flight, ordered, generated_at),
        map_section(_layers(ordered, changes), colours),
        _labels_section(flight, ordered, colours),
        _frame_list_section(ordered),
        _answers_section(ordered),
        _assumptions_section(ordered),
    ]
    if changes is not None:
        body.append(_changes_section(changes))
    body.append(_frames_section(ordered, frames, colours))
    body.append(
        '<footer class="notes"><p>Positions are WGS84 latitude and longitude. The map is a local '
        "east-north projection around the flight's centre, without background imagery. Ground "
        "positions and sizes assume the ground model stated under camera assumptions; "
        "&plusmn; is the 1-sigma horizontal uncertainty.</p>"
        f"<p>Generated {_when(generated_at)}.</p></footer>"
    )
    return (
        '<!DOCTYPE html>\n<html lang="en">\n<head>\n<meta charset="utf-8">\n'
        # Nothing here may load anything: should a reference ever slip in, the browser refuses it.
        '<meta http-equiv="Content-Security-Policy" content="default-src \'none\'; '
        "img-src data:; style-src 'unsafe-inline'\">\n"
        '<meta name="viewport" content="width=device-width, initial-scale=1">\n'
        f"<title>{_e(heading)}</title>\n<style>\n{STYLE}</style>\n</head>\n<body>\n"
        + "\n".join(body)
        + "\n</body>\n</html>\n"
    )


# --- reading the job dicts -------------------------------------------------------------------


def _result(job: Mapping[str, Any]) -> dict[str, Any]:
    result = job.get("result")
    return result if isinstance(result, dict) else {}


def _input(job: Mapping[str, Any]) -> dict[str, Any]:
    value = job.get("input")
    return value if isinstance(value, dict) else {}


def _frame_geo(job: Mapping[str, Any]) -> dict[str, Any] | None:
    geo = _result(job).get("geo")
    return geo if isinstance(geo, dict) else None


def _camera(job: Mapping[str, Any]) -> dict[str, Any] | None:
    geo = _frame_geo(job)
    camera = geo.get("camera") if geo else None
    return camera if isinstance(camera, dict) and _is_point(camera) else None


def _detections(job: Mapping[str, Any]) -> list[dict[str, Any]]:
    found = _result(job).get("detections")
    return [d for d in found if isinstance(d, dict)] if isinstance(found, list) else []


def _detection_geo(detection: Mapping[str, Any]) -> dict[str, Any] | None:
    geo = detection.get("geo")
    return geo if isinstance(geo, dict) and _is_point(geo) else None


def _is_point(value: Mapping[str, Any]) -> bool:
    return _finite(value.get("lat")) and _finite(value.get("lon"))


def _finite(value: Any) -> bool:
    return isinstance(value, int | float) and not isinstance(value, bool) and math.isfinite(value)


def _ring(value: Any) -> list[Point] | None:
    """A [[lon, lat], ...] ring, or None when it is not one."""
    if not isinstance(value, list) or len(value) < 3:
        return None
    ring: list[Point] = []
    for corner in value:
        if not (isinstance(corner, list | tuple) and len(corner) >= 2):
            return None
        if not (_finite(corner[0]) and _finite(corner[1])):
            return None
        ring.append((float(corner[0]), float(corner[1])))
    return ring


def _capture_key(job: Mapping[str, Any]) -> tuple[bool, str, int]:
    captured = _input(job).get("captured_at")
    job_id = job.get("id")
    return (
        not isinstance(captured, str),
        captured if isinstance(captured, str) else "",
        job_id if isinstance(job_id, int) else 0,
    )


def _name(job: Mapping[str, Any]) -> str:
    name = _input(job).get("name") or job.get("source_path")
    return str(name) if name else f"job {job.get('id')}"


def _label_colours(flight: Mapping[str, Any], jobs: Sequence[dict[str, Any]]) -> dict[str, str]:
    counts = _label_counts(flight, jobs)
    ranked = sorted(counts, key=lambda label: (-counts[label], label))
    return {
        label: "#{:02x}{:02x}{:02x}".format(*PALETTE[i % len(PALETTE)])
        for i, label in enumerate(ranked)
    }


def _label_counts(flight: Mapping[str, Any], jobs: Sequence[dict[str, Any]]) -> dict[str, int]:
    given = flight.get("counts")
    if isinstance(given, dict) and given:
        return {str(k): int(v) for k, v in given.items() if _finite(v)}
    counted = Counter(str(d.get("label", "")) for job in jobs for d in _detections(job))
    return dict(counted)


# --- formatting ------------------------------------------------------------------------------


def _e(value: Any) -> str:
    return escape(str(value), quote=True)


def _num(value: Any, digits: int = 1) -> str:
    return f"{value:,.{digits}f}" if _finite(value) else "–"


def _json(value: Any) -> str:
    return json.dumps(value, ensure_ascii=False, separators=(",", ":"), default=str)


def _cell(value: Any) -> str:
    if value is None:
        return ""
    if isinstance(value, str):
        return _e(value)
    if isinstance(value, bool):
        return "yes" if value else "no"
    if isinstance(value, int | float):
        return _e(value)
    return f"<code>{_e(_json(value))}</code>"


def _parse(value: Any) -> datetime | None:
    try:
        return datetime.fromisoformat(value) if isinstance(value, str) and value else None
    except ValueError:
        return None


def _when(value: Any) -> str:
    parsed = _parse(value)
    if parsed is None:
        return _e(value) if isinstance(value, str) and value else "–"
    if parsed.tzinfo is not None:
        return _e(parsed.astimezone(UTC).strftime("%Y-%m-%d %H:%M:%S UTC"))
    return _e(parsed.strftime("%Y-%m-%d %H:%M:%S"))


def _span(started: Any, ended: Any) -> str:
    first, last = _parse(started), _parse(ended)
    if first is None or last is None or (first.tzinfo is None) != (last.tzinfo is None):
        return f"{_when(started)} – {_when(ended)}"
    end = _when(ended)
    if first.tzinfo is not None:
        first, last = first.astimezone(UTC), last.astimezone(UTC)
    if first.date() == last.date():
        end = end.split(" ", 1)[1]  # the same day: its time alone
    minutes, seconds = divmod(round(abs((last - first).total_seconds())), 60)
    hours, minutes = divmod(minutes, 60)
    length = (
        f"{hours} h {minutes} min"
        if hours
        else f"{minutes} min {seconds} s"
        if minutes
        else f"{seconds} s"
    )
    return f"{_when(started)} – {end} <span class='muted'>({length})</span>"


def _area(value: Any) -> str:
    if not _finite(value):
        return "–"
    return f"{value:,.0f} m² ({value / 10_000:,.2f} ha)"


def _image_uri(data: bytes) -> str:
    data = _fitted(data)
    kind = "image/png" if data.startswith(b"\x89PNG") else "image/jpeg"
    return f"data:{kind};base64,{base64.b64encode(data).decode('ascii')}"


def _fitted(data: bytes) -> bytes:
    """The image as it is when it is small enough for a page, else a smaller JPEG of it: a
    report of a few dozen 20 MP frames would otherwise weigh hundreds of megabytes."""
    try:
        with Image.open(io.BytesIO(data)) as image:
            if max(image.size) <= MAX_IMAGE_PX:
                return data
            image.draft("RGB", (MAX_IMAGE_PX, MAX_IMAGE_PX))  # JPEG: decode at a fraction
            smaller = image.convert("RGB")
    except (OSError, ValueError, Image.DecompressionBombError):
        return data  # not an image Pillow reads: shown as given, or as a broken image
    smaller.thumbnail((MAX_IMAGE_PX, MAX_IMAGE_PX), Image.Resampling.LANCZOS)
    out = io.BytesIO()
    smaller.save(out, format="JPEG", quality=85)
    return out.getvalue()


# --- header ----------------------------------------------------------------------------------


def _header(
    heading: str, flight: Mapping[str, Any], jobs: Sequence[dict[str, Any]], generated_at: str
) -> str:
    frames = flight.get("frames", len(jobs))
    located = flight.get("located", sum(1 for job in jobs if _camera(job)))
    detections = sum(len(_detections(job)) for job in jobs)
    kind = "explicit" if flight.get("explicit") else "grouped by capture time and place"
    facts = [
        ("Flight", f"{_e(flight.get('id', ''))} <span class='muted'>({_e(kind)})</span>"),
        ("Time span", _span(flight.get("started"), flight.get("ended"))),
        ("Frames", _e(frames)),
        ("Located frames", _e(located)),
        ("Detections", _e(detections)),
        ("Area covered", _area(flight.get("area_m2"))),
        ("Generated", _when(generated_at)),
    ]
    items = "".join(f"<div><dt>{k}</dt><dd>{v}</dd></div>" for k, v in facts)
    return f'<header id="summary"><h1>{_e(heading)}</h1><dl class="facts">{items}</dl></header>'


# --- the map's layers ------------------------------------------------------------------------


def _layers(jobs: Sequence[dict[str, Any]], changes: dict[str, Any] | None) -> Layers:
    layers = Layers()
    for job in jobs:
        geo = _frame_geo(job)
        camera = _camera(job)
        if geo is None or camera is None:
            continue
        layers.path.append((float(camera["lon"]), float(camera["lat"])))
        ring = _ring(geo.get("footprint"))
        if ring:
            layers.footprints.append(Footprint(job.get("id"), _name(job), ring))
        for detection in _detections(job):
            at = _detection_geo(detection)
            if at:
                centre = (float(at["lon"]), float(at["lat"]))
                layers.detections.append(
                    DetectionMark(
                        job.get("id"), _name(job), detection, centre, _ring(at.get("footprint"))
                    )
                )
    layers.changes.extend(_change_marks(changes))
    return layers


# --- changes ---------------------------------------------------------------------------------


def _position(value: Any) -> Point | None:
    if isinstance(value, dict) and _is_point(value):
        return (float(value["lon"]), float(value["lat"]))
    return None


def _change_entries(changes: Mapping[str, Any] | None, kind: str) -> list[dict[str, Any]]:
    entries = changes.get(kind) if changes else None
    return [e for e in entries if isinstance(e, dict)] if isinstance(entries, list) else []


def _change_marks(
    changes: Mapping[str, Any] | None,
) -> Iterable[ChangeMark]:
    """Each change the map can draw."""
    for kind in ("new", "gone"):
        for entry in _change_entries(changes, kind):
            side = "after" if kind == "new" else "before"
            at = _position(entry) or _position(entry.get(side))
            if at:
                yield ChangeMark(kind, entry.get("label", ""), None, at)
    for entry in _change_entries(changes, "moved"):
        before, after = _position(entry.get("before")), _position(entry.get("after"))
        after = after or _position(entry)
        if after:
            yield ChangeMark("moved", entry.get("label", ""), before, after)


def _ref(entry: Mapping[str, Any], side: str | None = None) -> str:
    """'job 12 #3' from an entry's job id and detection number (on `side` when nested)."""
    source = entry.get(side) if side else entry
    if not isinstance(source, dict):
        return "–"
    prefix = f"{side}_" if side else ""
    job = source.get("job_id", source.get("job", entry.get(f"{prefix}job_id")))
    number = source.get("number", entry.get(f"{prefix}number"))
    if job is None:
        return "–"
    return f"job {_e(job)}" + (f" #{_e(number)}" if number is not None else "")


def _changes_section(changes: Mapping[str, Any]) -> str:
    given = changes.get("counts")
    counts: dict[str, Any] = given if isinstance(given, dict) else {}
    tallies = [(kind, counts.get(kind, len(_change_entries(changes, kind)))) for kind in TALLIES]
    tally = "".join(
        f'<div class="tally tally-{kind}" data-kind="{kind}"><b>{_e(n)}</b> {TALLIES[kind]}</div>'
        for kind, n in tallies
        if n or kind in ("new", "gone", "moved")
    )
    rows = []
    for kind in ("new", "gone", "moved"):
        for entry in _change_entries(changes, kind):
            if kind == "moved":
                at = _position(entry.get("after")) or _position(entry)
                before, after = _ref(entry, "before"), _ref(entry, "after")
                moved = _num(entry.get("distance_m"))
            else:
                side = "after" if kind == "new" else "before"
                at = _position(entry) or _position(entry.get(side))
                nested = isinstance(entry.get(side), dict)
                ref = _ref(entry, side) if nested else _ref(entry)
                before, after = ("–", ref) if kind == "new" else (ref, "–")
                moved = "–"
            lat, lon = (_num(at[1], 6), _num(at[0], 6)) if at else ("–", "–")
            rows.append(
                f'<tr class="change-row" data-kind="{kind}">'
                f'<td><span class="kind kind-{kind}">{kind}</span></td>'
                f"<td>{_e(entry.get('label', ''))}</td><td class='n'>{lat}</td>"
                f"<td class='n'>{lon}</td><td class='n'>{moved}</td>"
                f"<td>{before}</td><td>{after}</td></tr>"
            )
    table = (
        "<table><thead><tr><th>Change</th><th>Label</th><th>Latitude</th><th>Longitude</th>"
        "<th>Moved m</th><th>Earlier flight</th><th>This flight</th></tr></thead>"
        f"<tbody>{''.join(rows)}</tbody></table>"
        if rows
        else "<p>No detection is new, gone or moved.</p>"
    )
    return (
        f'<section id="changes"><h2>What changed since the earlier flight</h2>'
        f'<div class="tallies">{tally}</div>{table}</section>'
    )


# --- labels, frames, answers, assumptions ----------------------------------------------------


def _labels_section(
    flight: Mapping[str, Any], jobs: Sequence[dict[str, Any]], colours: Mapping[str, str]
) -> str:
    counts = _label_counts(flight, jobs)
    located = Counter(
        str(d.get("label", "")) for job in jobs for d in _detections(job) if _detection_geo(d)
    )
    given = flight.get("sizes")
    sizes: dict[str, Any] = given if isinstance(given, dict) else {}
    rows = []
    for label in sorted(counts, key=lambda name: (-counts[name], name)):
        found = sizes.get(label)
        size: dict[str, Any] = found if isinstance(found, dict) else {}
        rows.append(
            f'<tr data-label="{_e(label)}"><td>{swatch(colours.get(label, "#555"))}'
            f"{_e(label)}</td><td class='n'>{counts[label]}</td>"
            f"<td class='n'>{located.get(label, 0)}</td>"
            + "".join(f"<td class='n'>{_num(size.get(k))}</td>" for k in ("min", "median", "max"))
            + "</tr>"
        )
    body = "".join(rows) or '<tr><td colspan="6">No detections.</td></tr>'
    return (
        '<section id="labels"><h2>Counts and real sizes per label</h2>'
        '<table id="label-counts"><thead><tr><th>Label</th><th>Count</th><th>Located</th>'
        "<th>Smallest m</th><th>Median m</th><th>Largest m</th></tr></thead>"
        f"<tbody>{body}</tbody></table><p class='muted'>Count: every detection; located: those "
        "placed on the ground. Sizes are each located detection's longer side on the ground, in "
        "metres.</p></section>"
    )


def _located_text(job: Mapping[str, Any]) -> str:
    geo = _frame_geo(job)
    if geo is None:
        return '<span class="muted">no position computed</span>'
    if _camera(job) is None:
        return f'<span class="warn">not located: {_e(geo.get("reason", "unknown reason"))}</span>'
    return "located"


def _frame_list_section(jobs: Sequence[dict[str, Any]]) -> str:
    rows = []
    for index, job in enumerate(jobs, 1):
        camera = _camera(job) or {}
        geo = _frame_geo(job) or {}
        rows.append(
            f'<tr data-job="{_e(job.get("id"))}"><td class="n">{index}</td>'
            f"<td>{_e(_name(job))}</td><td>{_when(_input(job).get('captured_at'))}</td>"
            f"<td class='n'>{_num(camera.get('height_m'))}</td>"
            f"<td class='n'>{_num(camera.get('pitch'), 0)}</td>"
            f"<td class='n'>{_num(geo.get('gsd_cm'), 2)}</td>"
            f"<td class='n'>{len(_detections(job))}</td><td>{_located_text(job)}</td></tr>"
        )
    return (
        '<section id="frame-list"><h2>Frames</h2><table><thead><tr><th>#</th><th>Frame</th>'
        "<th>Captured</th><th>Height m</th><th>Pitch °</th><th>GSD cm/px</th>"
        "<th>Detections</th><th>Ground position</th></tr></thead>"
        f"<tbody>{''.join(rows)}</tbody></table></section>"
    )


def _frames_section(
    jobs: Sequence[dict[str, Any]], frames: Mapping[int, bytes], colours: Mapping[str, str]
) -> str:
    sections = [
        _frame(job, frames.get(job["id"]) if isinstance(job.get("id"), int) else None, colours)
        for job in jobs
        if _detections(job)
    ]
    if not sections:
        return '<section id="frames"><h2>Frames with detections</h2><p>None.</p></section>'
    return '<div id="frames">' + "".join(sections) + "</div>"


def _frame(job: Mapping[str, Any], image: bytes | None, colours: Mapping[str, str]) -> str:
    geo = _frame_geo(job) or {}
    camera = _camera(job)
    facts = [("Captured", _when(_input(job).get("captured_at"))), ("Job", _e(job.get("id")))]
    if camera:
        facts += [
            ("GSD", f"{_num(geo.get('gsd_cm'), 2)} cm/px"),
            ("Camera", f"{_num(camera['lat'], 6)}, {_num(camera['lon'], 6)}"),
            ("Height", f"{_num(camera.get('height_m'))} m above ground"),
            (
                "Pitch / yaw",
                f"{_num(camera.get('pitch'), 0)}° / {_num(camera.get('yaw'), 0)}°",
            ),
            ("Uncertainty", f"± {_num(geo.get('uncertainty_m'))} m at the centre"),
        ]
    else:
        facts.append(("Ground position", _located_text(job)))
    items = "".join(f"<div><dt>{k}</dt><dd>{v}</dd></div>" for k, v in facts)
    picture = (
        f'<img class="annotated" alt="{_e(_name(job))} with its detections" '
        f'src="{_image_uri(image)}">'
        if image
        else '<p class="muted">No annotated image.</p>'
    )
    rows = []
    for detection in _detections(job):
        label = str(detection.get("label", ""))
        at = _detection_geo(detection)
        head = (
            f'<tr data-label="{_e(label)}"><td class="n">{_e(detection.get("number", ""))}</td>'
            f"<td>{swatch(colours.get(label, '#555'))}{_e(label)}</td>"
        )
        if at:
            rows.append(
                head
                + f"<td class='n'>{_num(at['lat'], 6)}</td><td class='n'>{_num(at['lon'], 6)}</td>"
                + "".join(
                    f"<td class='n'>{_num(at.get(k), 2 if k != 'area_m2' else 1)}</td>"
                    for k in ("width_m", "height_m", "area_m2")
                )
                + f"<td class='n'>± {_num(at.get('uncertainty_m'))}</td></tr>"
            )
        else:
            geo_value = detection.get("geo")
            reason = geo_value.get("reason") if isinstance(geo_value, dict) else None
            rows.append(
                head
                + '<td colspan="6" class="muted">not located'
                + (f": {_e(reason)}" if reason else "")
                + "</td></tr>"
            )
    reasoning = _result(job).get("reasoning")
    said = (
        f'<div class="reasoning"><h4>Reasoning</h4><p>{_e(reasoning)}</p></div>'
        if isinstance(reasoning, str) and reasoning.strip()
        else ""
    )
    return (
        f'<section class="frame" id="frame-{_e(job.get("id"))}" data-job="{_e(job.get("id"))}">'
        f"<h2>Frame {_e(_name(job))}</h2><dl class='facts'>{items}</dl>{picture}"
        '<table class="frame-detections"><thead><tr><th>#</th><th>Label</th><th>Latitude</th>'
        "<th>Longitude</th><th>Width m</th><th>Height m</th><th>Area m²</th>"
        f"<th>Uncertainty m</th></tr></thead><tbody>{''.join(rows)}</tbody></table>{said}"
        "</section>"
    )


def _answers_section(jobs: Sequence[dict[str, Any]]) -> str:
    answered = [
        (job, answer) for job in jobs if isinstance(answer := _result(job).get("answer"), dict)
    ]
    if not answered:
        return '<section id="answers"><h2>Structured answers</h2><p>None.</p></section>'
    columns: list[str] = []
    for _, answer in answered:
        columns += [str(k) for k in answer if str(k) not in columns]
    head = "".join(f"<th>{_e(c)}</th>" for c in columns)
    rows = "".join(
        f'<tr data-job="{_e(job.get("id"))}"><td>{_e(_name(job))}</td>'
        + "".join(f"<td>{_cell(answer.get(c))}</td>" for c in columns)
        + "</tr>"
        for job, answer in answered
    )
    return (
        '<section id="answers"><h2>Structured answers</h2>'
        f'<table class="answers"><thead><tr><th>Frame</th>{head}</tr></thead>'
        f"<tbody>{rows}</tbody></table></section>"
    )


def _assumptions_section(jobs: Sequence[dict[str, Any]]) -> str:
    said: Counter[str] = Counter()
    reasons: Counter[str] = Counter()
    for job in jobs:
        geo = _frame_geo(job)
        if geo is None:
            continue
        assumptions = geo.get("assumptions")
        if isinstance(assumptions, list):
            said.update(dict.fromkeys(str(a) for a in assumptions if a).keys())
        if _camera(job) is None and geo.get("reason"):
            reasons[str(geo["reason"])] += 1
    items = "".join(
        f"<li>{_e(text)} <span class='muted'>({n} frame{'s' if n != 1 else ''})</span></li>"
        for text, n in said.items()
    )
    unlocated = "".join(
        f"<li>{_e(text)} <span class='muted'>({n} frame{'s' if n != 1 else ''})</span></li>"
        for text, n in reasons.items()
    )
    return (
        '<section id="assumptions"><h2>Camera assumptions</h2>'
        + (f"<ul>{items}</ul>" if items else "<p>No frame states any.</p>")
        + (f"<h3>Frames not located</h3><ul>{unlocated}</ul>" if unlocated else "")
        + "</section>"
    )

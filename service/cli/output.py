"""How client commands print: a job for a reader, tables, JSON only when asked, and the one
updating progress line (on a terminal's stderr only)."""

from __future__ import annotations

import io
import json
import shutil
import sys
import textwrap
import unicodedata
from typing import Any, TextIO


def printable(text: str) -> str:
    """`text` safe for a terminal: control and format characters (escape sequences a model or
    a file name could carry, bidi overrides) shown as U+FFFD; line breaks kept."""
    return "".join(
        "\ufffd" if c != "\n" and unicodedata.category(c) in ("Cc", "Cf") else c for c in text
    )


def print_json(value: Any, *, lines: bool = False) -> None:
    """Indented JSON, or one compact line per value (JSON Lines) when `lines`."""
    text = json.dumps(value, separators=(",", ":")) if lines else json.dumps(value, indent=2)
    print(text, flush=True)


def _where(exif: dict[str, Any]) -> str | None:
    gps = exif.get("gps")
    if not gps:
        return None
    text = f"{gps['latitude']:.6f}, {gps['longitude']:.6f}"
    if gps.get("altitude") is not None:
        text += f", {gps['altitude']:g} m"
    return text


def _model(identity: Any) -> str | None:
    if not isinstance(identity, dict) or not identity.get("id"):
        return None
    text = str(identity["id"])
    if identity.get("revision"):
        text += f" @{identity['revision']}"
    if identity.get("quantize"):
        text += f" q{identity['quantize']}"
    return text


def _when(stamp: str | None) -> str | None:
    """An API time (ISO 8601, UTC) as people read it."""
    return f"{stamp.replace('T', ' ')[:19]} UTC" if stamp else None


def _pack(items: list[str], width: int) -> list[str]:
    """Items joined by commas, broken into lines between items, never inside one."""
    lines = [""]
    for item in items:
        joined = f"{lines[-1]}, {item}" if lines[-1] else item
        if lines[-1] and len(joined) > width:
            lines[-1] += ","
            lines.append(item)
        else:
            lines[-1] = joined
    return lines


STAGES = ("queue_wait", "decode", "plan", "detect", "reason", "geo", "persist")


def _in_pipeline_order(timings: dict[str, Any]) -> list[tuple[str, Any]]:
    """Stages as a job goes through them, any the CLI does not know next, `total` last."""
    rank = {stage: i for i, stage in enumerate(STAGES)}
    return sorted(timings.items(), key=lambda kv: (kv[0] == "total", rank.get(kv[0], len(rank))))


def _options(params: dict[str, Any]) -> list[str]:
    """The aerial options a job set away from their defaults."""
    out = []
    tiling = params.get("tiling", "auto")
    if tiling != "auto":
        out.append(f"tiling {json.dumps(tiling) if isinstance(tiling, dict) else tiling}")
    if params.get("set_of_marks"):
        out.append("set-of-marks")
    if params.get("response_schema"):
        out.append("structured answer")
    if params.get("redact"):
        out.append("redact " + ", ".join(params["redact"]))
    if params.get("keep_original") is False:
        out.append("original not kept")
    if params.get("ground_elevation") is not None:
        out.append(f"ground {params['ground_elevation']:g} m above sea level")
    return out


def _ground(geo: dict[str, Any] | None) -> str | None:
    """The frame on the ground in a line: its centre, ground sample distance and accuracy."""
    if not geo:
        return None
    if geo.get("reason"):
        return f"not located: {geo['reason']}"
    centre = geo.get("centre")
    where = f"centre {centre['lat']:.6f}, {centre['lon']:.6f}" if centre else "centre unseen"
    gsd = f", {geo['gsd_cm']:.1f} cm/px" if geo.get("gsd_cm") else ""
    sigma = f", ±{geo['uncertainty_m']:.1f} m" if geo.get("uncertainty_m") else ""
    return where + gsd + sigma


def _placed(geo: dict[str, Any] | None) -> str:
    """A detection's place and real size after its box, when it has them."""
    if not geo or geo.get("lat") is None:
        return ""
    size = ""
    if geo.get("width_m") is not None:
        size = f", {geo['width_m']:.1f} x {geo['height_m']:.1f} m"
    return f"  at {geo['lat']:.6f}, {geo['lon']:.6f}{size}"


def _delivery(d: dict[str, Any]) -> str:
    """A webhook delivery: where, how it stands, and why not yet when it has not gone out."""
    tries = f"{d['attempts']} attempt{'' if d['attempts'] == 1 else 's'}"
    answer = f", HTTP {d['last_status']}" if d.get("last_status") is not None else ""
    text = f"{d['status']} to {d['url']} ({tries}{answer})"
    if d["status"] != "delivered" and d.get("last_error"):
        text += f": {d['last_error']}"
    if d["status"] == "pending" and d.get("next_attempt_at"):
        text += f"; next try {_when(d['next_attempt_at'])}"
    return text


def job_summary(job: dict[str, Any]) -> str:
    """One line: id, status, what it found, the input's name."""
    result = job.get("result")
    if result is not None:
        found = f"{len(result['detections'])} found"
    elif job.get("error"):
        found = job["error"]["code"]
    else:
        found = "-"
    return printable(f"job {job['id']}: {job['status']}, {found}, {job['input']['name']}")


def print_job(job: dict[str, Any], out: TextIO | None = None) -> None:
    """A job as a reader wants it: input and where it was taken, what was asked, which models
    answered, what they found, and how long each stage took."""
    target = out or sys.stdout
    out = io.StringIO()
    _write_job(job, out)
    target.write(printable(out.getvalue()))
    target.flush()


def _write_job(job: dict[str, Any], out: TextIO) -> None:
    width = min(shutil.get_terminal_size((100, 20)).columns, 100)
    attempt = f"attempt {job['attempts']} of {job['max_attempts']}"
    status = job["status"]
    if status == "running" and job.get("cancel_requested"):
        status = "running, cancel requested"
    print(f"job {job['id']}: {status} ({attempt})", file=out)
    rows: list[tuple[str, str | list[str] | None]] = []
    image = job["input"]
    size = f"{image['width']}x{image['height']} {image.get('format') or ''}".rstrip()
    pruned = "" if image.get("stored", True) else " (stored copy pruned)"
    rows.append(("input", f"{image['name']}  {size}, {image['bytes']:,} bytes{pruned}"))
    if job.get("source_path"):
        rows.append(("from", f"{job['source']}: {job['source_path']}"))
    rows.append(("flight", job.get("flight")))
    rows.append(("ground", _ground((job.get("result") or {}).get("geo"))))
    exif = image.get("exif") or {}
    rows.append(("captured", exif.get("captured_at")))
    camera = " ".join(str(exif[k]) for k in ("make", "model") if exif.get(k))
    rows.append(("camera", camera or None))
    rows.append(("gps", _where(exif)))
    extra = {k: v for k, v in exif.items() if k not in ("captured_at", "make", "model", "gps")}
    rows.append(("exif", [f"{k} {v}" for k, v in extra.items()]))
    params = job.get("params") or {}
    planned = (job.get("result") or {}).get("planned_queries")
    if params.get("plan"):
        proposed = ", ".join(planned) if planned is not None else "to be proposed"
        rows.append(("queries", f"proposed by the reasoner: {proposed}"))
    else:
        rows.append(("queries", [str(q) for q in params.get("queries") or []]))
    rows.append(("prompt", params.get("prompt")))
    rows.append(("profile", params.get("profile")))
    rows.append(("options", _options(params)))
    for role, identity in (job.get("models") or {}).items():
        rows.append((role, _model(identity)))
    times = [("created", job.get("created_at")), ("finished", job.get("finished_at"))]
    rows.append(("time", [f"{k} {_when(v)}" for k, v in times if v]))
    timings = job.get("timings_ms") or {}
    rows.append(("timings", [f"{k} {v:.0f} ms" for k, v in _in_pipeline_order(timings)]))
    if job.get("queue_position"):
        rows.append(("queue", f"position {job['queue_position']}"))
    if job.get("stage"):
        rows.append(("stage", job["stage"]))
    if job.get("error"):
        rows.append(("error", f"{job['error']['code']}: {job['error']['message']}"))
    rows.extend(("webhook", _delivery(d)) for d in job.get("webhooks") or [])
    for label, value in rows:
        if not value:
            continue
        room = width - 13
        lines = _pack(value, room) if isinstance(value, list) else textwrap.wrap(value, room)
        for i, line in enumerate(lines):
            print(f"  {label if i == 0 else '':<10} {line}", file=out)
    result = job.get("result")
    if result is None:
        return
    detections = result["detections"]
    tiling = result.get("tiling")
    tiles = f", {len(tiling['grid'])} tiles of {tiling['size']} px" if tiling else ""
    print(f"  detections ({len(detections)}{tiles})", file=out)
    label_width = max((len(d["label"]) for d in detections), default=0)
    cited = set(result.get("citations") or ())
    for d in detections:
        box = ", ".join(f"{v:g}" for v in d["box"])
        mark = "  (cited)" if d["number"] in cited else ""
        place = _placed(d.get("geo"))
        print(f"    {d['number']:>3}. {d['label']:<{label_width}}  [{box}]{place}{mark}", file=out)
    if result.get("answer") is not None:
        print("  answer", file=out)
        for line in json.dumps(result["answer"], indent=2, ensure_ascii=False).splitlines():
            print(f"    {line}", file=out)
    else:
        print("  reasoning", file=out)
        for paragraph in (result["reasoning"] or "(none)").splitlines() or [""]:
            for line in textwrap.wrap(paragraph, width - 4) or [""]:
                print(f"    {line}", file=out)
    _write_followups(job.get("followups") or [], width, out)


def _write_followups(followups: list[dict[str, Any]], width: int, out: TextIO) -> None:
    """Each question asked since, its state, and its answer or why it failed."""
    if not followups:
        return
    print(f"  follow-ups ({len(followups)})", file=out)
    for f in followups:
        model = _model(f.get("reasoner"))
        state = f"{f['status']}, {model}" if model else f["status"]
        for i, line in enumerate(textwrap.wrap(f"{f['question']} ({state})", width - 9)):
            print(f"    {str(f['n']) + '.' if i == 0 else '':>4} {line}", file=out)
        error = f.get("error")
        said = f"{error['code']}: {error['message']}" if error else f.get("answer")
        for paragraph in (said or "").splitlines():
            for line in textwrap.wrap(paragraph, width - 9) or [""]:
                print(f"         {line}", file=out)


class Progress:
    """One line on stderr that rewrites itself, shown only when stderr is a terminal."""

    def __init__(self, stream: TextIO | None = None) -> None:
        self.stream = stream or sys.stderr
        self.enabled = self.stream.isatty()
        self._shown = False

    def show(self, text: str) -> None:
        if not self.enabled:
            return
        width = shutil.get_terminal_size((80, 20)).columns - 1
        self.stream.write("\r\033[K" + text[:width])
        self.stream.flush()
        self._shown = True

    def clear(self) -> None:
        if self._shown:
            self.stream.write("\r\033[K")
            self.stream.flush()
            self._shown = False

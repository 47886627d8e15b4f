"""The benchmark table: one Row type, the ours-vs-baseline arithmetic, interleaved sampling,
and rendering as text, Markdown and JSON. Knows nothing about what is measured."""

from __future__ import annotations

import argparse
import dataclasses
import json
import math
import statistics
from collections.abc import Callable, Iterable, Mapping
from dataclasses import dataclass
from typing import Any

FIELDS = ("measure", "ours", "baseline", "ratio", "target", "met", "unit", "note")


@dataclass
class Row:
    """One line of the table. `ratio` is ours / baseline, both measured in the same run;
    `target` reads like "≥ 0.5" or "≤ 3" (empty when the issue sets none); `met` is None
    when there is no target or nothing was measured."""

    measure: str
    ours: float | None
    baseline: float | None
    ratio: float | None
    target: str
    met: bool | None
    unit: str = ""
    note: str = ""


def compare(
    measure: str,
    ours: float,
    baseline: float,
    *,
    unit: str,
    at_least: float | None = None,
    at_most: float | None = None,
    note: str = "",
) -> Row:
    """A row whose ratio is ours / baseline, judged against `at_least` (throughput-like) or
    `at_most` (time- or memory-like); neither: reported without a target."""
    ratio = ours / baseline if baseline else None
    target, met = "", None
    if at_least is not None:
        target = f"≥ {at_least:g}"
        met = ratio is not None and ratio >= at_least
    elif at_most is not None:
        target = f"≤ {at_most:g}"
        met = ratio is not None and ratio <= at_most
    return Row(measure, ours, baseline, ratio, target, met, unit, note)


def as_row(item: Row | Mapping[str, Any]) -> Row:
    """Benchmarks may return Rows or plain dicts with the same keys."""
    if isinstance(item, Row):
        return item
    missing = [key for key in FIELDS if key not in item and key not in ("unit", "note")]
    if missing:
        raise ValueError(f"a benchmark row lacks {', '.join(missing)}: {dict(item)!r}")
    target = item["target"]
    return Row(
        measure=str(item["measure"]),
        ours=_number(item["ours"]),
        baseline=_number(item["baseline"]),
        ratio=_number(item["ratio"]),
        target="" if target is None else str(target),
        met=None if item["met"] is None else bool(item["met"]),
        unit=str(item.get("unit") or ""),
        note=str(item.get("note") or ""),
    )


def _number(value: Any) -> float | None:
    return None if value is None else float(value)


def interleaved(
    candidates: Mapping[str, Callable[[], float]], repeats: int
) -> dict[str, list[float]]:
    """Run each candidate once per round, round after round (A, B, A, B, ...), so drift on a
    shared machine hits all of them alike; returns every sample per candidate."""
    samples: dict[str, list[float]] = {name: [] for name in candidates}
    for _ in range(repeats):
        for name, measure in candidates.items():
            samples[name].append(measure())
    return samples


def median(values: Iterable[float]) -> float:
    return float(statistics.median(values))


def percentile(values: Iterable[float], q: float) -> float:
    """Nearest-rank percentile, q in [0, 100]."""
    ordered = sorted(values)
    rank = max(0, min(len(ordered) - 1, math.ceil(q / 100 * len(ordered)) - 1))
    return ordered[rank]


def _fmt(value: float | None) -> str:
    if value is None or not math.isfinite(value):
        return "—"
    if value == 0 or abs(value) >= 100:
        return f"{value:,.0f}"
    return f"{value:.3g}" if abs(value) < 1 else f"{value:.2f}"


def _cells(row: Row) -> list[str]:
    met = {True: "met", False: "MISSED", None: "—"}[row.met]
    ratio = "—" if row.ratio is None else f"{row.ratio:.3g}"
    unit = f" {row.unit}" if row.unit else ""
    return [
        row.measure,
        _fmt(row.ours) + (unit if row.ours is not None else ""),
        _fmt(row.baseline) + (unit if row.baseline is not None else ""),
        ratio,
        row.target or "—",
        met,
        row.note,
    ]


HEADER = ["benchmark", "measure", "ours", "baseline", "ratio", "target", "met", "note"]


def markdown(sections: Mapping[str, list[Row]]) -> str:
    lines = [
        "| " + " | ".join(HEADER) + " |",
        "|" + "|".join(["---"] * 2 + ["---:"] * 3 + ["---"] * 3) + "|",
    ]
    for name, rows in sections.items():
        for row in rows:
            cells = [name, *_cells(row)]
            lines.append("| " + " | ".join(c.replace("|", "\\|") for c in cells) + " |")
    return "\n".join(lines)


def text(sections: Mapping[str, list[Row]], note_width: int = 60) -> str:
    """The terminal table; long notes are cut here (the Markdown and JSON keep them whole)."""
    body = []
    for name, rows in sections.items():
        for row in rows:
            cells = [name, *_cells(row)]
            if len(cells[-1]) > note_width:
                cells[-1] = cells[-1][: note_width - 1] + "…"
            body.append(cells)
    widths = [max(len(r[i]) for r in [HEADER, *body]) for i in range(len(HEADER))]
    right = {2, 3, 4}
    out = []
    for cells in [HEADER, ["-" * w for w in widths], *body]:
        out.append(
            "  ".join(
                c.rjust(w) if i in right else c.ljust(w)
                for i, (c, w) in enumerate(zip(cells, widths, strict=True))
            ).rstrip()
        )
    return "\n".join(out)


def as_json(sections: Mapping[str, list[Row]], header: Mapping[str, Any]) -> str:
    return json.dumps(
        {
            **header,
            "benchmarks": {
                name: [dataclasses.asdict(row) for row in rows] for name, rows in sections.items()
            },
        },
        indent=2,
        ensure_ascii=False,
    )


def main_for(name: str, run: Callable[[bool], list[Any]], doc: str | None) -> None:
    """`python -m bench.<name>_bench [--quick]`: one benchmark alone, its rows printed."""
    parser = argparse.ArgumentParser(description=(doc or name).splitlines()[0])
    parser.add_argument("--quick", action="store_true", help="fewer samples, smaller sizes")
    args = parser.parse_args()
    rows = [as_row(r) for r in run(args.quick)]
    print(text({name: rows}, note_width=10_000))

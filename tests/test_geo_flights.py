"""Flights: names, capture gaps, take-off height, auto ids, covered area, counts and sizes."""

import json
import random

import pytest

from service.geo.flights import FlightFrame, group_flights
from tests import geo_frames

LAT0, LON0 = 51.5, -0.12


def lonlat(east: float, north: float) -> list[float]:
    return geo_frames.lonlat(east, north, (LAT0, LON0))


def square(east: float, north: float, side: float) -> list[list[float]]:
    return geo_frames.square(east, north, side, (LAT0, LON0))


def job(
    job_id: int,
    *,
    flight: str | None = None,
    captured_at: str | None = None,
    takeoff: float | None = None,
    footprint: list[list[float]] | None = None,
    detections: tuple[tuple[str, float | None], ...] = (),
) -> dict:
    """A job view dict in GEO.md's shape; detections are (label, size in metres or None)."""
    exif = None
    if takeoff is not None:
        exif = {
            "captured_at": captured_at.replace("-", ":", 2).replace("T", " ")
            if captured_at
            else None,
            "gps": {"latitude": LAT0, "longitude": LON0, "altitude": takeoff + 80.0},
            "dji": {"relative_altitude": 80.0, "absolute_altitude": takeoff + 80.0},
        }
    dets = []
    for number, (label, size) in enumerate(detections, start=1):
        geo: dict = {"reason": "the box centre is above the horizon"}
        if size is not None:
            lon, lat = lonlat(0, 0)
            geo = {"lat": lat, "lon": lon, "footprint": None, "width_m": size, "height_m": size / 2}
            geo |= {"area_m2": size * size / 2, "distance_m": 80.0, "uncertainty_m": 2.0}
        dets.append({"number": number, "label": label, "box": [0, 0, 10, 10], "geo": geo})
    frame_geo: dict = {"reason": "no GPS position in EXIF", "assumptions": []}
    if footprint is not None:
        frame_geo = {"camera": {"lat": LAT0, "lon": LON0}, "footprint": footprint, "gsd_cm": 2.0}
    return {
        "id": job_id,
        "status": "succeeded",
        "flight": flight,
        "input": {"name": f"DJI_{job_id:04d}.JPG", "captured_at": captured_at, "exif": exif},
        "result": {"detections": dets, "geo": frame_geo},
    }


def frames(*jobs: dict) -> list[FlightFrame]:
    return [FlightFrame.from_job(j) for j in jobs]


def by_id(flights: list) -> dict:
    return {f.id: f for f in flights}


def test_from_job_reads_the_geo_md_shape() -> None:
    full = job(
        7,
        flight=" site-a/f1 ",
        captured_at="2026-11-23T08:00:05",
        takeoff=40.3,
        footprint=square(0, 0, 100),
        detections=(("car", 4.0), ("car", None), ("person", 0.6)),
    )
    frame = FlightFrame.from_job(full)
    assert frame.job_id == 7
    assert frame.flight == "site-a/f1"
    assert frame.captured_at == "2026-11-23T08:00:05"
    assert (frame.lat, frame.lon) == (LAT0, LON0)
    assert frame.takeoff_altitude == pytest.approx(40.3)
    assert frame.footprint == square(0, 0, 100)
    assert frame.labels == ("car", "car", "person")
    assert frame.sizes == (4.0, None, 0.6)

    # The capture time falls back to EXIF's own format.
    full["input"]["captured_at"] = None
    assert FlightFrame.from_job(full).captured_at == "2026-11-23T08:00:05"

    bare = FlightFrame.from_job({"id": 8})
    assert bare == FlightFrame(job_id=8)
    junk = {"id": 9, "flight": "", "input": {"captured_at": "yesterday", "exif": {"gps": "x"}}}
    junk["result"] = {"detections": [{"label": "car", "geo": None}], "geo": {"footprint": [[1, 2]]}}
    frame = FlightFrame.from_job(junk)
    assert (frame.flight, frame.captured_at, frame.footprint, frame.lat) == (None, None, None, None)
    assert (frame.labels, frame.sizes) == (("car",), (None,))


def test_explicit_flights_are_never_split() -> None:
    flights = group_flights(
        frames(
            job(1, flight="f1", captured_at="2026-11-23T08:00:00", takeoff=35.0),
            job(2, flight="f1", captured_at="2026-11-23T11:00:00", takeoff=90.0),
            job(3, flight="f1"),
            job(4, flight="f2", captured_at="2026-11-23T09:00:00"),
        )
    )
    assert [f.id for f in flights] == ["f2", "f1"]
    f1 = by_id(flights)["f1"]
    assert f1.explicit
    assert f1.job_ids == [1, 2, 3]
    assert (f1.frames, f1.started, f1.ended) == (3, "2026-11-23T08:00:00", "2026-11-23T11:00:00")


def test_capture_gaps_split_automatic_flights() -> None:
    flights = group_flights(
        frames(
            job(1, captured_at="2026-11-23T08:00:00"),
            job(2, captured_at="2026-11-23T08:00:05"),
            job(3, captured_at="2026-11-23T08:10:05"),  # exactly 600 s later: same flight
            job(4, captured_at="2026-11-23T08:20:06"),  # 601 s later: a new flight
            job(5, captured_at="2026-11-23T08:21:00"),
        )
    )
    assert [(f.id, f.job_ids, f.explicit) for f in flights] == [
        ("auto-20261123-082006", [4, 5], False),
        ("auto-20261123-080000", [1, 2, 3], False),
    ]
    assert flights[1].ended == "2026-11-23T08:10:05"
    # A smaller gap threshold splits more.
    assert (
        len(
            group_flights(
                frames(
                    job(1, captured_at="2026-11-23T08:00:00"),
                    job(2, captured_at="2026-11-23T08:02:00"),
                ),
                gap_s=60,
            )
        )
        == 2
    )


def test_takeoff_altitude_splits_and_tolerates_unknowns() -> None:
    flights = group_flights(
        frames(
            job(1, captured_at="2026-11-23T08:00:00", takeoff=35.0),
            job(2, captured_at="2026-11-23T08:01:00", takeoff=45.0),  # 10 m: same site
            job(3, captured_at="2026-11-23T08:02:00"),  # unknown altitude: continues
            job(4, captured_at="2026-11-23T08:03:00", takeoff=70.0),  # 25 m: another site
            job(5, captured_at="2026-11-23T08:04:00", takeoff=71.0),
        )
    )
    assert [(f.id, f.job_ids) for f in flights] == [
        ("auto-20261123-080300", [4, 5]),
        ("auto-20261123-080000", [1, 2, 3]),
    ]


def test_two_drones_at_once_from_two_sites_stay_two_flights() -> None:
    jobs = []
    for i in range(6):
        when = f"2026-11-23T08:00:{i * 5:02d}"
        jobs.append(job(10 + i, captured_at=when, takeoff=35.0))
        jobs.append(job(20 + i, captured_at=when, takeoff=90.0))
    flights = group_flights(frames(*jobs))
    # Both start in the same second: the second in order gets the -2 suffix.
    assert [(f.id, f.job_ids) for f in flights] == [
        ("auto-20261123-080000", list(range(10, 16))),
        ("auto-20261123-080000-2", list(range(20, 26))),
    ]


def test_frames_with_no_name_and_no_time_belong_to_no_flight() -> None:
    flights = group_flights(frames(job(1), job(2, captured_at="2026-11-23T08:00:00"), job(3)))
    assert [f.job_ids for f in flights] == [[2]]
    assert group_flights([]) == []


def test_auto_ids_never_collide_with_each_other_or_explicit_names() -> None:
    flights = group_flights(
        frames(
            job(1, flight="auto-20261123-080000", captured_at="2026-11-22T07:00:00"),
            job(2, captured_at="2026-11-23T08:00:00", takeoff=35.0),
            job(3, captured_at="2026-11-23T08:00:00", takeoff=90.0),
        )
    )
    ids = [f.id for f in flights]
    assert ids == ["auto-20261123-080000-2", "auto-20261123-080000-3", "auto-20261123-080000"]
    assert [f.job_ids for f in flights] == [[2], [3], [1]]
    assert len(set(ids)) == len(ids)


def test_order_is_newest_first_and_deterministic() -> None:
    jobs = [job(i, captured_at=f"2026-11-{10 + i:02d}T08:00:00", takeoff=35.0) for i in range(1, 8)]
    jobs += [job(50, flight="undated"), job(51, flight="also undated")]
    expected = [f.to_dict() for f in group_flights(frames(*jobs))]
    assert [d["id"] for d in expected][:3] == [
        "auto-20261117-080000",
        "auto-20261116-080000",
        "auto-20261115-080000",
    ]
    assert [d["id"] for d in expected][-2:] == ["also undated", "undated"]
    for seed in range(5):
        shuffled = jobs[:]
        random.Random(seed).shuffle(shuffled)
        assert [f.to_dict() for f in group_flights(frames(*shuffled))] == expected


def test_area_is_the_union_of_overlapping_footprints() -> None:
    # Two 100 m squares, 50 m apart: union 150 m x 100 m, not the 20 000 m² sum.
    flights = group_flights(
        frames(
            job(1, flight="f", footprint=square(0, 0, 100)),
            job(2, flight="f", footprint=square(50, 0, 100)),
            job(3, flight="f"),
        )
    )
    (flight,) = flights
    assert flight.located == 2
    assert flight.area_m2 == pytest.approx(15_000, rel=0.005)
    assert flight.bbox is not None
    west, south, east, north = flight.bbox
    assert (west, south) == pytest.approx(lonlat(-50, -50), abs=1e-6)
    assert (east, north) == pytest.approx(lonlat(100, 50), abs=1e-6)
    # A disjoint third square adds its own area.
    flights = group_flights(
        frames(
            job(1, flight="f", footprint=square(0, 0, 100)),
            job(2, flight="f", footprint=square(50, 0, 100)),
            job(3, flight="f", footprint=square(1000, 0, 20)),
        )
    )
    assert flights[0].area_m2 == pytest.approx(15_400, rel=0.005)


def test_counts_and_sizes_per_label() -> None:
    (flight,) = group_flights(
        frames(
            job(1, flight="f", detections=(("car", 4.0), ("car", 5.0), ("person", 0.6))),
            job(2, flight="f", detections=(("car", None), ("truck", None), ("car", 9.0))),
        )
    )
    assert flight.counts == {"car": 4, "person": 1, "truck": 1}
    assert flight.sizes == {
        "car": {"min": 4.0, "median": 5.0, "max": 9.0},
        "person": {"min": 0.6, "median": 0.6, "max": 0.6},
    }
    data = flight.to_dict()
    assert list(data) == [
        "id",
        "explicit",
        "started",
        "ended",
        "frames",
        "located",
        "area_m2",
        "bbox",
        "counts",
        "sizes",
        "job_ids",
    ]
    assert json.loads(json.dumps(data)) == data
    assert data["bbox"] is None and data["area_m2"] == 0.0


def test_many_frames_group_in_one_pass() -> None:
    jobs = [
        job(
            i,
            captured_at=f"2026-11-23T{8 + i // 3600:02d}:{i // 60 % 60:02d}:{i % 60:02d}",
            takeoff=35.0,
            footprint=square(i % 100 * 10, i // 100 * 10, 30),
        )
        for i in range(2000)
    ]
    (flight,) = group_flights(frames(*jobs))
    assert flight.frames == flight.located == 2000
    # 100 x 20 squares on a 10 m grid, each 30 m wide: (99*10 + 30) x (19*10 + 30) m.
    assert flight.area_m2 == pytest.approx(1020 * 220, rel=0.005)

"""Change detection on two synthetic flights: exactly the planted new, gone and moved objects."""

import json
import math

import geojson
import numpy as np
import pytest
import shapely
from scipy.optimize import linear_sum_assignment

from service.geo.changes import _assign, _holders, compare, tolerance_m
from service.geo.flights import LocalPlane
from tests import geo_frames

LAT0, LON0 = -33.86, 151.21


def lonlat(east: float, north: float) -> list[float]:
    return geo_frames.lonlat(east, north, (LAT0, LON0))


def square(east: float, north: float, side: float) -> list[list[float]]:
    return geo_frames.square(east, north, side, (LAT0, LON0))


class Flight:
    """Builds job view dicts (GEO.md shape) and remembers where each named object went."""

    def __init__(self) -> None:
        self.jobs: list[dict] = []
        self.refs: dict[str, tuple[int, int]] = {}

    def frame(self, job_id: int, footprint: list[list[float]] | None) -> None:
        geo = {"camera": {"lat": LAT0, "lon": LON0}, "footprint": footprint, "gsd_cm": 2.0}
        result: dict = {
            "detections": [],
            "geo": geo if footprint else {"reason": "no GPS position"},
        }
        self.jobs.append({"id": job_id, "status": "succeeded", "result": result})

    def put(self, name: str, label: str, east: float, north: float, u: float = 1.0) -> None:
        """Place a detection in the latest frame, `u` metres of 1-sigma uncertainty."""
        job = self.jobs[-1]
        detections = job["result"]["detections"]
        number = len(detections) + 1
        lon, lat = lonlat(east, north)
        geo = {"lat": lat, "lon": lon, "footprint": None, "width_m": 4.0, "height_m": 2.0}
        geo |= {"area_m2": 8.0, "distance_m": 80.0, "uncertainty_m": u}
        detections.append({"number": number, "label": label, "box": [0, 0, 9, 9], "geo": geo})
        self.refs[name] = (job["id"], number)

    def unlocated(self, label: str) -> None:
        detections = self.jobs[-1]["result"]["detections"]
        geo = {"reason": "the box centre is above the horizon"}
        detections.append({"number": len(detections) + 1, "label": label, "geo": geo})


def side(entry: dict, which: str) -> tuple[int, int]:
    return (entry[which]["job_id"], entry[which]["number"])


def outcome(result: dict) -> dict[str, set]:
    """Each kind as a set of (label, before ref, after ref)."""
    found: dict[str, set] = {}
    for kind in ("new", "gone", "moved", "same", "unseen", "unseen_before"):
        found[kind] = {
            (
                e["label"],
                side(e, "before") if e["before"] else None,
                side(e, "after") if e["after"] else None,
            )
            for e in result[kind]
        }
    return found


def planted() -> tuple[Flight, Flight]:
    # Before: two frames covering east -110..110, north -60..60.
    before = Flight()
    before.frame(101, square(-50, 0, 120))
    before.put("S1", "car", 0, 0)
    before.put("S2", "person", -40, -30)
    before.put("G1", "car", -20, 40)
    before.put("M2", "truck", -60, 10)
    before.put("L", "car", -80, -40)
    before.put("F", "car", -30, -10)
    before.unlocated("car")
    before.frame(102, square(50, 0, 120))
    before.put("S3", "car", 20, 20)
    before.put("M1", "car", 10, -25)
    before.put("G2", "person", 30, -50)
    before.put("U1", "car", 80, 0)  # the after flight never images east of 35 m
    before.frame(103, None)  # a frame without a pose adds no coverage

    # After: east -85..35 by north -60..60, and a frame further north (-30..30 by 60..120).
    after = Flight()
    after.frame(201, square(-25, 0, 120))
    after.put("S1", "car", 0.5, -0.5)  # jitter within two sigma (2.83 m)
    after.put("S2", "person", -40.8, -29.5)
    after.put("S3", "car", 21.2, 20.9)
    after.put("M1", "car", 10, -17)  # moved 8 m
    after.put("M2", "truck", -66, 10)  # moved 6 m
    after.put("N1", "truck", -10, -45)
    after.put("N2", "car", 5, 50)
    after.put("L", "van", -80, -40.3)  # same place, other label: never a match
    after.put("F", "car", -30, 10)  # 20 m away: beyond the move limit, so gone + new
    after.frame(202, square(0, 90, 60))
    after.put("UB", "car", 0, 100)  # north of anything the before flight imaged
    return before, after


def test_finds_exactly_the_planted_changes() -> None:
    before, after = planted()
    result = compare(before.jobs, after.jobs).to_dict()
    b, a = before.refs, after.refs
    assert outcome(result) == {
        "same": {
            ("car", b["S1"], a["S1"]),
            ("person", b["S2"], a["S2"]),
            ("car", b["S3"], a["S3"]),
        },
        "moved": {("car", b["M1"], a["M1"]), ("truck", b["M2"], a["M2"])},
        "gone": {("car", b["G1"], None), ("person", b["G2"], None), ("car", b["L"], None)}
        | {("car", b["F"], None)},
        "new": {("truck", None, a["N1"]), ("car", None, a["N2"]), ("van", None, a["L"])}
        | {("car", None, a["F"])},
        "unseen": {("car", b["U1"], None)},
        "unseen_before": {("car", None, a["UB"])},
    }
    assert result["counts"] == {
        "new": 4,
        "gone": 4,
        "moved": 2,
        "same": 3,
        "unseen": 1,
        "unseen_before": 1,
    }
    moves = {e["label"]: e for e in result["moved"]}
    assert moves["car"]["distance_m"] == pytest.approx(8.0, abs=0.02)
    assert moves["truck"]["distance_m"] == pytest.approx(6.0, abs=0.02)
    assert moves["car"]["tolerance_m"] == pytest.approx(2 * math.sqrt(2), abs=0.01)
    # Gone and new name the other flight's frames that imaged the spot.
    gone = {side(e, "before"): e for e in result["gone"]}
    assert gone[b["G1"]]["covered_by"] == [201]
    new = {side(e, "after"): e for e in result["new"]}
    assert new[a["L"]]["covered_by"] == [101]
    assert new[a["N2"]]["covered_by"] == [101, 102]
    assert json.loads(json.dumps(result)) == result


def test_geojson_is_valid_and_in_lon_lat_order() -> None:
    before, after = planted()
    collection = compare(before.jobs, after.jobs).to_geojson()
    parsed = geojson.loads(json.dumps(collection))
    assert parsed.is_valid, parsed.errors()
    features = collection["features"]
    kinds = [f["properties"]["change"] for f in features]
    assert sorted(kinds) == ["gone"] * 4 + ["moved"] * 2 + ["new"] * 4
    for feature in features:
        coordinates = feature["geometry"]["coordinates"]
        points = coordinates if feature["geometry"]["type"] == "LineString" else [coordinates]
        for lon, lat in points:
            assert lon == pytest.approx(LON0, abs=0.01) and lat == pytest.approx(LAT0, abs=0.01)
    (car_move,) = [
        f
        for f in features
        if f["properties"]["change"] == "moved" and f["properties"]["label"] == "car"
    ]
    assert car_move["geometry"]["type"] == "LineString"
    assert car_move["geometry"]["coordinates"] == [
        pytest.approx(lonlat(10, -25), abs=1e-7),
        pytest.approx(lonlat(10, -17), abs=1e-7),
    ]
    assert car_move["properties"]["distance_m"] == pytest.approx(8.0, abs=0.02)
    assert car_move["properties"]["before_job"] == 102


def test_labels_never_match_across() -> None:
    before, after = Flight(), Flight()
    before.frame(1, square(0, 0, 100))
    before.put("x", "car", 0, 0)
    after.frame(2, square(0, 0, 100))
    after.put("x", "truck", 0, 0)
    counts = compare(before.jobs, after.jobs).to_dict()["counts"]
    assert (counts["same"], counts["moved"], counts["gone"], counts["new"]) == (0, 0, 1, 1)


def test_a_still_object_is_not_traded_for_two_moves() -> None:
    # X1 and Y1 are one still car; pairing X1-Y2 and X2-Y1 would make more matches (two moves),
    # but the still pair comes first.
    before, after = Flight(), Flight()
    before.frame(1, square(0, 0, 100))
    before.put("X1", "car", 0, 0)
    before.put("X2", "car", 10, 0)
    after.frame(2, square(0, 0, 100))
    after.put("Y1", "car", 0.5, 0)
    after.put("Y2", "car", -12, 0)
    found = outcome(compare(before.jobs, after.jobs).to_dict())
    assert found["same"] == {("car", (1, 1), (2, 1))}
    assert found["moved"] == set()
    assert found["gone"] == {("car", (1, 2), None)}
    assert found["new"] == {("car", None, (2, 2))}


def test_tolerance_grows_with_uncertainty_and_move_limit_is_honoured() -> None:
    assert tolerance_m(1.0, 1.0) == pytest.approx(2 * math.sqrt(2))
    assert tolerance_m(0.1, 0.0) == 1.0
    assert tolerance_m(0.1, 0.0, min_tolerance_m=0.0) == pytest.approx(0.2)

    def run(u: float, offset: float, **options: float) -> dict:
        before, after = Flight(), Flight()
        before.frame(1, square(0, 0, 100))
        before.put("a", "car", 0, 0, u=u)
        after.frame(2, square(0, 0, 100))
        after.put("a", "car", offset, 0, u=u)
        return compare(before.jobs, after.jobs, **options).to_dict()["counts"]

    assert run(2.5, 6.0)["same"] == 1  # tolerance 7.07 m
    assert run(1.0, 6.0)["moved"] == 1
    assert run(1.0, 6.0, move_limit_m=5.0)["gone"] == 1
    assert run(0.0, 0.9)["same"] == 1  # the 1 m floor
    assert run(0.0, 0.9, min_tolerance_m=0.5)["moved"] == 1


def test_no_coverage_means_nothing_is_called_new_or_gone() -> None:
    before, after = Flight(), Flight()
    before.frame(1, None)
    before.put("a", "car", 0, 0)
    after.frame(2, None)
    after.put("b", "car", 40, 0)
    counts = compare(before.jobs, after.jobs).to_dict()["counts"]
    assert counts == {"new": 0, "gone": 0, "moved": 0, "same": 0, "unseen": 1, "unseen_before": 1}
    empty = compare([], [])
    assert empty.to_dict()["counts"]["same"] == 0
    assert empty.to_geojson() == {"type": "FeatureCollection", "features": []}


def test_moves_pair_up_as_many_objects_as_possible() -> None:
    # X1-Y1 is the closest pair, but taking it would leave X2 and Y2 (18 m apart) unexplained;
    # X1-Y2 (8 m) and X2-Y1 (5 m) account for every object.
    before, after = Flight(), Flight()
    before.frame(1, square(0, 0, 100))
    before.put("X1", "car", 0, 0, u=0.0)
    before.put("X2", "car", 10, 0, u=0.0)
    after.frame(2, square(0, 0, 100))
    after.put("Y1", "car", 5, 0, u=0.0)
    after.put("Y2", "car", -8, 0, u=0.0)
    found = outcome(compare(before.jobs, after.jobs).to_dict())
    assert found["moved"] == {("car", (1, 1), (2, 2)), ("car", (1, 2), (2, 1))}
    assert found["gone"] == found["new"] == set()


def _random_flight(seed: int, first_job: int) -> list[tuple[int, list[list[float]]]]:
    """Overlapping footprints: squares, a few rotated quadrilaterals and one bow-tie."""
    rng = np.random.default_rng(seed)
    frames = []
    for k in range(40):
        east, north = rng.uniform(-200, 200, 2)
        ring = square(float(east), float(north), float(rng.uniform(20, 150)))
        if k % 7 == 3:  # corners 1 and 2 swapped: a crossed ring, made valid
            ring = [ring[0], ring[2], ring[1], ring[3], ring[0]]
        frames.append((first_job + k, ring))
    frames.append((first_job, square(0, 0, 30)))  # a job with two footprints
    return frames


@pytest.mark.parametrize("seed", [1, 2, 3])
def test_coverage_matches_each_footprint_tested_on_its_own(seed: int) -> None:
    frames = _random_flight(seed, 500)
    plane = LocalPlane.around(
        [p[0] for _, r in frames for p in r], [p[1] for _, r in frames for p in r]
    )
    rng = np.random.default_rng(seed + 10)
    xy = np.vstack(
        [rng.uniform(-260, 260, (300, 2)), plane.project(*zip(*frames[0][1], strict=True))]
    )
    shapes = [(job, plane.union([ring])) for job, ring in frames]
    expected = [
        tuple(sorted({job for job, shape in shapes if shape.covers(shapely.Point(x, y))}))
        for x, y in xy.tolist()
    ]
    assert _holders(plane, frames, xy) == expected
    assert any(len(jobs) > 1 for jobs in expected) and () in expected


@pytest.mark.parametrize("seed", range(6))
def test_cluster_by_cluster_assignment_is_a_global_optimum(seed: int) -> None:
    rng = np.random.default_rng(seed)
    n_rows, n_cols = 60, 50
    rows = rng.integers(0, n_rows, 400)
    cols = rng.integers(0, n_cols, 400)
    pairs = np.unique(np.column_stack([rows, cols]), axis=0)
    rows, cols = pairs[:, 0], pairs[:, 1]
    cost = rng.uniform(0, 10, len(rows))
    allowed = rng.uniform(size=len(rows)) < [0.05, 0.2, 0.5, 1.0, 0.02, 0.1][seed]
    chosen = _assign(rows, cols, cost, allowed)
    assert all(allowed[chosen])
    assert len(set(rows[chosen].tolist())) == len(set(cols[chosen].tolist())) == len(chosen)
    missing = float(cost[allowed].sum()) + 1.0
    matrix = np.full((n_rows, n_cols), missing)
    matrix[rows[allowed], cols[allowed]] = cost[allowed]
    r, c = linear_sum_assignment(matrix)
    best = matrix[r, c] < missing
    assert len(chosen) == int(best.sum())
    assert float(cost[chosen].sum()) == pytest.approx(float(matrix[r, c][best].sum()), rel=1e-12)

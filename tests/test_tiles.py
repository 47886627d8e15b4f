"""Tiled detection: the tile geometry and seam merging as properties over generated frames and
boxes; whole tiled runs through a hand-written detector that only sees its crop (objects drawn
as solid colours, found by their pixels), and through the real tiny Falcon Perception."""

from __future__ import annotations

import asyncio
import itertools
import random
from collections.abc import Sequence
from typing import Any

import numpy as np
import pytest
from hypothesis import given, settings
from hypothesis import strategies as st
from PIL import Image

from service.detection import Detection, decode_mask, encode_mask
from service.errors import InvalidInput
from service.models.host import ModelHost
from service.tiled import detect_tiled
from service.tiles import (
    NATIVE_SIDE_FALLBACK,
    TileSpec,
    grid,
    merge,
    overlap_of_smaller,
    parse_tiling,
    spec_for,
    to_frame,
)

PROPERTY = settings(deadline=None, max_examples=150)  # two shared cores: latency varies

# -- tiling options -----------------------------------------------------------------------------


@pytest.mark.parametrize(
    ("raw", "expected"),
    [
        ("auto", "auto"),
        (" OFF ", "off"),
        ('"auto"', "auto"),
        ({"size": 512, "overlap": 64}, {"size": 512, "overlap": 64, "full_frame": True}),
        ('{"size": 640, "full_frame": false}', {"size": 640, "overlap": 80, "full_frame": False}),
        ({"size": 128.0, "overlap": 64, "full_frame": True}, {"size": 128, "overlap": 64,
                                                               "full_frame": True}),
    ],
)  # fmt: skip
def test_parse_tiling_normalizes(raw: Any, expected: Any) -> None:
    assert parse_tiling(raw) == expected
    assert parse_tiling(parse_tiling(raw)) == expected


@pytest.mark.parametrize(
    "raw",
    [
        None, "", "on", "{", 3, [512], '"tiles"', {"overlap": 10}, {"size": 127},
        {"size": 4097}, {"size": 512, "overlap": 257}, {"size": 512, "overlap": -1},
        {"size": True}, {"size": 512.5}, {"size": "512"}, {"size": 512, "full_frame": 1},
        {"size": 512, "stride": 64},
    ],
)  # fmt: skip
def test_parse_tiling_refuses(raw: Any) -> None:
    with pytest.raises(InvalidInput) as refused:
        parse_tiling(raw)
    assert refused.value.code == "invalid_tiling"


def test_spec_for() -> None:
    assert spec_for((992, 700), "auto", 992) is None
    assert spec_for((5472, 3648), "off", 992) is None
    assert spec_for((993, 10), "auto", 992) == TileSpec(992, 124, True)
    assert spec_for((5472, 3648), "auto", NATIVE_SIDE_FALLBACK) == TileSpec(992, 124, True)
    given_spec = {"size": 512, "overlap": 0, "full_frame": False}
    assert spec_for((300, 200), given_spec, 992) == TileSpec(512, 0, False)


# -- geometry -----------------------------------------------------------------------------------

frames = st.tuples(st.integers(1, 1500), st.integers(1, 1500))


@st.composite
def specs(draw: Any) -> tuple[int, int]:
    size = draw(st.integers(128, 1100))
    return size, draw(st.integers(0, size // 2))


@PROPERTY
@given(frames, specs())
def test_grid_covers_every_pixel_inside_the_frame(
    frame: tuple[int, int], spec: tuple[int, int]
) -> None:
    (width, height), (size, overlap) = frame, spec
    tiles = grid(frame, size, overlap)
    covered = np.zeros((height, width), dtype=bool)
    for x1, y1, x2, y2 in tiles:
        assert 0 <= x1 < x2 <= width and 0 <= y1 < y2 <= height
        assert (x2 - x1, y2 - y1) == (min(size, width), min(size, height))
        covered[y1:y2, x1:x2] = True
    assert covered.all()
    for starts in (sorted({t[0] for t in tiles}), sorted({t[1] for t in tiles})):
        steps = [b - a for a, b in itertools.pairwise(starts)]
        assert all(step <= size - overlap for step in steps)  # neighbours share >= overlap
        assert not steps or max(steps) - min(steps) <= 1  # evenly spaced
    assert len(tiles) == len({t[0] for t in tiles}) * len({t[1] for t in tiles})


def test_grid_by_hand() -> None:
    assert grid((1400, 1000), 512, 64) == [
        (x, y, x + 512, y + 512) for y in (0, 244, 488) for x in (0, 444, 888)
    ]
    assert grid((300, 200), 512, 64) == [(0, 0, 300, 200)]
    assert grid((5472, 3648), 992, 124)[-1] == (4480, 2656, 5472, 3648)
    assert len(grid((5472, 3648), 992, 124)) == 7 * 5


@st.composite
def found_on_a_tile(draw: Any) -> tuple[tuple[int, int], tuple[int, int, int, int], list[Any]]:
    frame = draw(frames)
    size, overlap = draw(specs())
    tiles = grid(frame, size, overlap)
    tile = tiles[draw(st.integers(0, len(tiles) - 1))]
    # Reported at the tile's size, or at a size the detector reduced it to.
    seen = draw(st.sampled_from([(tile[2] - tile[0], tile[3] - tile[1]), (64, 48)]))
    corner = st.tuples(st.floats(0, seen[0]), st.floats(0, seen[1]))
    found = []
    for a, b in draw(st.lists(st.tuples(corner, corner), max_size=5)):
        box = (min(a[0], b[0]), min(a[1], b[1]), max(a[0], b[0]), max(a[1], b[1]))
        found.append(Detection("car", box, seen))
    return frame, tile, found


@PROPERTY
@given(found_on_a_tile())
def test_boxes_after_to_frame_lie_inside_the_frame_and_the_tile(case: Any) -> None:
    frame, tile, found = case
    out = to_frame(found, tile, frame)
    assert len(out) == len(found)
    for before, after in zip(found, out, strict=True):
        assert after.image_size == frame and after.label == before.label
        x1, y1, x2, y2 = after.box
        assert tile[0] - 1e-6 <= x1 <= x2 <= tile[2] + 1e-6
        assert tile[1] - 1e-6 <= y1 <= y2 <= tile[3] + 1e-6
        assert min(x1, y1) >= 0 and x2 <= frame[0] and y2 <= frame[1]


def test_to_frame_shifts_boxes_and_places_masks() -> None:
    local = np.zeros((4, 6), dtype=bool)
    local[1:3, 2:5] = True
    found = [Detection("roof", (2, 1, 5, 3), (6, 4), encode_mask(local))]
    [placed] = to_frame(found, (10, 20, 16, 24), (30, 40))
    assert placed.box == (12, 21, 15, 23) and placed.image_size == (30, 40)
    assert placed.mask is not None
    whole = decode_mask(placed.mask)
    assert whole.shape == (40, 30)
    assert np.argwhere(whole).tolist() == [[y, x] for y in (21, 22) for x in (12, 13, 14)]


# -- merging ------------------------------------------------------------------------------------

LABELS = ["car", "person", "tree"]


@st.composite
def detections(draw: Any) -> list[Detection]:
    out = []
    coordinate = st.integers(0, 120)
    for _ in range(draw(st.integers(0, 14))):
        x1, x2 = sorted((draw(coordinate), draw(coordinate)))
        y1, y2 = sorted((draw(coordinate), draw(coordinate)))
        out.append(Detection(draw(st.sampled_from(LABELS)), (x1, y1, x2, y2), (120, 120)))
    return out


def _inside(small: Detection, big: Detection) -> bool:
    a, b = small.box, big.box
    return b[0] <= a[0] and b[1] <= a[1] and a[2] <= b[2] and a[3] <= b[3]


@PROPERTY
@given(detections(), st.randoms(use_true_random=False), st.sampled_from([0.3, 0.5, 0.9, 1.0]))
def test_merge_is_idempotent_and_independent_of_order(
    found: list[Detection], rng: random.Random, threshold: float
) -> None:
    merged = merge(found, threshold)
    shuffled = list(found)
    rng.shuffle(shuffled)
    assert merge(shuffled, threshold) == merged
    assert merge(merged, threshold) == merged
    assert merged == sorted(merged, key=lambda d: (d.label, d.box))
    for d in found:  # nothing is lost: every box lies in a merged box of its label
        assert any(m.label == d.label and _inside(d, m) for m in merged)
    for i, a in enumerate(merged):  # and at the fixpoint nothing links any more
        for b in merged[i + 1 :]:
            assert a.label != b.label or overlap_of_smaller(a.box, b.box) < threshold


@PROPERTY
@given(detections())
def test_merge_never_joins_different_labels(found: list[Detection]) -> None:
    merged = merge(found)
    for label in LABELS:
        own = [d for d in found if d.label == label]
        assert [d for d in merged if d.label == label] == merge(own)


def test_merge_rule_by_hand() -> None:
    cut = Detection("car", (90, 10, 100, 20), (200, 200))  # a box cut at a tile's edge
    whole = Detection("car", (90, 10, 110, 20), (200, 200))  # the neighbour saw all of it
    other = Detection("person", (90, 10, 110, 20), (200, 200))
    beside = Detection("car", (111, 10, 130, 20), (200, 200))
    assert merge([cut, whole, other, beside]) == [whole, beside, other]
    # Half of the smaller box shared: merged at 0.5, not above it.
    a, b = Detection("car", (0, 0, 10, 10), (50, 50)), Detection("car", (5, 0, 25, 10), (50, 50))
    assert merge([a, b]) == [Detection("car", (0, 0, 25, 10), (50, 50))]
    assert merge([a, b], 0.51) == [a, b]


def test_merge_joins_chains_to_a_fixpoint_and_ors_masks() -> None:
    def masked(box: tuple[int, int, int, int]) -> Detection:
        array = np.zeros((20, 40), dtype=bool)
        array[box[1] : box[3], box[0] : box[2]] = True
        return Detection("car", box, (40, 20), encode_mask(array))

    # a-b and b-c share 60% of the smaller box, a-c only 20%: linked through b, one object.
    a, b, c = masked((0, 0, 10, 10)), masked((4, 0, 14, 10)), masked((8, 0, 18, 10))
    [one] = merge([c, a, b])
    assert one.box == (0, 0, 18, 10)
    assert one.mask is not None
    assert decode_mask(one.mask).sum() == 18 * 10


# -- tiled runs through a detector that only sees its crop ---------------------------------------


class ColourDetector:
    """Finds objects drawn as solid rectangles of known colours: the box of each colour's
    pixels in the image it is given (a tile, or the whole frame)."""

    def __init__(self, labels: dict[tuple[int, int, int], str]) -> None:
        self.labels = labels
        self.calls: list[tuple[int, int]] = []

    def detect_many(
        self, image: Image.Image, queries: Sequence[str], *, max_new_tokens: int, **_: Any
    ) -> list[list[Detection]]:
        self.calls.append(image.size)
        pixels = np.asarray(image.convert("RGB"))
        out: list[list[Detection]] = []
        for query in queries:
            found = []
            for colour, label in self.labels.items():
                ys, xs = np.nonzero((pixels == colour).all(axis=-1))
                if label == query and len(xs):
                    box = (float(xs.min()), float(ys.min()), xs.max() + 1.0, ys.max() + 1.0)
                    found.append(Detection(label, box, image.size))
            out.append(found)
        return out


class OneQueryDetector:
    """The same detector without `detect_many`: one call per query."""

    def __init__(self, inner: ColourDetector) -> None:
        self.inner = inner

    def detect(self, image: Image.Image, query: str, *, max_new_tokens: int) -> list[Detection]:
        return self.inner.detect_many(image, [query], max_new_tokens=max_new_tokens)[0]


def drawn(
    size: tuple[int, int], objects: dict[tuple[int, int, int], tuple[int, int, int, int]]
) -> Image.Image:
    frame = Image.new("RGB", size, (30, 90, 40))
    for colour, box in objects.items():
        frame.paste(colour, box)
    return frame


# Frame 1000x700 in tiles of 400 sharing 64: columns start at 0, 300, 600; rows at 0, 300.
SEAMS = {
    (255, 0, 0): ("car", (380, 100, 420, 130)),  # across the first tile's right edge
    (250, 0, 0): ("car", (430, 100, 470, 130)),  # its neighbour, a separate car
    (245, 0, 0): ("car", (385, 385, 425, 415)),  # across a corner: seen by four tiles
    (240, 0, 0): ("car", (50, 50, 90, 80)),  # inside one tile only
    (0, 0, 255): ("person", (280, 500, 320, 540)),  # across the second column's left edge
    (0, 0, 250): ("person", (960, 670, 1000, 700)),  # at the frame's corner
}


def test_objects_across_seams_come_back_once_with_frame_boxes() -> None:
    frame = drawn((1000, 700), {colour: box for colour, (_, box) in SEAMS.items()})
    detector = ColourDetector({colour: label for colour, (label, _) in SEAMS.items()})
    stages: list[str] = []
    tiled = detect_tiled(
        frame,
        ["car", "person"],
        detector,
        TileSpec(400, 64, False),
        max_new_tokens=8,
        checkpoint=stages.append,
    )
    expected_grid = [[x, y, x + 400, y + 400] for y in (0, 300) for x in (0, 300, 600)]
    assert tiled.report["grid"] == expected_grid
    assert detector.calls == [(400, 400)] * 6
    assert stages == [f"detect:tile {i}/6" for i in range(1, 7)]
    cars, people = tiled.groups
    assert [d.box for d in cars] == [
        (50, 50, 90, 80), (380, 100, 420, 130), (385, 385, 425, 415), (430, 100, 470, 130)
    ]  # fmt: skip
    assert [d.box for d in people] == [(280, 500, 320, 540), (960, 670, 1000, 700)]
    assert all(d.image_size == (1000, 700) for d in cars + people)
    assert len(tiled.report["tile_ms"]) == 6 and tiled.report["full_frame_ms"] is None
    assert tiled.report["merge_ms"] >= 0


def test_one_query_detectors_give_the_same() -> None:
    frame = drawn((1000, 700), {colour: box for colour, (_, box) in SEAMS.items()})
    labels = {colour: label for colour, (label, _) in SEAMS.items()}
    spec = TileSpec(400, 64, False)
    many = detect_tiled(frame, ["person", "car"], ColourDetector(labels), spec, max_new_tokens=8)
    inner = ColourDetector(labels)
    one = detect_tiled(frame, ["person", "car"], OneQueryDetector(inner), spec, max_new_tokens=8)
    assert one.groups == many.groups
    assert len(inner.calls) == 12  # each of the 6 tiles once per query


def test_a_large_object_is_whole_only_with_the_full_frame_pass() -> None:
    # 800 px wide: each tile sees a third of it, too little shared to link the parts.
    frame = drawn((1000, 700), {(255, 255, 0): (100, 500, 900, 600)})
    detector = ColourDetector({(255, 255, 0): "truck"})
    parts = detect_tiled(frame, ["truck"], detector, TileSpec(400, 64, False), max_new_tokens=8)
    assert len(parts.groups[0]) == 3
    working = frame.resize((500, 350), Image.Resampling.NEAREST)
    stages: list[str] = []
    whole = detect_tiled(
        frame,
        ["truck"],
        detector,
        TileSpec(400, 64, True),
        max_new_tokens=8,
        checkpoint=stages.append,
        working=working,
    )
    assert [d.box for d in whole.groups[0]] == [(100, 500, 900, 600)]
    assert detector.calls[-1] == (500, 350)  # the full-frame pass saw the working image
    assert stages[-1] == "detect:full frame" and whole.report["full_frame_ms"] is not None


def test_a_checkpoint_that_raises_stops_before_the_next_tile() -> None:
    detector = ColourDetector({})

    def stop_at_third(stage: str) -> None:
        if stage == "detect:tile 3/6":
            raise RuntimeError("cancelled")

    with pytest.raises(RuntimeError, match="cancelled"):
        detect_tiled(
            drawn((1000, 700), {}),
            ["car"],
            detector,
            TileSpec(400, 64, True),
            max_new_tokens=8,
            checkpoint=stop_at_third,
        )
    assert len(detector.calls) == 2


# -- the real tiny detector ---------------------------------------------------------------------


def coordinates_frame(width: int, height: int) -> Image.Image:
    """Each pixel says where it is: red x % 256, green y % 256, blue the 256-blocks."""
    ys, xs = np.mgrid[0:height, 0:width]
    pixels = np.stack([xs % 256, ys % 256, (xs // 256) * 16 + ys // 256], axis=-1)
    return Image.fromarray(pixels.astype(np.uint8))


class Recorder:
    """The real detector, noting each image it is given: its size and, read from its first
    pixel, where in the frame it was cut from."""

    def __init__(self, real: Any) -> None:
        self.real = real
        self.seen: list[tuple[int, int, int, int]] = []

    def detect_many(self, image: Image.Image, queries: Sequence[str], **kw: Any) -> Any:
        r, g, b = image.getpixel((0, 0))  # type: ignore[misc]
        self.seen.append((b // 16 * 256 + r, b % 16 * 256 + g, *image.size))
        return self.real.detect_many(image, queries, **kw)


@pytest.mark.slow
def test_the_real_tiny_detector_runs_on_the_expected_tiles(model_host: ModelHost) -> None:
    frame = coordinates_frame(1400, 1000)
    working = frame.resize((700, 500))

    def run(detector: Any, _reasoner: Any) -> Any:
        recorder = Recorder(detector)
        tiled = detect_tiled(
            frame,
            ["car", "person"],
            recorder,
            TileSpec(512, 64, True),
            max_new_tokens=16,
            working=working,
        )
        return detector.native_side, recorder.seen, tiled

    native_side, seen, tiled = asyncio.run(model_host.infer(run))
    assert native_side == 992
    tiles = [(x, y, 512, 512) for y in (0, 244, 488) for x in (0, 444, 888)]
    assert seen[:-1] == tiles
    assert seen[-1][2:] == (700, 500)  # then the full-frame pass, on the working image
    assert len(tiled.report["tile_ms"]) == 9 and tiled.report["full_frame_ms"] is not None
    found = [d for group in tiled.groups for d in group]
    assert found  # the tiny detector reports a box for these queries
    for d in found:
        x1, y1, x2, y2 = d.box
        assert d.image_size == (1400, 1000)
        assert 0 <= x1 <= x2 <= 1400 and 0 <= y1 <= y2 <= 1000

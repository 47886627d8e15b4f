"""Annotated images: every label stays readable when boxes coincide (the pure tag layout), and
`/v1/jobs/{id}/annotated` draws such a job through the real app."""

from __future__ import annotations

import io
import itertools
from collections.abc import Callable
from typing import Any

import pytest
from PIL import Image

from service.annotate import Rect, label_layout
from service.config import Settings
from service.detection import Detection
from tests.conftest import RunningService, make_image


def overlaps(a: Rect, b: Rect) -> bool:
    return min(a[2], b[2]) > max(a[0], b[0]) and min(a[3], b[3]) > max(a[1], b[1])


def inside(rect: Rect, size: tuple[int, int]) -> bool:
    return 0 <= rect[0] < rect[2] <= size[0] and 0 <= rect[1] < rect[3] <= size[1]


@pytest.mark.parametrize(
    "box",
    [
        (100, 100, 300, 200),  # room above
        (0, 0, 640, 480),  # the whole image: tags go inside, at the top
        (560, 440, 640, 480),  # the bottom-right corner: tags must not leave the image
    ],
)
def test_three_detections_with_the_same_box_get_three_separate_tags(
    box: tuple[int, int, int, int],
) -> None:
    size = (640, 480)
    places = label_layout([box] * 3, [(90, 20), (120, 20), (70, 20)], size)
    assert [(r[2] - r[0], r[3] - r[1]) for r in places] == [(90, 20), (120, 20), (70, 20)]
    assert all(inside(r, size) for r in places)
    assert not any(overlaps(a, b) for a, b in itertools.combinations(places, 2))


def test_a_lone_tag_sits_just_above_its_box() -> None:
    assert label_layout([(100, 100, 300, 200)], [(90, 20)], (640, 480)) == [(100, 80, 190, 100)]


def test_many_partly_overlapping_boxes_never_share_a_tag_spot() -> None:
    size = (640, 480)
    boxes = [(10 + 7 * i, 50 + 3 * i, 200 + 7 * i, 300) for i in range(30)]
    places = label_layout(boxes, [(80, 18)] * 30, size)
    assert all(inside(r, size) for r in places)
    assert not any(overlaps(a, b) for a, b in itertools.combinations(places, 2))


def test_with_no_room_left_tags_still_stay_inside_the_image() -> None:
    size = (100, 40)
    places = label_layout([(0, 0, 100, 40)] * 5, [(60, 20)] * 5, size)
    assert all(inside(r, size) for r in places)
    assert not overlaps(places[0], places[1])  # the two rows it has are used first


class SameBoxDetector:
    """Three labels for one object: the case where tags used to print over each other."""

    def detect(self, image: Image.Image, query: str, **kw: Any) -> list[Detection]:
        box = (40.0, 30.0, 200.0, 150.0)
        return [Detection(label, box, image.size) for label in ("car", "truck", "van")]


def test_the_annotated_route_draws_coinciding_labels(
    settings: Settings,
    serve: Callable[..., RunningService],
    monkeypatch: pytest.MonkeyPatch,
) -> None:
    service = serve(settings)
    monkeypatch.setattr(service.services.host.roles["detector"], "runtime", SameBoxDetector())
    job = service.wait(service.submit(make_image(320, 240), queries="car").json()["id"])
    assert job["status"] == "succeeded", job
    assert len(job["result"]["detections"]) == 3
    response = service.client.get(f"/v1/jobs/{job['id']}/annotated")
    assert response.status_code == 200 and response.headers["content-type"] == "image/jpeg"
    drawn = Image.open(io.BytesIO(response.content))
    assert drawn.size == (320, 240)

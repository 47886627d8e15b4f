"""Grounding the reasoner: the numbered prompt and what marks, crops and a schema add to it, the
set-of-marks image drawn where the detections are, close-up crops covering every detection too
small in the whole frame, and citations parsed from the many ways an answer writes them."""

from __future__ import annotations

import json

import pytest
from hypothesis import given
from hypothesis import strategies as st
from PIL import Image

from service.detection import Detection
from service.grounding import Crop, crops_for, grounded_prompt, marks_image, parse_citations

FRAME = (6000, 4000)
GREEN = (50, 90, 40)


def det(
    label: str, box: tuple[float, float, float, float], size: tuple[int, int] = FRAME
) -> Detection:
    return Detection(label, box, size)


SCENE = [
    det("car", (100, 100, 130, 120)),
    det("car", (200, 150, 228, 170)),
    det("house", (1000, 1000, 3000, 2500)),
    det("person", (5000, 3500, 5010, 3520)),
]


def test_the_prompt_lists_every_detection_with_number_label_box_and_share_of_the_frame() -> None:
    prompt = grounded_prompt("How many cars are parked?", SCENE, FRAME)
    lines = prompt.splitlines()
    assert "found 4 objects in this 6000x4000 image" in lines[0]
    assert lines[1:5] == [
        "1. car at [100, 100, 130, 120], 0.0025% of the frame",
        "2. car at [200, 150, 228, 170], 0.0023% of the frame",
        "3. house at [1000, 1000, 3000, 2500], 12% of the frame",
        "4. person at [5000, 3500, 5010, 3520], 0.00083% of the frame",
    ]
    assert "by their numbers in square brackets, like [3]" in lines[5]
    assert lines[-2:] == ["", "How many cars are parked?"]
    assert "image" not in " ".join(lines[5:]).replace("6000x4000 image", "")
    assert "JSON" not in prompt


@pytest.mark.parametrize(
    ("box", "share"),
    [
        ((0, 0, 1000, 1000), "100%"),
        ((0, 0, 100, 100), "1.0%"),
        ((0, 0, 10, 12), "0.012%"),
        ((5, 5, 5, 9), "0%"),
    ],
)
def test_size_is_the_box_area_as_a_percentage_of_the_frame(
    box: tuple[int, int, int, int], share: str
) -> None:
    prompt = grounded_prompt("?", [det("roof", box, (1000, 1000))], (1000, 1000))
    assert f"], {share} of the frame" in prompt


def test_boxes_found_on_a_reduced_image_are_stated_in_frame_pixels() -> None:
    reduced = det("car", (10, 20, 30, 40), (600, 400))
    assert "1. car at [100, 200, 300, 400], 0.17% of the frame" in grounded_prompt(
        "?", [reduced], FRAME
    )


def test_without_detections_the_prompt_says_so_and_asks_for_no_citations() -> None:
    prompt = grounded_prompt("Anything flooded?", [], FRAME)
    assert (
        prompt
        == "An object detector found no objects for the requested queries.\n\nAnything flooded?"
    )


def test_marks_crops_and_schema_each_add_what_they_show_or_ask() -> None:
    crops = [
        Crop(Image.new("RGB", (448, 448)), (0, 0, 448, 448), (1, 2)),
        Crop(Image.new("RGB", (448, 448)), (4781, 3286, 5229, 3734), (4,)),
    ]
    schema = {"type": "object", "properties": {"cars": {"type": "integer"}}, "required": ["cars"]}
    plain = grounded_prompt("How many cars?", SCENE, FRAME)

    marked = grounded_prompt("How many cars?", SCENE, FRAME, marks=True)
    assert marked.startswith("The first image is the whole 6000x4000 frame.\nThe second image")
    assert "tagged with its number" in marked
    assert "Image 3" not in marked

    cropped = grounded_prompt("How many cars?", SCENE, FRAME, crops=crops)
    assert "second image" not in cropped.lower()
    assert (
        "Image 2 is a close-up of the frame region [0, 0, 448, 448] showing detections 1, 2."
        in cropped
    )
    assert (
        "Image 3 is a close-up of the frame region [4781, 3286, 5229, 3734] showing detection 4."
        in cropped
    )

    both = grounded_prompt("How many cars?", SCENE, FRAME, marks=True, crops=crops)
    assert "Image 3 is a close-up of the frame region [0, 0, 448, 448]" in both
    assert "Image 4 is a close-up" in both

    structured = grounded_prompt("How many cars?", SCENE, FRAME, schema=schema)
    assert structured.startswith(plain)
    assert "Answer with JSON only" in structured
    assert json.loads(structured.splitlines()[-1]) == schema

    for prompt in (marked, cropped, both, structured):  # the detections are always listed
        assert "1. car at [100, 100, 130, 120], 0.0025% of the frame" in prompt
        assert "How many cars?" in prompt


def test_marks_image_draws_the_boxes_where_the_detections_are_at_the_image_size() -> None:
    image = Image.new("RGB", (600, 400), GREEN)
    # Frame pixels, drawn on an image a tenth the size: the box lands at (300..400, 200..300).
    marked = marks_image(image, [det("roof", (3000, 2000, 4000, 3000))])
    assert marked.size == image.size
    assert image.getpixel((300, 250)) == GREEN  # the input is left alone
    for edge in [(300, 250), (399, 250), (350, 299)]:
        assert marked.getpixel(edge) != GREEN
    assert marked.getpixel((350, 260)) == GREEN  # inside the box: no mask tint hides the roof
    for far in [(10, 390), (590, 10), (100, 100), (590, 390)]:
        assert marked.getpixel(far) == GREEN


def test_marks_image_numbers_match_the_detection_order() -> None:
    image = Image.new("RGB", (600, 400), GREEN)
    one = marks_image(image, [det("a", (100, 100, 200, 200), (600, 400))])
    two = marks_image(
        image,
        [det("b", (400, 250, 500, 350), (600, 400)), det("a", (100, 100, 200, 200), (600, 400))],
    )
    # Same label and box but numbered 1 vs 2: the tag above the box differs.
    tag = (100, 80, 140, 100)
    assert one.crop(tag).tobytes() != two.crop(tag).tobytes()


def covers(crop: Crop, box: tuple[float, float, float, float]) -> bool:
    x1, y1, x2, y2 = crop.box
    return x1 <= box[0] and y1 <= box[1] and box[2] <= x2 and box[3] <= y2


def test_crops_cover_every_small_detection_and_group_the_near_ones() -> None:
    frame = Image.new("RGB", FRAME, GREEN)
    frame.paste((200, 0, 0), (100, 100, 130, 120))
    crops = crops_for(frame, SCENE)
    assert [c.numbers for c in crops] == [(1, 2), (4,)]  # the two cars share one crop
    for crop in crops:
        assert max(crop.image.size) <= 896
        x1, y1, x2, y2 = crop.box
        assert 0 <= x1 < x2 <= FRAME[0] and 0 <= y1 < y2 <= FRAME[1]
        assert abs((x2 - x1) - (y2 - y1)) <= 1  # square where the frame allows
        assert crop.image.tobytes() == frame.crop(crop.box).tobytes()
    for number in (1, 2, 4):
        box = SCENE[number - 1].box
        assert any(covers(c, box) and number in c.numbers for c in crops)
    # Context around the group, not just its union.
    assert crops[1].box[2] - crops[1].box[0] > 10 * (5010 - 5000)


def test_large_detections_get_no_crop() -> None:
    frame = Image.new("RGB", FRAME, GREEN)
    assert crops_for(frame, [SCENE[2], det("field", (0, 0, 400, 300))]) == []
    assert crops_for(frame, []) == []
    # A frame the reasoner sees whole: only what is under min_seen_px itself is small.
    small_frame = Image.new("RGB", (800, 600), GREEN)
    assert crops_for(small_frame, [det("car", (10, 10, 60, 40), (800, 600))]) == []
    assert len(crops_for(small_frame, [det("car", (10, 10, 30, 25), (800, 600))])) == 1


def test_at_most_max_crops_with_the_fullest_groups_first() -> None:
    frame = Image.new("RGB", FRAME, GREEN)
    lone = [det("car", (600 * i, 3900, 600 * i + 20, 3915)) for i in range(8)]
    cluster = [det("car", (3000 + 30 * i, 100, 3020 + 30 * i, 115)) for i in range(3)]
    crops = crops_for(frame, [*lone, *cluster], max_crops=3)
    assert len(crops) == 3
    assert crops[0].numbers == (9, 10, 11)
    assert [c.numbers for c in crops[1:]] == [(1,), (2,)]
    assert crops_for(frame, lone, max_crops=0) == []


SEEN = 200
SMALL_FRAME = Image.new("RGB", (1200, 900), GREEN)


@st.composite
def boxes(draw: st.DrawFn) -> tuple[float, float, float, float]:
    x1 = draw(st.floats(0, 1199))
    y1 = draw(st.floats(0, 899))
    w = draw(st.floats(0, 400))
    h = draw(st.floats(0, 400))
    return (x1, y1, min(x1 + w, 1200.0), min(y1 + h, 900.0))


@given(st.lists(boxes(), max_size=12), st.integers(1, 5))
def test_crops_property_cover_the_small_ones_within_the_cap(
    found: list[tuple[float, float, float, float]], max_crops: int
) -> None:
    detections = [det("x", b, SMALL_FRAME.size) for b in found]
    scale = SEEN / 1200
    small = [n for n, b in enumerate(found, start=1) if max(b[2] - b[0], b[3] - b[1]) * scale < 32]
    crops = crops_for(SMALL_FRAME, detections, seen_side=SEEN, max_crops=max_crops)
    assert len(crops) <= max_crops
    for crop in crops:
        assert max(crop.image.size) <= SEEN
        assert 0 <= crop.box[0] < crop.box[2] <= 1200 and 0 <= crop.box[1] < crop.box[3] <= 900
        assert all(covers(crop, found[n - 1]) for n in crop.numbers)
        assert any(n in small for n in crop.numbers)
    everything = crops_for(SMALL_FRAME, detections, seen_side=SEEN, max_crops=len(found) + 1)
    for n in small:
        assert any(n in c.numbers for c in everything)
    assert (everything == []) == (small == [])


@pytest.mark.parametrize(
    ("text", "count", "cited"),
    [
        ("Two cars [1] [2] are parked.", 5, [1, 2]),
        ("Cars [1, 4] and the house [3].", 5, [1, 4, 3]),
        ("Vehicles [2-4] block the road.", 5, [2, 3, 4]),
        ("Vehicles [4–2].", 5, [2, 3, 4]),
        ("The roof #5 is damaged, like #2.", 5, [5, 2]),
        ("See detection 2 and Detections 4, 1 & 3.", 5, [2, 4, 1, 3]),
        ("objects 1 to 3, box #4, no. 5", 6, [1, 2, 3, 4, 5]),
        ("[3] again [3] and detection 3", 5, [3]),
        ("[2,]", 5, [2]),
        ("The box [12, 40, 300, 200] holds it", 50, []),  # an echoed box, not citations
        ("In 2024 #123 detection 2.5 [1.5] &#3;", 5, []),
        ("[1] [6] [0] #7", 5, [1]),
        ("No citations at all.", 5, []),
        ("[1]", 0, []),
    ],
)
def test_parse_citations_reads_the_usual_forms(text: str, count: int, cited: list[int]) -> None:
    assert parse_citations(text, count) == cited


@given(st.text(alphabet=st.sampled_from("[]#,-–0123456789 detcionobjs&and.")), st.integers(0, 30))
def test_parse_citations_never_invents_or_repeats_a_number(text: str, count: int) -> None:
    cited = parse_citations(text, count)
    assert all(1 <= n <= count for n in cited)
    assert len(cited) == len(set(cited))


FORMS = ["[{}]", "#{}", "detection {}", "Object {}"]


@given(
    st.lists(st.tuples(st.integers(1, 20), st.sampled_from(FORMS)), max_size=8),
    st.sampled_from([" and ", ". ", ", then ", "; "]),
)
def test_parse_citations_finds_each_cited_number_in_order(
    citations: list[tuple[int, str]], glue: str
) -> None:
    text = "Answer: " + glue.join(form.format(n) for n, form in citations) + " done."
    assert parse_citations(text, 20) == list(dict.fromkeys(n for n, _ in citations))

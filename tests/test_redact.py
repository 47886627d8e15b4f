"""Privacy redaction: the blur changes exactly the redacted regions and hides what is in them;
the redacted copy on disk; the API hands out only that copy for a redacting job (409 before
it exists); originals a redacting job does not keep are deleted only when no job needs them;
retention removes redacted copies with their jobs."""

from __future__ import annotations

import asyncio
import io
import json
import sqlite3
import time
from collections.abc import Callable, Iterator
from pathlib import Path
from typing import Any

import numpy as np
import pytest
from PIL import Image

from service.config import Settings
from service.detection import Detection, encode_mask
from service.intake import inspect_image, store_image
from service.redact import blur, regions, write_copy
from service.store.migrate import migrate
from service.store.queue import Queue
from service.store.retention import drop_original, prune
from tests.conftest import RunningService, db_rows

Serve = Callable[..., RunningService]
SIZE = (160, 120)
BOX = (20.4, 30.6, 90.2, 80.5)
RECT = (20, 30, 91, 81)  # the pixels BOX touches: floor of the start, ceiling of the end


def noise(size: tuple[int, int] = SIZE, seed: int = 1) -> Image.Image:
    """Every pixel independent: any pixel a blur touches changes, and nothing blurred looks
    like it."""
    pixels = np.random.default_rng(seed).integers(0, 256, (size[1], size[0], 3), dtype=np.uint8)
    return Image.fromarray(pixels)


def pixels(image: Image.Image) -> np.ndarray:
    return np.asarray(image.convert("RGB")).astype(np.int16)


def outside(rect: tuple[int, int, int, int], size: tuple[int, int] = SIZE) -> np.ndarray:
    keep = np.ones((size[1], size[0]), dtype=bool)
    keep[rect[1] : rect[3], rect[0] : rect[2]] = False
    return keep


def png(image: Image.Image) -> bytes:
    buffer = io.BytesIO()
    image.save(buffer, format="PNG")
    return buffer.getvalue()


def test_regions_match_labels_ignoring_case() -> None:
    found = [
        Detection("Person", (0, 0, 1, 1), SIZE),
        Detection("car", (0, 0, 1, 1), SIZE),
        Detection("LICENSE PLATE", (0, 0, 1, 1), SIZE),
        Detection("license plates", (0, 0, 1, 1), SIZE),
    ]
    chosen = regions(found, ["person", " License plate "])
    assert [d.label for d in chosen] == ["Person", "LICENSE PLATE"]
    assert regions(found, []) == []


def test_blur_changes_exactly_the_boxes_pixels_and_hides_them() -> None:
    image = noise()
    before = pixels(image)
    after = pixels(blur(image, [Detection("face", BOX, SIZE)]))
    assert (after[outside(RECT)] == before[outside(RECT)]).all()
    inside = (slice(RECT[1], RECT[3]), slice(RECT[0], RECT[2]))
    changed = (after[inside] != before[inside]).any(axis=-1)
    assert changed.mean() > 0.97
    assert after[inside].std() < 0.2 * before[inside].std()
    assert pixels(image).tolist() == before.tolist(), "the input is left as it was"


@pytest.mark.parametrize("width", [10, 48, 160, 900])
def test_a_high_contrast_pattern_is_not_recoverable_at_any_size(width: int) -> None:
    """Bars as fine as a plate's characters (a twelfth of its width, at least a pixel) come
    out nearly flat and uncorrelated with the bars, whatever the region's size."""
    height = max(4, width // 4)
    size = (width + 20, height + 20)
    bar = max(1, width // 24)
    art = np.full((size[1], size[0], 3), 128, dtype=np.uint8)
    stripes = ((np.arange(width) // bar) % 2 * 255).astype(np.uint8)
    art[10 : 10 + height, 10 : 10 + width] = stripes[None, :, None]
    plate = Detection("plate", (10, 10, 10 + width, 10 + height), size)
    after = pixels(blur(Image.fromarray(art), [plate]))[10 : 10 + height, 10 : 10 + width, 0]
    assert after.std() < 0.2 * 127.5
    profile = after.mean(axis=0)
    if profile.std() > 0:
        assert abs(np.corrcoef(profile, stripes.astype(float))[0, 1]) < 0.3


def test_a_mask_restricts_the_blur_to_its_pixels_at_any_resolution() -> None:
    image = noise()
    before = pixels(image)
    yy, xx = np.mgrid[0 : SIZE[1] // 2, 0 : SIZE[0] // 2]
    disc = (xx - 30) ** 2 + (yy - 30) ** 2 <= 15**2  # half resolution: scaled up to the image
    masked = Detection("person", (0, 0, SIZE[0], SIZE[1]), SIZE, mask=encode_mask(disc))
    after = pixels(blur(image, [masked]))
    inside = np.kron(disc, np.ones((2, 2), dtype=bool))
    assert (after[~inside] == before[~inside]).all()
    assert (after[inside] != before[inside]).any(axis=-1).mean() > 0.97
    # An empty mask says nothing about where the object is: its box is blurred.
    empty = Detection("person", BOX, SIZE, mask=encode_mask(np.zeros((4, 4), dtype=bool)))
    assert (pixels(blur(image, [empty]))[~outside(RECT)] != before[~outside(RECT)]).any()


def test_boxes_for_another_size_of_the_image_are_scaled_to_it() -> None:
    image = noise()
    half = Detection("face", tuple(v / 2 for v in BOX), (SIZE[0] // 2, SIZE[1] // 2))  # type: ignore[arg-type]
    after = pixels(blur(image, [half]))
    assert (after[outside(RECT)] == pixels(image)[outside(RECT)]).all()
    assert (after[~outside(RECT)] != pixels(image)[~outside(RECT)]).any(axis=-1).mean() > 0.97


def test_write_copy_is_lossless_png_for_png_and_jpeg_for_jpeg(tmp_path: Path) -> None:
    image = noise()
    record = inspect_image(png(image), max_pixels=10**8)
    store_image(png(image), record, tmp_path)
    relative = write_copy(tmp_path, record.path, 7, [Detection("face", BOX, SIZE)])
    assert relative == "redacted/7.png"
    copy = Image.open(tmp_path / relative)
    assert copy.format == "PNG" and copy.size == SIZE
    assert (pixels(copy)[outside(RECT)] == pixels(image)[outside(RECT)]).all()
    assert not (pixels(copy)[~outside(RECT)] == pixels(image)[~outside(RECT)]).all()
    assert not list((tmp_path / "redacted").glob(".incoming-*")), "no temporary file is left"

    buffer = io.BytesIO()
    exif = Image.Exif()
    exif[0x0112] = 6  # stored on its side: the copy is upright, as the boxes are
    image.save(buffer, format="JPEG", exif=exif)
    record = inspect_image(buffer.getvalue(), max_pixels=10**8)
    store_image(buffer.getvalue(), record, tmp_path)
    relative = write_copy(tmp_path, record.path, 8, [])
    copy = Image.open(tmp_path / relative)
    assert relative == "redacted/8.jpg" and copy.format == "JPEG"
    assert copy.size == (SIZE[1], SIZE[0])


# -- the store and the API ------------------------------------------------------------------


def add_image(data_dir: Path, db: sqlite3.Connection, image: Image.Image) -> tuple[str, str]:
    """Stored as the intake stores it; returns (sha256, path)."""
    data = png(image)
    record = inspect_image(data, max_pixels=10**8)
    store_image(data, record, data_dir)
    db.execute(
        "INSERT OR IGNORE INTO images (sha256, bytes, width, height, format, path, created_at)"
        " VALUES (?, ?, ?, ?, ?, ?, ?)",
        (record.sha256, record.bytes, record.width, record.height, record.format, record.path, 1),
    )
    return record.sha256, record.path


def add_job(
    db: sqlite3.Connection,
    sha: str,
    status: str,
    *,
    redact: list[str] | None = None,
    keep_original: bool = True,
    redacted_path: str | None = None,
    finished_at: float | None = None,
) -> int:
    """A job row as the queue writes it; queued ones are scheduled far ahead so the worker
    of a running service leaves them alone."""
    params = {"queries": ["face"], "prompt": "?", "options": {}, "keep_original": keep_original}
    params["redact"] = redact or []
    now = time.time()
    done = status in ("succeeded", "failed", "cancelled")
    cursor = db.execute(
        "INSERT INTO jobs (status, image_sha256, input_name, params, run_after, created_at,"
        " finished_at) VALUES (?, ?, 'x.png', ?, ?, ?, ?)",
        (
            status,
            sha,
            json.dumps(params),
            now + 10**6,
            now,
            (finished_at or now) if done else None,
        ),
    )
    job_id = int(cursor.lastrowid or 0)
    if status == "succeeded":
        db.execute(
            "INSERT INTO results (job_id, reasoning, created_at, redacted_path)"
            " VALUES (?, '', ?, ?)",
            (job_id, now, redacted_path),
        )
        db.execute(
            "INSERT INTO detections (job_id, idx, label, x1, y1, x2, y2) VALUES (?, 1, 'face',"
            " ?, ?, ?, ?)",
            (job_id, *BOX),
        )
    return job_id


def redacted_job(data_dir: Path, db: sqlite3.Connection, sha: str, path: str, **kw: Any) -> int:
    """A succeeded job that redacts faces, with its copy written."""
    job_id = add_job(db, sha, "succeeded", redact=["face"], **kw)
    copy = write_copy(data_dir, path, job_id, [Detection("face", BOX, SIZE)])
    db.execute("UPDATE results SET redacted_path = ? WHERE job_id = ?", (copy, job_id))
    return job_id


def test_a_redacting_job_hands_out_only_its_redacted_copy(settings: Settings, serve: Serve) -> None:
    service = serve(settings)
    data_dir = settings.data_dir
    db = sqlite3.connect(settings.database)
    image = noise()
    sha, path = add_image(data_dir, db, image)
    hidden = redacted_job(data_dir, db, sha, path)
    pending = add_job(db, sha, "queued", redact=["Face"])
    failed = add_job(db, sha, "failed", redact=["face"])
    plain = add_job(db, sha, "succeeded")
    gone = redacted_job(data_dir, db, sha, path)
    db.commit()
    (data_dir / f"redacted/{gone}.png").unlink()

    served = service.client.get(f"/v1/jobs/{hidden}/image")
    assert served.status_code == 200 and served.headers["content-type"] == "image/png"
    assert served.content == (data_dir / f"redacted/{hidden}.png").read_bytes()
    assert served.content != (data_dir / path).read_bytes()

    drawn = service.client.get(f"/v1/jobs/{hidden}/annotated")
    assert drawn.status_code == 200 and drawn.headers["content-type"] == "image/jpeg"
    # Well inside the box, away from its outline and label: the blurred copy, not the noise.
    middle = (slice(55, 76), slice(30, 81))
    annotated = pixels(Image.open(io.BytesIO(drawn.content)))[middle]
    assert annotated.std() < 0.3 * pixels(image)[middle].std()
    copy = pixels(Image.open(data_dir / f"redacted/{hidden}.png"))[middle]
    assert np.abs(annotated - copy).mean() < 8

    for job_id, code in ((pending, "redaction_pending"), (failed, "no_redacted_copy")):
        for route in ("image", "annotated"):
            refused = service.client.get(f"/v1/jobs/{job_id}/{route}")
            assert refused.status_code == 409, (job_id, route, refused.text)
            assert refused.json()["code"] == code
            assert refused.json()["message"]
    for route in ("image", "annotated"):
        assert service.client.get(f"/v1/jobs/{gone}/{route}").status_code == 410
    original = service.client.get(f"/v1/jobs/{plain}/image")
    assert original.status_code == 200
    assert original.content == (data_dir / path).read_bytes()
    assert service.client.get(f"/v1/jobs/{plain}/annotated").status_code == 200


@pytest.fixture
def store(tmp_path: Path) -> Iterator[tuple[Path, sqlite3.Connection]]:
    db_path = tmp_path / "aip.db"
    migrate(db_path)
    db = sqlite3.connect(db_path)
    yield tmp_path, db
    db.close()


def drop(data_dir: Path, job_id: int) -> bool:
    async def go() -> bool:
        queue = await Queue.open(data_dir / "aip.db")
        try:
            return await drop_original(queue, data_dir, job_id)
        finally:
            await queue.close()

    return asyncio.run(go())


@pytest.mark.parametrize(
    ("other", "needed"),
    [
        (None, False),
        ({"status": "queued", "redact": ["face"], "keep_original": False}, True),
        ({"status": "running", "redact": ["face"], "keep_original": False}, True),
        ({"status": "succeeded"}, True),  # redacts nothing: hands the original out
        ({"status": "failed"}, True),
        ({"status": "succeeded", "redact": ["face"], "keep_original": True}, True),
        ({"status": "succeeded", "redact": ["face"], "keep_original": False}, False),
        ({"status": "failed", "redact": ["face"], "keep_original": False}, False),
    ],
)
def test_drop_original_deletes_only_when_no_other_job_needs_the_image(
    store: tuple[Path, sqlite3.Connection], other: dict[str, Any] | None, needed: bool
) -> None:
    data_dir, db = store
    sha, path = add_image(data_dir, db, noise())
    job_id = redacted_job(data_dir, db, sha, path, keep_original=False)
    if other is not None:
        status = other.pop("status")
        if other.get("redact") and status == "succeeded":
            redacted_job(data_dir, db, sha, path, keep_original=other["keep_original"])
        else:
            add_job(db, sha, status, **other)
    db.commit()
    assert drop(data_dir, job_id) is not needed
    assert (data_dir / path).exists() is needed
    pruned = db_rows(data_dir / "aip.db", f"SELECT pruned_at FROM images WHERE sha256 = '{sha}'")
    assert (pruned[0][0] is None) is needed
    assert (data_dir / f"redacted/{job_id}.png").exists(), "the copy stays"


def test_drop_original_leaves_jobs_that_keep_it_or_have_no_copy(
    store: tuple[Path, sqlite3.Connection],
) -> None:
    data_dir, db = store
    sha, path = add_image(data_dir, db, noise())
    keeps = redacted_job(data_dir, db, sha, path, keep_original=True)
    no_copy = add_job(db, sha, "succeeded", redact=["face"], keep_original=False)
    lost = redacted_job(data_dir, db, sha, path, keep_original=False)
    db.commit()
    (data_dir / f"redacted/{lost}.png").unlink()
    for job_id in (keeps, no_copy, lost, 999):
        assert drop(data_dir, job_id) is False
    assert (data_dir / path).exists()


def test_retention_removes_the_redacted_copies_of_the_jobs_it_prunes(
    store: tuple[Path, sqlite3.Connection],
) -> None:
    data_dir, db = store
    sha, path = add_image(data_dir, db, noise())
    long_ago = time.time() - 40 * 86400
    old = redacted_job(data_dir, db, sha, path, finished_at=long_ago)
    new = redacted_job(data_dir, db, sha, path)
    db.commit()
    old_copy = data_dir / f"redacted/{old}.png"
    size = old_copy.stat().st_size

    async def run(**kw: Any) -> dict[str, Any]:
        queue = await Queue.open(data_dir / "aip.db")
        try:
            report = await prune(queue, data_dir, older_than_seconds=30 * 86400, **kw)
            return report.to_dict()
        finally:
            await queue.close()

    dry = asyncio.run(run(keep_results=True, dry_run=True))
    assert dry["bytes_freed"] == size and old_copy.exists()
    assert asyncio.run(run(keep_results=True))["bytes_freed"] == size
    assert not old_copy.exists()
    assert (data_dir / f"redacted/{new}.png").exists() and (data_dir / path).exists()
    assert asyncio.run(run(keep_results=False))["jobs_removed"] == 1


def test_pruning_the_job_that_kept_an_original_lets_a_redacting_job_drop_it(
    store: tuple[Path, sqlite3.Connection],
) -> None:
    data_dir, db = store
    sha, path = add_image(data_dir, db, noise())
    add_job(db, sha, "succeeded", finished_at=time.time() - 40 * 86400)  # keeps the original
    hidden = redacted_job(data_dir, db, sha, path, keep_original=False)
    db.commit()
    assert drop(data_dir, hidden) is False and (data_dir / path).exists()

    async def run() -> dict[str, Any]:
        queue = await Queue.open(data_dir / "aip.db")
        try:
            report = await prune(queue, data_dir, older_than_seconds=30 * 86400, keep_results=False)
            return report.to_dict()
        finally:
            await queue.close()

    report = asyncio.run(run())
    assert report["jobs_removed"] == 1 and report["images_removed"] == 1
    assert not (data_dir / path).exists()
    assert (data_dir / f"redacted/{hidden}.png").exists()

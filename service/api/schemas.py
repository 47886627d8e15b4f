"""The API's wire types: the job id path parameter, text that can cross the wire, and every
response body, so the OpenAPI document types what the routes return. Shapes only; the routes
and read models fill them. Every body is closed: a key a read model emits must be declared
here, and only genuinely open values (EXIF, options, a mask) are untyped dicts."""

from __future__ import annotations

from typing import Annotated, Any, Literal

from fastapi import Path
from fastapi.responses import Response
from pydantic import BaseModel, ConfigDict, Field

from service.errors import InvalidInput

# SQLite's INTEGER is 64-bit signed: a larger id cannot name a job, and must not reach it.
MAX_ID = 2**63 - 1
JobId = Annotated[int, Path(ge=1, le=MAX_ID, description="a job id, as `id` in a job")]


def refuse_unencodable(value: Any, where: str = "the body") -> None:
    """Text that cannot be UTF-8 (a lone surrogate, `"\\ud800"` in JSON) or that holds a NUL
    (which PostgreSQL's text refuses, and C strings end at) is the request's fault: refuse it
    here rather than fail later in the database or the file system."""
    if isinstance(value, str):
        if "\x00" in value:
            raise InvalidInput(
                f"{where} holds a NUL character; send text without it", code="invalid_text"
            )
        try:
            value.encode("utf-8")
        except UnicodeEncodeError:
            raise InvalidInput(
                f"{where} holds text that is not valid Unicode (a lone surrogate); send UTF-8",
                code="invalid_text",
            ) from None
    elif isinstance(value, list):
        for item in value:
            refuse_unencodable(item, where)
    elif isinstance(value, dict):
        for key, item in value.items():
            refuse_unencodable(key, where)
            refuse_unencodable(item, f"`{key}`" if isinstance(key, str) else where)


Status = Literal["queued", "running", "succeeded", "failed", "cancelled"]
Source = Literal["api", "path", "inbox"]


class Body(BaseModel):
    """Closed (`additionalProperties: false`): a key a read model adds without declaring it
    here fails `typed()` in the tests, instead of reaching clients undocumented."""

    model_config = ConfigDict(extra="forbid")


class ErrorBody(Body):
    code: str = Field(description="stable, for programs: e.g. job_not_found, invalid_filter")
    message: str = Field(description="for people: what went wrong and what to do next")


class JobInput(Body):
    name: str
    sha256: str
    bytes: int
    width: int
    height: int
    format: str
    captured_at: str | None = Field(description="EXIF capture time, camera local time")
    exif: dict[str, Any] | None = Field(description="capture time, camera, orientation, gps")
    stored: bool = Field(description="false once retention removed the stored copy")


class TilingSpec(Body):
    size: int = Field(description="tile side in pixels")
    overlap: int = Field(description="pixels shared by neighbouring tiles")
    full_frame: bool = Field(description="also one pass over the whole frame, for large objects")


class JobParams(Body):
    queries: list[str]
    prompt: str
    options: dict[str, Any]
    detect_max_tokens: int | None = Field(
        None, description="tokens per detection query; absent on jobs from before limits"
    )
    reason_max_tokens: int | None = Field(
        None, description="tokens of reasoning; absent on jobs from before limits"
    )
    # The aerial options; absent on jobs from before them (they ran untiled, unredacted).
    tiling: Literal["auto", "off"] | TilingSpec | None = Field(
        None, description="auto: tiles when the frame is larger than the detector's input"
    )
    set_of_marks: bool | None = Field(
        None, description="the reasoner also saw the image with the numbered boxes drawn"
    )
    response_schema: dict[str, Any] | None = Field(
        None, description="JSON Schema the answer was constrained to; absent without one"
    )
    redact: list[str] | None = Field(
        None, description="classes blurred in every image the service hands out"
    )
    keep_original: bool | None = Field(
        None, description="false: the original is deleted once a redacted copy exists"
    )
    profile: str | None = Field(None, description="the profile the parameters came from")
    plan: bool | None = Field(
        None, description="no queries were given: the reasoner proposed them (planned_queries)"
    )
    webhook: str | None = Field(None, description="where the finished job is POSTed")
    ground_elevation: float | None = Field(
        None, description="metres above sea level; absent: flat ground at take-off height"
    )
    flight: str | None = Field(None, description="the flight it was given")


class ModelIdentity(Body):
    id: str
    revision: str | None
    quantize: int | None = Field(None, description="bits, when a quantised copy served")


Ring = list[list[float]]


class GroundObject(Body):
    """Where a detection is on the ground (WGS84), or why it has no place there."""

    lat: float | None = Field(None, description="the box centre on the ground, degrees")
    lon: float | None = None
    footprint: Ring | None = Field(
        None, description="the box's corners on the ground, a closed [lon, lat] ring"
    )
    width_m: float | None = Field(None, description="ground length of its top and bottom edges")
    height_m: float | None = Field(None, description="ground length of its left and right edges")
    area_m2: float | None = None
    distance_m: float | None = Field(None, description="from the camera to the centre point")
    uncertainty_m: float | None = Field(None, description="1 sigma, horizontal")
    reason: str | None = Field(None, description="why it has no place on the ground")


class CameraPose(Body):
    lat: float
    lon: float
    height_m: float = Field(description="above the ground")
    yaw: float = Field(description="degrees clockwise from true north")
    pitch: float = Field(description="degrees; -90 looks straight down")
    roll: float
    focal_px: float
    sensor_width_mm: float | None
    model: str | None


class GroundPoint(Body):
    lat: float
    lon: float


class GroundFrame(Body):
    """The frame on the ground, from the camera pose in its EXIF and XMP (service/geo)."""

    camera: CameraPose | None = None
    assumptions: list[str] = Field(description="what the geometry takes for granted")
    centre: GroundPoint | None = Field(None, description="the image centre on the ground")
    footprint: Ring | None = Field(
        None, description="the image on the ground (below the horizon, within range)"
    )
    gsd_cm: float | None = Field(None, description="ground sample distance at the centre")
    uncertainty_m: float | None = Field(None, description="1 sigma at the centre")
    reason: str | None = Field(None, description="why the frame has no place on the ground")


class Detection(Body):
    number: int = Field(description="1-based; the number the reasoning refers to")
    label: str
    box: list[float] = Field(description="[x1, y1, x2, y2] in pixels")
    box_normalized: list[float] = Field(description="the box divided by width and height")
    mask: dict[str, Any] | None = Field(None, description="run lengths, when segmenting")
    geo: GroundObject | None = Field(None, description="absent on jobs from before geometry")


class TilingReport(Body):
    size: int = Field(description="tile side in pixels")
    overlap: int
    full_frame: bool
    grid: list[list[int]] = Field(description="each tile as [x1, y1, x2, y2] in frame pixels")
    tile_ms: list[float] = Field(description="detection time per tile, in grid order")
    full_frame_ms: float | None = Field(description="the full-frame pass; null without one")
    merge_ms: float = Field(description="merging duplicates across seams")


class JobResult(Body):
    detections: list[Detection]
    reasoning: str
    answer: Any = Field(description="the structured answer; null unless a schema was asked")
    citations: list[int] = Field(description="detection numbers the reasoning cites")
    planned_queries: list[str] | None = Field(
        description="proposed by the reasoner when the job gave no queries; else null"
    )
    tiling: TilingReport | None = Field(description="null when the frame was not tiled")
    geo: GroundFrame | None = Field(description="null on jobs from before geometry")


class JobLinks(Body):
    self: str
    image: str


class Attempt(Body):
    attempt: int = Field(description="rises across retries; never reused within a job")
    worker: str
    started_at: str
    finished_at: str | None
    outcome: str = Field(description="running|succeeded|failed|retrying|cancelled|released|lost")
    error: ErrorBody | None


class FollowUpLinks(Body):
    self: str


class FollowUp(Body):
    n: int = Field(description="1-based, per job, in the order asked")
    question: str
    answer: str | None = Field(description="null until it is answered")
    status: Literal["queued", "running", "succeeded", "failed"]
    created_at: str
    finished_at: str | None
    timings_ms: dict[str, float] = Field(description="decode, reason, total")
    error: ErrorBody | None = Field(description="why it failed; the job is unchanged")
    reasoner: ModelIdentity | None = Field(
        None, description="the model that answered, as a job's `models.reasoner`"
    )
    links: FollowUpLinks


class WebhookDelivery(Body):
    delivery_id: str = Field(description="sent as X-AIP-Delivery: the same on every retry")
    event: str = Field(description="job.succeeded|job.failed|job.cancelled (X-AIP-Event)")
    url: str
    status: Literal["pending", "delivered", "failed"] = Field(
        description="failed: no 2xx answer within a day of retries"
    )
    attempts: int
    last_status: int | None = Field(description="HTTP status of the last attempt, if answered")
    last_error: str | None = Field(description="why the last attempt did not deliver")
    created_at: str = Field(description="when the job ended")
    next_attempt_at: str | None = Field(description="pending: when it is tried next")
    delivered_at: str | None


class Job(Body):
    id: int
    status: Status
    source: Source
    source_path: str | None
    attempts: int = Field(description="attempts started so far, across retries")
    max_attempts: int = Field(description="the attempt number after which a failure is final")
    cancel_requested: bool
    created_at: str
    started_at: str | None
    finished_at: str | None
    flight: str | None = Field(
        description="named on submission or by its inbox folder; null: grouped by capture time"
    )
    input: JobInput
    params: JobParams
    timings_ms: dict[str, float] = Field(description="queue_wait, decode, detect, reason, ...")
    models: dict[str, ModelIdentity]
    result: JobResult | None
    error: ErrorBody | None
    links: JobLinks
    attempt_history: list[Attempt] | None = Field(None, description="on a single job only")
    queue_position: int | None = Field(None, description="single job, queued: its place")
    stage: str | None = Field(None, description="single job, running: the stage it is in")
    followups: list[FollowUp] | None = Field(None, description="questions asked since")
    webhooks: list[WebhookDelivery] | None = Field(
        None, description="single job: its webhook deliveries, one per time it ended"
    )


class JobPage(Body):
    jobs: list[Job]
    next_cursor: str | None = Field(description="pass as `cursor` for the next page")


class DayCount(Body):
    day: str
    jobs: int


class LabelCount(Body):
    detections: int
    jobs: int


class StatsFilter(Body):
    """The filters as the statistics applied them; only those given."""

    status: str | None = None
    source: str | None = None
    created_after: float | None = Field(None, description="Unix seconds")
    created_before: float | None = Field(None, description="Unix seconds")
    captured_after: str | None = None
    captured_before: str | None = None
    folder: str | None = None
    label: str | None = None
    min_count: int | None = None
    q: str | None = Field(None, description="the words, as the full-text query quotes them")
    bbox: list[float] | None = Field(None, description="[west, south, east, north], degrees")
    min_size_m: float | None = None
    flight: str | None = None


class Stats(Body):
    filter: StatsFilter
    jobs: int
    by_status: dict[str, int]
    per_day: list[DayCount]
    detections_per_label: dict[str, LabelCount]
    mean_timings_ms: dict[str, float]


class PruneReport(Body):
    dry_run: bool
    jobs_removed: int
    images_removed: int
    bytes_freed: int


class LoadProgress(Body):
    phase: str = Field(description="resolve|convert|load|warmup|swap")
    percent: float | None = Field(description="null where it cannot be measured")
    elapsed_seconds: float


class LoadEstimate(Body):
    weights_bytes: int
    resident_bytes: int
    peak_bytes: int


class RoleState(Body):
    role: str = Field(description="detector|reasoner")
    state: str = Field(description="unloaded|loading|loaded|failed")
    source: str | None = Field(None, description="hub id or folder")
    quantize: int | None = None
    path: str | None = Field(None, description="the folder loaded (a quantised copy: the cache)")
    revision: str | None = None
    source_revision: str | None = Field(None, description="of the folder asked for")
    bytes_on_disk: int | None = None
    resident_bytes: int | None = None
    peak_load_bytes: int | None = None
    load_seconds: float | None = None
    loaded_at: float | None = Field(None, description="Unix seconds")
    last_used_at: float | None = Field(None, description="Unix seconds")
    jobs_served: int | None = None
    loads: int | None = None
    keep_alive: Literal["pinned"] | float | None = Field(
        None, description="pinned, or seconds idle before it is freed"
    )
    loading: str | None = Field(None, description="what a load in flight brings in")
    progress: LoadProgress | None = None
    phases: dict[str, float] | None = Field(None, description="the last load's seconds per phase")
    estimate: LoadEstimate | None = None
    swap: str | None = Field(None, description="how the last load fitted: beside|replace_first")
    error: str | None = None


class MlxMemory(Body):
    active_bytes: int
    peak_bytes: int
    cache_bytes: int


class ModelsReport(Body):
    budget_bytes: int | None = None
    held_bytes: int | None = None
    prefix_cache_bytes: int | None = Field(
        None, description="the reasoner's cached prompt prefixes; freed first under pressure"
    )
    evict_idle: bool | None = None
    mlx: MlxMemory | None = Field(None, description="null until MLX is in use")
    roles: list[RoleState]


class InboxCounts(Body):
    ingested: int
    duplicates: int
    rejected: int
    already_known: int
    reprocessed: int


class InboxFiling(Body):
    path: str = Field(description="relative to the inbox, as it was found")
    outcome: str = Field(description="queued|duplicate|reprocessed|rejected|pruned")
    job_id: int | None = Field(description="the job it queued, or the one it duplicates")
    code: str | None = Field(description="why it was rejected, for programs")
    message: str | None = Field(description="why it was rejected, for people")
    at: float = Field(description="Unix seconds it was handled")


class InboxStatus(Body):
    """Only `enabled` (and `standby`) when this node does not watch the inbox."""

    enabled: bool
    standby: bool | None = Field(
        None, description="true: another node on this database watches it; this one takes over"
    )
    path: str | None = None
    mode: str | None = Field(None, description="starting|events|polling")
    moving: bool | None = Field(None, description="files are filed to processed/ or failed/")
    settle_seconds: float | None = None
    rescan_seconds: float | None = None
    pending: int | None = None
    waiting: dict[str, str] | None = Field(None, description="file: why it still waits")
    since_start: InboxCounts | None = None
    last_scan_at: float | None = Field(None, description="Unix seconds")
    recent: list[InboxFiling] | None = Field(
        None, description="the last 20 files handled, newest first, kept across restarts"
    )


class QueueDepth(Body):
    depth: int
    running: int
    counts: dict[str, int]


class WorkerState(Body):
    id: str
    current_job: int | None


class CpuBlas(Body):
    """The BLAS MLX's CPU backend multiplies with (`AIP_CPU_BLAS`), measured at model-host
    start."""

    setting: str = Field(description="auto|mkl|bundled")
    blas: str = Field(
        description="mkl|bundled (the mlx[cpu] wheel's)|platform (what this mlx build links)"
    )
    reason: str
    threading: str | None = Field(None, description="MKL's threading layer")
    threads: int | None = None
    library: str | None = Field(None, description="the file serving cblas_sgemm, as bound")
    gflops: float | None = Field(None, description="float32 GEMM 256x256, null until measured")


class Node(Body):
    id: str = Field(description="host:pid:random; the owner on the leases it holds")
    host: str
    pid: int
    role: Literal["serve", "worker"] = Field(description="serve: API (and worker); worker: no API")
    state: Literal["alive", "lost", "stopped"] = Field(
        description="lost: three heartbeats late, by the database's clock"
    )
    models: dict[str, ModelIdentity]
    profiles: list[str] | None = Field(None, description="the profiles it takes; null: all")
    current_job: int | None
    jobs_done: int
    started_at: str
    last_heartbeat: str
    stopped_at: str | None
    seconds_since_heartbeat: float


class NodeList(Body):
    nodes: list[Node]


class LabelSizes(Body):
    min: float
    median: float
    max: float


class Flight(Body):
    id: str = Field(description="its name, or auto-YYYYMMDD-HHMMSS when grouped by time")
    explicit: bool = Field(description="named on submission or by its inbox folder")
    started: str | None = Field(description="the first frame's capture time (camera local)")
    ended: str | None
    frames: int
    located: int = Field(description="frames with a ground footprint")
    area_m2: float = Field(description="the ground the located frames cover, overlaps once")
    bbox: list[float] | None = Field(description="[west, south, east, north], degrees")
    counts: dict[str, int] = Field(description="detections per label")
    sizes: dict[str, LabelSizes] = Field(description="real sizes per label, metres across")
    job_ids: list[int] = Field(description="its jobs, in capture order")


class FlightList(Body):
    flights: list[Flight] = Field(description="newest first")


class ChangedObject(Body):
    job_id: int
    number: int = Field(description="the detection's number in its job")
    lat: float
    lon: float
    uncertainty_m: float


class Change(Body):
    kind: Literal["new", "gone", "moved", "same", "unseen", "unseen_before"]
    label: str
    before: ChangedObject | None
    after: ChangedObject | None
    distance_m: float | None = None
    tolerance_m: float | None = Field(None, description="two sigma of both uncertainties")
    covered_by: list[int] | None = Field(
        None, description="the other flight's frames that saw the spot"
    )


class FlightChanges(Body):
    before: str
    after: str
    counts: dict[str, int]
    new: list[Change]
    gone: list[Change]
    moved: list[Change]
    same: list[Change]
    unseen: list[Change] = Field(description="before-objects the after flight did not see")
    unseen_before: list[Change] = Field(
        description="after-objects outside the before flight's ground"
    )


class ChangeSighting(Body):
    job_id: int
    number: int = Field(description="the detection's number in its job")


class DescribedChange(Body):
    kind: Literal["new", "gone", "moved"]
    label: str
    before: ChangeSighting | None
    after: ChangeSighting | None
    distance_m: float | None = None
    job_id: int | None = Field(
        description="the queued job describing the change; null when no picture of the place "
        "could be made (see reason)"
    )
    reason: str | None = None


class ChangeDescriptions(Body):
    before: str
    after: str
    jobs: list[DescribedChange] = Field(description="one per change, in report order")


class Placed(Body):
    jobs: int = Field(description="succeeded jobs placed again")
    located: int = Field(description="of them, frames now on the ground")
    detections: int = Field(description="detections now on the ground")


class KernelCache(Body):
    path: str = Field(description="MLX_PTX_CACHE_DIR: where MLX's CUDA backend keeps kernels")
    set_by: Literal["aip", "user"] = Field(description="aip: in the data directory; user: yours")


class DeviceReport(Body):
    """What MLX computes on, measured once when the model host starts."""

    backend: str = Field(description="metal|cuda|cpu")
    name: str | None = Field(None, description="device name (architecture)")
    total_bytes: int | None = Field(None, description="device memory; null on the CPU")
    free_bytes: int | None = Field(None, description="free at start (CUDA only)")
    working_set_bytes: int | None = Field(None, description="recommended working set (Metal)")
    kernel_cache: KernelCache | None = None


class Health(Body):
    """Without the token (when one is set), only `status`."""

    status: Literal["ok", "degraded", "loading", "failed"] = Field(
        description="ok; degraded (up, refusing new jobs: see reasons); loading; failed"
    )
    reasons: list[str] | None = Field(None, description="one sentence each, unless ok")
    version: str | None = None
    uptime_seconds: float | None = None
    models: list[RoleState] | None = None
    queue: QueueDepth | None = None
    worker: WorkerState | None = None
    cpu_blas: CpuBlas | None = Field(None, description="null until the BLAS is chosen")
    device: DeviceReport | None = Field(None, description="null until the model host starts")


def errors(*statuses: int) -> dict[int | str, dict[str, Any]]:
    """The `responses=` entry of a route that can answer these error statuses."""
    return {status: {"model": ErrorBody} for status in statuses}


def typed(
    model: type[BaseModel],
    body: dict[str, Any],
    status_code: int = 200,
    headers: dict[str, str] | None = None,
) -> Response:
    """`body` checked against its schema and written by pydantic's JSON writer in one pass:
    a body that breaks the documented contract fails here, not in a client. Measured on a
    page of 200 jobs: ~4 ms, against ~35 ms for FastAPI's default encoding of a plain dict."""
    return Response(
        model.model_validate(body).model_dump_json(exclude_unset=True),
        status_code=status_code,
        media_type="application/json",
        headers=headers,
    )

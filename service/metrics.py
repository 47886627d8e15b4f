"""The service's Prometheus metrics: one registry per app, counters and histograms fed by bus
events and HTTP requests, and a collector that reads the queue, the models and the event
clients at scrape time. It knows neither routes nor the store: what it reads is handed in."""

from __future__ import annotations

import logging
import math
import re
from collections.abc import Callable, Iterable, Iterator, Mapping
from typing import Any, Protocol

from prometheus_client import (
    CollectorRegistry,
    Counter,
    Histogram,
    disable_created_metrics,
    generate_latest,
)
from prometheus_client.core import GaugeMetricFamily
from prometheus_client.metrics_core import Metric
from prometheus_client.registry import Collector

from service.models.sources import ROLES

log = logging.getLogger("aip")

# Every label value comes from a closed set: a client or a job cannot grow a series.
HTTP_METHODS = frozenset({"GET", "HEAD", "POST", "PUT", "PATCH", "DELETE", "OPTIONS"})
OUTCOMES = {"job.succeeded": "succeeded", "job.failed": "failed", "job.cancelled": "cancelled"}
SOURCES = frozenset({"api", "path", "inbox"})
MODEL_STATES = ("unloaded", "loading", "loaded", "failed")
UNMATCHED = "unmatched"  # the route label of a request no route answered
OTHER = "other"
_STAGE = re.compile(r"[a-z][a-z0-9_]{0,31}")  # timings keys are code's names, never a query
_EVENT_TYPE = re.compile(r"[a-z]+\.[a-z_]{1,32}")

# Stages run from milliseconds (decode) to minutes (reasoning on a CPU).
STAGE_BUCKETS = (0.005, 0.01, 0.025, 0.05, 0.1, 0.25, 0.5, 1, 2.5, 5, 10, 30, 60, 120, 300, 600)
HTTP_BUCKETS = (0.001, 0.005, 0.01, 0.025, 0.05, 0.1, 0.25, 0.5, 1, 2.5, 5, 10, 30)


class EventLike(Protocol):
    """What metrics read of service.events.Event."""

    @property
    def type(self) -> str: ...
    @property
    def data(self) -> dict[str, Any]: ...


class HostLike(Protocol):
    """What metrics read of service.models.host.ModelHost."""

    def report(self) -> dict[str, Any]: ...


class BusLike(Protocol):
    """What metrics use of service.events.EventBus."""

    def on(self, callback: Callable[[Any], None]) -> None: ...
    @property
    def listeners(self) -> int: ...


class ServiceCollector(Collector):
    """Gauges read when scraped: queue depth by status, each role's model, event clients."""

    def __init__(self) -> None:
        self.host: HostLike | None = None
        self.bus: BusLike | None = None
        self.counts: Mapping[str, int] = {}  # queue depth, read just before each scrape

    def collect(self) -> Iterator[Metric]:
        queue = GaugeMetricFamily(
            "aip_queue_jobs", "Jobs in the queue by status, read at scrape time", labels=["status"]
        )
        for status, n in self.counts.items():
            queue.add_metric([status], n)
        yield queue
        if self.host is not None:
            yield from _model_families(self.host.report())
        if self.bus is not None:
            yield GaugeMetricFamily(
                "aip_events_clients",
                "Clients connected to the live event stream (GET /v1/events)",
                value=self.bus.listeners,
            )


def _model_families(report: dict[str, Any]) -> Iterator[Metric]:
    resident = GaugeMetricFamily(
        "aip_model_resident_bytes",
        "Memory held by each role's loaded model, measured on its arrays (0 when unloaded)",
        labels=["role"],
    )
    load = GaugeMetricFamily(
        "aip_model_load_seconds",
        "How long each role's loaded model took to load (absent when unloaded)",
        labels=["role"],
    )
    state = GaugeMetricFamily(
        "aip_model_state",
        "Each role's model state: 1 for the state it is in, 0 for the others",
        labels=["role", "state"],
    )
    for role in report.get("roles", []):
        name = str(role.get("role"))
        resident.add_metric([name], role.get("resident_bytes") or 0)
        if role.get("load_seconds") is not None:
            load.add_metric([name], role["load_seconds"])
        for each in MODEL_STATES:
            state.add_metric([name, each], 1 if role.get("state") == each else 0)
    yield from (resident, load, state)
    yield GaugeMetricFamily(
        "aip_model_held_bytes",
        "Memory held by all loaded models together",
        value=report.get("held_bytes") or 0,
    )
    if report.get("budget_bytes") is not None:
        yield GaugeMetricFamily(
            "aip_model_budget_bytes",
            "The memory budget model loads must fit in",
            value=report["budget_bytes"],
        )


class Metrics:
    """The instruments of one app and the registry they live in (never the global one)."""

    def __init__(self) -> None:
        # The text format shows each counter's and histogram's start time as one more
        # `_created` series: twice the series, and nothing here reads them. (A library-wide
        # switch; this process has no other registry.)
        disable_created_metrics()
        self.registry = CollectorRegistry()
        r = self.registry
        self.http_seconds = Histogram(
            "aip_http_request_duration_seconds",
            "Seconds from a request's arrival to its response headers, by method, route "
            "template and status",
            ["method", "route", "status"],
            buckets=HTTP_BUCKETS,
            registry=r,
        )
        self.jobs_finished = Counter(
            "aip_jobs_finished",
            "Jobs that reached a terminal state, by outcome (an attempt queued again to retry "
            "is not finished)",
            ["outcome"],
            registry=r,
        )
        self.retries = Counter(
            "aip_job_retries",
            "Jobs queued again after a failed attempt: automatic retries and retries asked for",
            registry=r,
        )
        self.jobs_created = Counter(
            "aip_jobs_created", "Jobs created, by source (api, path, inbox)", ["source"], registry=r
        )
        self.stage_seconds = Histogram(
            "aip_job_stage_duration_seconds",
            "Seconds each stage of a succeeded job took (queue_wait and total included)",
            ["stage"],
            buckets=STAGE_BUCKETS,
            registry=r,
        )
        self.detections = Counter(
            "aip_job_detections", "Detections recorded by succeeded jobs", registry=r
        )
        self.inbox_seen = Counter(
            "aip_inbox_files_seen", "Files taken from the watched inbox folder", registry=r
        )
        self.inbox_queued = Counter(
            "aip_inbox_files_queued",
            "Inbox files that became jobs (queued or reprocessed; duplicates are not)",
            registry=r,
        )
        self.inbox_failed = Counter(
            "aip_inbox_files_failed", "Inbox files refused, filed under failed/", registry=r
        )
        self.model_loads = Counter(
            "aip_model_loads", "Models loaded, by role", ["role"], registry=r
        )
        self.events = Counter(
            "aip_events_published", "Events published on the bus, by type", ["type"], registry=r
        )
        # Every known label value starts at 0: a rate over a series that appears late is wrong.
        for outcome in OUTCOMES.values():
            self.jobs_finished.labels(outcome)
        for source in SOURCES:
            self.jobs_created.labels(source)
        for role in ROLES:
            self.model_loads.labels(role)
        self.state = ServiceCollector()
        r.register(self.state)

    def watch(self, bus: BusLike, host: HostLike) -> None:
        """Count `bus`'s events from now on; read its clients and `host` at each scrape."""
        self.state.bus, self.state.host = bus, host
        bus.on(self.on_event)

    def on_event(self, event: EventLike) -> None:
        """Called on the publisher's thread (the model thread too): quick, and never raises."""
        try:
            self._count(event.type, event.data or {})
        except Exception:  # a malformed event must not reach the worker that published it
            log.debug("metrics: event %r not counted", getattr(event, "type", None), exc_info=True)

    def _count(self, type: str, data: dict[str, Any]) -> None:
        self.events.labels(type if _EVENT_TYPE.fullmatch(type) else OTHER).inc()
        if type in OUTCOMES:
            self.jobs_finished.labels(OUTCOMES[type]).inc()
        if type == "job.succeeded":
            self.detections.inc(_count_of(data.get("detections")))
            for stage, ms in _stages(data.get("timings_ms")):
                self.stage_seconds.labels(stage).observe(ms / 1000)
        elif type == "job.retrying":
            self.retries.inc()
        elif type == "job.created":
            self.jobs_created.labels(
                data.get("source") if data.get("source") in SOURCES else OTHER
            ).inc()
        elif type == "model.loaded" and data.get("role") in ROLES:
            self.model_loads.labels(data["role"]).inc()
        elif type == "inbox.filed":
            self.inbox_seen.inc()
            if data.get("outcome") in ("queued", "reprocessed"):
                self.inbox_queued.inc()
        elif type == "inbox.rejected":
            self.inbox_seen.inc()
            self.inbox_failed.inc()

    def observe_request(self, method: str, route: str, status: int, seconds: float) -> None:
        self.http_seconds.labels(
            method if method in HTTP_METHODS else OTHER, route, str(status)
        ).observe(seconds)

    def render(self, queue_counts: Mapping[str, int]) -> bytes:
        """The text exposition, with the queue depth just read by the caller."""
        self.state.counts = dict(queue_counts)
        return generate_latest(self.registry)


def _count_of(value: Any) -> int:
    if isinstance(value, bool):
        return 0
    if isinstance(value, int):
        return max(value, 0)
    return len(value) if isinstance(value, list) else 0


def _stages(timings: Any) -> Iterable[tuple[str, float]]:
    if not isinstance(timings, dict):
        return ()
    return [
        (stage, float(ms))
        for stage, ms in timings.items()
        if isinstance(stage, str)
        and _STAGE.fullmatch(stage)
        and isinstance(ms, int | float)
        and math.isfinite(ms)
        and ms >= 0
    ]

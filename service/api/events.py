"""GET /v1/events: the event bus as Server-Sent Events, for every job or one, resumable from the
last event id a client saw. Knows the bus and HTTP, not who publishes."""

from __future__ import annotations

import asyncio
import json
from collections import OrderedDict
from collections.abc import AsyncIterator
from typing import Annotated

from fastapi import APIRouter, Depends, Header, Query, Request
from sse_starlette import EventSourceResponse
from sse_starlette.sse import SendTimeoutError
from starlette.types import Receive, Scope, Send

from service.api.deps import require_token_or_query, services
from service.api.schemas import MAX_ID, errors
from service.errors import InvalidInput
from service.events import Event, Subscription

HEARTBEAT_SECONDS = 15.0
# A write the client has not taken for this long: it stopped reading, and its connection is
# closed (the bus has already let go of its events).
SEND_TIMEOUT_SECONDS = 30.0
BATCH = 256  # events written together at most
# After an event, what else comes this soon goes in the same write: a job's events come in
# bursts, and its reasoning a token at a time; one write per client per burst, not per event,
# is what keeps a hundred clients from slowing the worker.
GATHER_SECONDS = 0.05
RETRY_MS = 2000

router = APIRouter(
    tags=["events"],
    dependencies=[Depends(require_token_or_query)],
    responses=errors(401, 404, 422),
)


class _Encoded:
    """Each event's wire form, made once however many clients it goes to."""

    def __init__(self, size: int = 4096) -> None:
        self.size = size
        self._kept: OrderedDict[int, tuple[Event, bytes]] = OrderedDict()

    def __call__(self, event: Event) -> bytes:
        kept = self._kept.get(event.id)
        if kept is not None and kept[0] is event:  # ids are per bus: two apps may share one
            return kept[1]
        wire = encode(event)
        self._kept[event.id] = (event, wire)
        if len(self._kept) > self.size:
            self._kept.popitem(last=False)
        return wire


def encode(event: Event) -> bytes:
    """`id`, `event` (the type) and `data`: the whole event as one line of JSON."""
    body = json.dumps(
        {
            "id": event.id,
            "type": event.type,
            "job_id": event.job_id,
            "at": event.at,
            "data": event.data,
        },
        separators=(",", ":"),
        default=str,
    )
    return f"id: {event.id}\nevent: {event.type}\ndata: {body}\n\n".encode()


_encoded = _Encoded()


class _Stream(EventSourceResponse):
    """A client that stops reading is cut off after the send timeout: that is the client's
    doing, said in one log line by the server, not an error with a traceback."""

    async def __call__(self, scope: Scope, receive: Receive, send: Send) -> None:
        try:
            await super().__call__(scope, receive, send)
        except SendTimeoutError:
            return


async def _frames(sub: Subscription) -> AsyncIterator[bytes]:
    try:
        opening = [f"retry: {RETRY_MS}", ": connected"]
        if sub.gap:
            opening.append(": some events since the given id are no longer kept")
        yield ("\n".join(opening) + "\n\n").encode()
        async for event in sub:
            await asyncio.sleep(GATHER_SECONDS)
            batch = [event, *sub.drain(BATCH - 1)]
            yield b"".join(_encoded(e) for e in batch)
        if sub.dropped:
            yield b": too far behind: reconnect with Last-Event-ID to resume\n\n"
    finally:
        sub.close()


def _resume_from(header: str | None, query: int | None) -> int | None:
    # A browser's EventSource sends the header on each reconnect with the newest id it saw,
    # while its URL keeps the query it was opened with: the header is the fresher of the two.
    if header is None or not header.strip():
        return query
    text = header.strip()
    if not (text.isascii() and text.isdigit()) or len(text) > 19 or int(text) > MAX_ID:
        raise InvalidInput(
            f"Last-Event-ID {text[:40]!r} is not an event id (the `id:` of an event)",
            code="invalid_event_id",
        )
    return int(text)


@router.get(
    "/events",
    summary="Live events as Server-Sent Events (jobs, models, inbox), resumable",
    description="Each event is `id:`, `event:` (its type) and `data:` (JSON: id, type, job_id, "
    "at, data). Types: job.created, job.claimed, job.stage, job.text (reasoning as it is "
    "generated), job.succeeded, job.failed, job.cancelled, job.retrying, model.progress, "
    "model.loaded, model.unloaded, inbox.filed, inbox.rejected, webhook.delivered, "
    "webhook.failed. A comment line is sent every "
    f"{HEARTBEAT_SECONDS:g} s. Reconnect with `Last-Event-ID` (or `?last_event_id=`) to "
    "get what was missed: the last 10 minutes are kept. A client that falls far behind is "
    "dropped; with a token configured, `?token=` is accepted here for browsers.",
    response_class=_Stream,
    responses={
        200: {
            "content": {"text/event-stream": {"schema": {"type": "string"}}},
            "description": "an endless stream of events",
        }
    },
)
async def events(
    request: Request,
    job_id: Annotated[
        int | None, Query(ge=1, le=MAX_ID, description="only this job's events")
    ] = None,
    last_event_id: Annotated[
        int | None, Query(ge=0, le=MAX_ID, description="resume after this event id")
    ] = None,
    last_event_id_header: Annotated[
        str | None,
        Header(alias="Last-Event-ID", description="resume after this event id (EventSource)"),
    ] = None,
) -> _Stream:
    svc = services(request)
    after = _resume_from(last_event_id_header, last_event_id)
    if job_id is not None:
        await svc.reads.job(job_id)  # 404 for a job that does not exist
    # Subscribed before the response starts: a client that has the headers misses nothing.
    sub = svc.events.subscribe(job_id=job_id, after=after)
    return _Stream(
        _frames(sub),
        ping=HEARTBEAT_SECONDS,
        send_timeout=SEND_TIMEOUT_SECONDS,
        headers={"Cache-Control": "no-store"},
    )

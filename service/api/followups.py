"""Follow-up routes: ask a further question on a succeeded job, and read one follow-up."""

from __future__ import annotations

import asyncio
import contextlib
import math
import time
import unicodedata
from functools import partial
from typing import Annotated, Any

from fastapi import APIRouter, Depends, Path, Query, Request
from fastapi.responses import Response

from service.api.bodies import json_body
from service.api.deps import require_token, services
from service.api.schemas import MAX_ID, FollowUp, JobId, errors, refuse_unencodable, typed
from service.errors import InvalidInput
from service.params import token_limit
from service.store import followups as store

router = APIRouter(
    tags=["follow-ups"], dependencies=[Depends(require_token)], responses=errors(401, 422)
)

MAX_WAIT = 300.0
# A question is at most a few thousand characters: a body far over that is refused unread.
MAX_BODY = 64 * 1024
_WAIT_DOC = f"seconds to wait for the answer, 0 to {MAX_WAIT:g} (0: none)"


def _clean(text: str) -> str:
    """Without control characters other than tab and newline, nor format characters (bidi
    overrides, zero-width ones): never meaningful in a question."""
    return "".join(c for c in text if c in "\t\n" or unicodedata.category(c) not in ("Cc", "Cf"))


_ASK_DOC: dict[str, Any] = {
    "requestBody": {
        "required": True,
        "content": {
            "application/json": {
                "schema": {
                    "type": "object",
                    "required": ["question"],
                    "properties": {
                        "question": {"type": "string"},
                        "max_tokens": {
                            "type": "integer",
                            "minimum": 1,
                            "description": "tokens of the answer; default and ceiling: "
                            "AIP_REASON_MAX_TOKENS",
                        },
                    },
                }
            }
        },
    }
}


def _question(body: Any, max_chars: int) -> str:
    if not isinstance(body, dict):
        raise InvalidInput("the JSON body must be an object", code="invalid_json")
    unknown = set(body) - {"question", "max_tokens"}
    if unknown:
        raise InvalidInput(f"unknown fields: {', '.join(sorted(unknown))}", code="unknown_fields")
    raw = body.get("question")
    if not isinstance(raw, str):
        raise InvalidInput("`question` (a string) is required", code="invalid_question")
    question = _clean(raw).strip()  # control characters (NUL among them) go first
    refuse_unencodable(question, "`question`")
    if not question:
        raise InvalidInput("`question` is empty", code="invalid_question")
    if len(question) > max_chars:
        raise InvalidInput(
            f"question of {len(question)} characters; at most {max_chars}",
            code="invalid_question",
        )
    return question


def _max_tokens(raw: Any, cap: int) -> int:
    try:
        return token_limit(raw, "reason_max_tokens", cap)
    except InvalidInput:
        raise InvalidInput(
            f"max_tokens must be a whole number from 1 to {cap}: AIP_REASON_MAX_TOKENS is "
            "this service's default and ceiling",
            code="invalid_option",
        ) from None


def _seconds(wait: float) -> float:
    if not (math.isfinite(wait) and 0 <= wait <= MAX_WAIT):
        raise InvalidInput(
            f"wait must be a finite number of seconds from 0 to {MAX_WAIT:g}", code="invalid_wait"
        )
    return wait


async def _waited(request: Request, job_id: int, n: int, wait: float) -> dict[str, Any]:
    """The follow-up once answered or failed, or as it is after `wait` seconds: read on the
    read pool, again each time the follow-up loop ends one."""
    reads, loop = services(request).reads, request.app.state.followups
    deadline = time.monotonic() + wait
    while True:
        ended = loop.ended()  # taken before the read: an end after it still wakes us
        view = await reads.run(partial(store.read_one, job_id=job_id, n=n))
        left = deadline - time.monotonic()
        if view["status"] in ("succeeded", "failed") or left <= 0:
            return view
        with contextlib.suppress(TimeoutError):
            await asyncio.wait_for(ended.wait(), timeout=left)


@router.post(
    "/jobs/{job_id}/ask",
    status_code=202,
    openapi_extra=_ASK_DOC,
    summary="Ask a follow-up question on a succeeded job",
    responses={
        200: {"model": FollowUp, "description": "answered (or failed) within `wait`"},
        202: {"model": FollowUp, "description": "queued; GET its link for the answer"},
        **errors(404, 409, 413, 429),
    },
)
async def ask(
    request: Request,
    job_id: JobId,
    wait: float = Query(default=0, description=_WAIT_DOC),
) -> Response:
    svc = services(request)
    seconds = _seconds(wait)
    body = await json_body(request, MAX_BODY, "send a JSON object with a short `question`")
    question = _question(body, svc.settings.max_prompt_chars)
    tokens = _max_tokens(body.get("max_tokens"), svc.settings.reason_max_tokens)
    n = await store.ask(svc.queue, job_id, question, tokens)
    request.app.state.followups.notify()
    view = await _waited(request, job_id, n, seconds)
    done = view["status"] in ("succeeded", "failed")
    headers = {"Location": view["links"]["self"]}
    return typed(FollowUp, view, 200 if done else 202, headers)


@router.get(
    "/jobs/{job_id}/followups/{n}",
    summary="One follow-up question and its answer",
    response_model=FollowUp,
    responses=errors(404),
)
async def show(
    request: Request,
    job_id: JobId,
    n: Annotated[int, Path(ge=1, le=MAX_ID, description="the follow-up's `n`")],
    wait: float = Query(default=0, description=_WAIT_DOC),
) -> Response:
    return typed(FollowUp, await _waited(request, job_id, n, _seconds(wait)))

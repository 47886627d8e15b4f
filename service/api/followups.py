"""Follow-up routes: ask a further question on a succeeded job, and read one follow-up."""

from __future__ import annotations

import asyncio
import json
import re
import sqlite3
import time
from typing import Annotated, Any

from fastapi import APIRouter, Depends, Path, Query, Request
from fastapi.responses import Response

from service.api.deps import require_token, services
from service.api.schemas import MAX_ID, FollowUp, JobId, errors, refuse_unencodable, typed
from service.errors import InvalidInput, NotFound
from service.pipeline import token_limit
from service.store import followups as store

router = APIRouter(
    tags=["follow-ups"], dependencies=[Depends(require_token)], responses=errors(401, 422)
)

# Control characters other than tab and newline: never meaningful in a question.
_CONTROL = re.compile(r"[\x00-\x08\x0b-\x1f\x7f]")
MAX_WAIT = 300.0

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
    refuse_unencodable(raw, "`question`")
    question = _CONTROL.sub("", raw).strip()
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


async def _read(request: Request, job_id: int, n: int) -> dict[str, Any]:
    def read(db: sqlite3.Connection) -> Any:
        return db.execute(
            f"SELECT {store.FOLLOWUP_COLUMNS} FROM followups WHERE job_id = ? AND n = ?",
            (job_id, n),
        ).fetchone()

    row = await services(request).queue.read(read)
    if row is None:
        raise NotFound(f"job {job_id} has no follow-up {n}", code="followup_not_found")
    return store.view(job_id, tuple(row))


async def _waited(request: Request, job_id: int, n: int, wait: float) -> dict[str, Any]:
    """The follow-up once answered or failed, or as it is after `wait` seconds."""
    deadline = time.monotonic() + min(max(wait, 0.0), MAX_WAIT)
    while True:
        view = await _read(request, job_id, n)
        if view["status"] in ("succeeded", "failed") or time.monotonic() >= deadline:
            return view
        await asyncio.sleep(0.05)


@router.post(
    "/jobs/{job_id}/ask",
    status_code=202,
    openapi_extra=_ASK_DOC,
    summary="Ask a follow-up question on a succeeded job",
    responses={
        200: {"model": FollowUp, "description": "answered (or failed) within `wait`"},
        202: {"model": FollowUp, "description": "queued; GET its link for the answer"},
        **errors(404, 409, 413),
    },
)
async def ask(
    request: Request,
    job_id: JobId,
    wait: float = Query(
        default=0, ge=0, le=MAX_WAIT, description="seconds to wait for the answer (0: none)"
    ),
) -> Response:
    svc = services(request)
    try:
        body = json.loads(await request.body())
    except (ValueError, RecursionError):
        raise InvalidInput("the body is not valid JSON", code="invalid_json") from None
    question = _question(body, svc.settings.max_prompt_chars)
    tokens = _max_tokens(body.get("max_tokens"), svc.settings.reason_max_tokens)
    n = await store.ask(svc.queue, job_id, question, tokens)
    request.app.state.followups.notify()
    view = await _waited(request, job_id, n, wait)
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
    wait: float = Query(
        default=0, ge=0, le=MAX_WAIT, description="seconds to wait for the answer (0: none)"
    ),
) -> Response:
    return typed(FollowUp, await _waited(request, job_id, n, wait))

"""Structured answers: checking a job's JSON Schema, reading the reasoner's JSON against it, and
the schema and prompt of a query plan. Pure: knows neither the models nor the database."""

from __future__ import annotations

import json
import re
from typing import Any, NoReturn

import jsonschema_rs

from service.errors import InvalidInput, JobFailure

MAX_SCHEMA_BYTES = 16384
# Deeper schemas are refused before any validator recurses into them.
MAX_SCHEMA_DEPTH = 32

# The drafts whose meta-schemas ship with the validator; any other "$schema" would be fetched.
_DRAFTS = re.compile(
    r"https?://json-schema\.org/(draft-0[467]|draft/2019-09|draft/2020-12)/schema#?"
)

PLAN_SCHEMA: dict[str, Any] = {
    "type": "array",
    "items": {"type": "string", "pattern": "^[a-z][a-z -]{0,39}$"},
    "minItems": 1,
    "maxItems": 6,
    "uniqueItems": True,
}
PLAN_PROMPT = (
    "List the kinds of objects in this image worth detecting and counting, as a JSON array "
    'of 1 to 6 short lowercase names, most important first, like ["car", "person", "roof"].'
)


def _refuse(why: str) -> NoReturn:
    raise InvalidInput(f"response_schema {why}", code="invalid_schema")


def _no_remote(uri: str) -> Any:
    # A schema is checked offline: a $ref to anything outside it is refused, never fetched.
    raise ValueError(f"references outside the schema are not followed: {uri}")


def _depth(value: Any) -> int:
    depth, level = 0, [value]
    while level:
        depth += 1
        if depth > MAX_SCHEMA_DEPTH:
            break
        level = [
            child
            for item in level
            if isinstance(item, dict | list)
            for child in (item.values() if isinstance(item, dict) else item)
        ]
    return depth


def _where(path: Any) -> str:
    parts = [str(p) for p in (path or [])]
    return "/" + "/".join(parts) if parts else "the top level"


def _validator(schema: dict[str, Any]) -> Any:
    return jsonschema_rs.validator_for(schema, retriever=_no_remote)


def _holds_nul(value: Any) -> bool:
    if isinstance(value, str):
        return "\x00" in value
    if isinstance(value, dict):
        return any(_holds_nul(k) or _holds_nul(v) for k, v in value.items())
    if isinstance(value, list):
        return any(_holds_nul(item) for item in value)
    return False


def check_schema(raw: Any) -> dict[str, Any]:
    """`raw` (a dict, or its JSON text) as a JSON Schema object: at most MAX_SCHEMA_BYTES,
    valid against its draft's meta-schema, and compilable (patterns are regexes, every $ref
    resolves inside it). Raises InvalidInput(code="invalid_schema")."""
    if isinstance(raw, bytes | bytearray):
        try:
            raw = bytes(raw).decode("utf-8")
        except UnicodeDecodeError:
            _refuse("is not UTF-8 text")
    if isinstance(raw, str):
        if len(raw.encode("utf-8", "surrogatepass")) > MAX_SCHEMA_BYTES:
            _refuse(f"is larger than {MAX_SCHEMA_BYTES} bytes")
        try:
            raw = json.loads(raw)
        except (ValueError, RecursionError) as exc:
            _refuse(f"is not valid JSON: {exc}")
    if not isinstance(raw, dict):
        _refuse(f"must be a JSON object (a JSON Schema), not {type(raw).__name__}")
    try:
        size = len(json.dumps(raw, allow_nan=False, separators=(",", ":")).encode("utf-8"))
    except (TypeError, ValueError, RecursionError) as exc:
        _refuse(f"is not plain JSON: {exc}")
    if size > MAX_SCHEMA_BYTES:
        _refuse(f"is larger than {MAX_SCHEMA_BYTES} bytes")
    if _depth(raw) > MAX_SCHEMA_DEPTH:
        _refuse(f"is nested deeper than {MAX_SCHEMA_DEPTH} levels")
    if _holds_nul(raw):
        _refuse("holds a NUL character (\\u0000), which no stored text may hold")
    draft = raw.get("$schema")
    if draft is not None and not (isinstance(draft, str) and _DRAFTS.fullmatch(draft)):
        _refuse(
            "$schema must name a JSON Schema draft (4, 6, 7, 2019-09 or 2020-12) or be left out"
        )
    try:
        jsonschema_rs.meta.validate(raw)
        _validator(raw)
    except jsonschema_rs.ValidationError as exc:
        _refuse(f"is not a valid JSON Schema at {_where(exc.instance_path)}: {exc.message}")
    except (ValueError, jsonschema_rs.ReferencingError) as exc:
        _refuse(f"is not a valid JSON Schema: {str(exc).splitlines()[0]}")
    return raw


def _invalid(why: str) -> JobFailure:
    return JobFailure("answer_invalid", why, transient=False)


def _reject_constant(name: str) -> NoReturn:
    raise ValueError(f"{name} is not JSON")


def _load(text: str) -> Any:
    """The answer's JSON value; the failure says when the text stopped before its JSON closed
    (the reasoner ran out of tokens)."""
    body = text.strip()
    if not body:
        raise _invalid("the answer is empty: no JSON value")
    try:
        return json.loads(body, parse_constant=_reject_constant)
    except json.JSONDecodeError as exc:
        if exc.pos >= len(body) or exc.msg.startswith("Unterminated string"):
            raise _invalid(
                "the answer stops before its JSON is complete: the reasoner ran out of tokens "
                "(raise the job's reason_max_tokens, up to AIP_REASON_MAX_TOKENS, or ask for a "
                "smaller answer: fewer fields, maxLength on strings)"
            ) from None
        raise _invalid(f"the answer is not JSON: {exc.msg} at character {exc.pos}") from None
    except (ValueError, RecursionError) as exc:
        raise _invalid(f"the answer is not JSON: {exc}") from None


def _validate(value: Any, schema: dict[str, Any]) -> None:
    try:
        validator = _validator(schema)
    except (ValueError, jsonschema_rs.ReferencingError) as exc:
        raise _invalid(f"response_schema cannot be used: {str(exc).splitlines()[0]}") from None
    for error in validator.iter_errors(value):
        raise _invalid(
            f"the answer does not match response_schema at {_where(error.instance_path)}: "
            f"{error.message}"
        )


def parse_answer(text: str, schema: dict[str, Any]) -> Any:
    """The reasoner's `text` as the JSON value `schema` describes. Raises
    JobFailure("answer_invalid") naming why (not JSON, cut short, or the first error's path)."""
    value = _load(text)
    _validate(value, schema)
    return value


_NAME = re.compile(r'"((?:[^"\\]|\\.)*)"')


def _salvage(text: str) -> list[Any]:
    """The complete strings of an array cut short: `["car", "per` gives ["car"]."""
    body = text.strip()
    if not body.startswith("["):
        return []
    names = []
    for match in _NAME.finditer(body):
        try:
            names.append(json.loads(match.group(0)))
        except ValueError:
            break
    return names


def parse_plan(text: str) -> list[str]:
    """The object names a planning call proposed (PLAN_SCHEMA): spaces tidied, repeats dropped,
    order kept. A list the reasoner cut short keeps its complete names. Raises
    JobFailure("answer_invalid") when no usable name is left."""
    try:
        value = _load(text)
    except JobFailure:
        value = _salvage(text)
        if not value:
            raise
    if isinstance(value, list):
        tidy = (" ".join(v.split()) if isinstance(v, str) else v for v in value)
        value = list(dict.fromkeys(v for v in tidy if v != ""))
    _validate(value, PLAN_SCHEMA)
    return [str(name) for name in value]

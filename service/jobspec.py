"""A job's parameters from the layers that may set them (the service's settings, a named
profile, the inbox folder's config, the job's own fields): each layer's options checked and
normalized here, then merged in that order; knows no transport (form, JSON body, files)."""

from __future__ import annotations

import dataclasses
import math
from collections.abc import Mapping
from typing import Any, Protocol

from service.config import MAX_WEBHOOK_URL, Settings, webhook_url
from service.errors import InvalidInput, NotFound
from service.geo.names import name_problem
from service.params import TOKEN_LIMITS, JobParams, build_params, parse_queries, token_limit
from service.profiles import NO_PROFILE
from service.structured import check_schema
from service.tiles import parse_tiling

# What a profile, a folder config or a job may set; a job or a folder may also name a profile.
OPTION_KEYS = (
    "queries",
    "prompt",
    "tiling",
    "set_of_marks",
    "response_schema",
    "redact",
    "keep_original",
    "detect_max_tokens",
    "reason_max_tokens",
    "webhook",
    "ground_elevation",
    "flight",
)
MAX_REDACT = 16
MAX_REDACT_CHARS = 200
MAX_PROFILE_NAME = 64
MAX_FLIGHT_NAME = 200
_TRUE, _FALSE = {"true", "1"}, {"false", "0"}
AUTO_FLIGHT = "auto"  # a flight option that leaves the job to be grouped by capture time


class Profile(Protocol):
    @property
    def name(self) -> str: ...

    @property
    def params(self) -> dict[str, Any]: ...


class Profiles(Protocol):
    async def get(self, name: str) -> Profile | None: ...

    async def default(self) -> Profile | None: ...


def _strings(raw: Any, what: str, code: str) -> list[str]:
    """A list of strings, or one text (comma-separated), into its non-blank parts."""
    values = [raw] if isinstance(raw, str) else raw
    if not isinstance(values, list) or not all(isinstance(v, str) for v in values):
        raise InvalidInput(f"{what} must be a list of strings or comma-separated text", code=code)
    return list(dict.fromkeys(parse_queries(values)))


def _flag(raw: Any, what: str) -> bool:
    if isinstance(raw, bool):
        return raw
    if isinstance(raw, str) and raw.strip().lower() in _TRUE | _FALSE:
        return raw.strip().lower() in _TRUE
    raise InvalidInput(f"{what} must be true or false", code="invalid_option")


def _whole(raw: Any, what: str) -> int:
    """A positive whole number (form text accepted); its ceiling is the setting's, checked
    when the layers are merged."""
    try:
        if isinstance(raw, bool) or (isinstance(raw, float) and not raw.is_integer()):
            raise TypeError
        value = int(raw.strip() if isinstance(raw, str) else raw)
    except (TypeError, ValueError, OverflowError):
        value = 0
    if value < 1:
        raise InvalidInput(f"{what} must be a whole number from 1", code="invalid_option")
    return value


def _redact(raw: Any, what: str) -> list[str]:
    classes = _strings(raw, what, "invalid_redact")
    if len(classes) > MAX_REDACT:
        raise InvalidInput(
            f"{what}: {len(classes)} classes to redact; at most {MAX_REDACT}",
            code="invalid_redact",
        )
    for name in classes:
        if len(name) > MAX_REDACT_CHARS:
            raise InvalidInput(
                f"{what}: a class of {len(name)} characters; at most {MAX_REDACT_CHARS}",
                code="invalid_redact",
            )
    return classes


def _profile_name(raw: Any, what: str) -> str:
    name = raw.strip() if isinstance(raw, str) else ""
    if not 1 <= len(name) <= MAX_PROFILE_NAME:
        raise InvalidInput(
            f"{what} must name a profile (1 to {MAX_PROFILE_NAME} characters)",
            code="invalid_profile",
        )
    return name


def _webhook(raw: Any, what: str) -> str:
    try:
        if not isinstance(raw, str):
            raise ValueError("not text")
        return webhook_url(raw)
    except ValueError as exc:
        raise InvalidInput(
            f"{what} must be an http:// or https:// URL of at most {MAX_WEBHOOK_URL} "
            f"characters ({exc})",
            code="invalid_webhook",
        ) from None


def _elevation(raw: Any, what: str) -> float:
    """Metres above sea level, from the Dead Sea shore to above any summit."""
    try:
        if isinstance(raw, bool):
            raise TypeError
        value = float(raw.strip() if isinstance(raw, str) else raw)
    except (TypeError, ValueError, OverflowError):
        value = math.nan
    if not -500 <= value <= 9000:
        raise InvalidInput(
            f"{what} must be the ground's height in metres above sea level, -500 to 9000",
            code="invalid_option",
        )
    return value


def _flight(raw: Any, what: str) -> str:
    """A flight's name (service/geo/names.py); `auto` asks for grouping by capture time even
    in an inbox folder."""
    name = raw.strip() if isinstance(raw, str) else ""
    problem = name_problem(name, MAX_FLIGHT_NAME) if name != AUTO_FLIGHT else None
    if problem:
        raise InvalidInput(f"{what} must name a flight: {problem}", code="invalid_flight")
    return name


def _one(key: str, raw: Any, what: str) -> Any:
    """One option normalized, or None when it says nothing (blank text, no queries)."""
    if key == "queries":
        return _strings(raw, what, "invalid_queries") or None
    if key == "prompt":
        if not isinstance(raw, str):
            raise InvalidInput(f"{what} must be a string", code="invalid_prompt")
        return raw.strip() or None
    if key == "tiling":
        return parse_tiling(raw)
    if key == "response_schema":
        return check_schema(raw)
    if key == "redact":
        return _redact(raw, what)
    if key in ("set_of_marks", "keep_original"):
        return _flag(raw, what)
    if key == "profile":
        return _profile_name(raw, what)
    if key == "webhook":
        return _webhook(raw, what)
    if key == "ground_elevation":
        return _elevation(raw, what)
    if key == "flight":
        return _flight(raw, what)
    return _whole(raw, what)  # the token limits


def parse_options(raw: Mapping[str, Any], where: str) -> dict[str, Any]:
    """The options `raw` gives (OPTION_KEYS, and `profile`), checked and normalized; a key
    that is absent, null or blank text is left out. `where` names the layer in messages
    ("the request", "a/aip.json", "profile roof-solar"). Refusals are InvalidInput (422)."""
    unknown = set(raw) - {*OPTION_KEYS, "profile"}
    if unknown:
        raise InvalidInput(
            f"{where}: unknown options {', '.join(sorted(unknown))}; known: "
            f"{', '.join([*OPTION_KEYS, 'profile'])}",
            code="unknown_fields",
        )
    out: dict[str, Any] = {}
    for key, value in raw.items():
        if value is None or (isinstance(value, str) and not value.strip()):
            continue
        try:
            normalized = _one(key, value, f"`{key}`")
        except InvalidInput as exc:
            raise InvalidInput(f"{where}: {exc.message}", code=exc.code) from None
        if normalized is not None:
            out[key] = normalized
    return out


async def _profile(name: str | None, profiles: Profiles | None) -> Profile | None:
    if name == NO_PROFILE:
        return None
    if name is None:
        return await profiles.default() if profiles is not None else None
    try:
        found = await profiles.get(name) if profiles is not None else None
    except NotFound:  # a store may refuse rather than answer None; a job's refusal is a 422
        found = None
    if found is None:
        raise InvalidInput(
            f"there is no profile named {name!r}; `aip profiles list` shows those there are",
            code="unknown_profile",
        )
    return found


async def resolve(
    given: Mapping[str, Any],
    folder: Mapping[str, Any] | None,
    profiles: Profiles | None,
    settings: Settings,
) -> JobParams:
    """The job's parameters: `given` (the job's own options) over `folder` (its inbox
    folder's config) over a profile over the settings, each as parse_options returns it.
    The profile is the one the job names, else the one its folder names, else the default
    one (if any). No queries from any layer, the settings' included, makes a planning job."""
    folder = folder or {}
    profile = await _profile(given.get("profile") or folder.get("profile"), profiles)
    merged: dict[str, Any] = {}
    if profile is not None:
        # Checked when stored; checked again as a shipped or older definition may not be.
        merged.update(parse_options(profile.params, f"profile {profile.name}"))
    merged.update(folder)
    # A profile's or folder's token limit is a preference: the service's ceiling caps it. The
    # job's own was checked against the ceiling when it was sent.
    for name in TOKEN_LIMITS:
        if name in merged and name not in given:
            merged[name] = min(merged[name], getattr(settings, name))
    merged.update(given)
    params = build_params(
        merged.get("queries"),
        merged.get("prompt"),
        default_queries=settings.default_queries,
        default_prompt=settings.default_prompt,
        max_queries=settings.max_queries,
        max_prompt_chars=settings.max_prompt_chars,
        detect_max_tokens=token_limit(
            merged.get("detect_max_tokens"), "detect_max_tokens", settings.detect_max_tokens
        ),
        reason_max_tokens=token_limit(
            merged.get("reason_max_tokens"), "reason_max_tokens", settings.reason_max_tokens
        ),
        allow_plan=True,
    )
    return dataclasses.replace(
        params,
        tiling=merged.get("tiling", "auto"),
        set_of_marks=merged.get("set_of_marks", False),
        response_schema=merged.get("response_schema"),
        redact=tuple(merged.get("redact", ())),
        keep_original=merged.get("keep_original", True),
        profile=profile.name if profile is not None else None,
        webhook=merged.get("webhook", settings.webhook_url),
        ground_elevation=merged.get("ground_elevation"),
        flight=None if merged.get("flight") == AUTO_FLIGHT else merged.get("flight"),
    )

"""A job's parameters: the value stored with each job, its generation limits, and the checks
that build one from queries, a prompt and limits. Pure; service.jobspec layers the sources."""

from __future__ import annotations

from collections.abc import Iterable, Sequence
from dataclasses import dataclass, field
from typing import Any

from service.errors import InvalidInput


@dataclass(frozen=True)
class JobParams:
    queries: tuple[str, ...]
    prompt: str
    options: dict[str, Any] = field(default_factory=dict)
    # Stored resolved, so a retry generates as much as the first attempt did; None only for
    # jobs stored before limits were (they run with the settings' values).
    detect_max_tokens: int | None = None
    reason_max_tokens: int | None = None
    # The aerial options (service.jobspec checks them): "auto" | "off" | {size, overlap,
    # full_frame}; numbered boxes drawn on a second image; a JSON Schema for the answer;
    # classes blurred in every image handed out, and whether the original is kept.
    tiling: str | dict[str, Any] = "auto"
    set_of_marks: bool = False
    response_schema: dict[str, Any] | None = None
    redact: tuple[str, ...] = ()
    keep_original: bool = True
    profile: str | None = None  # the profile the job's parameters were resolved with
    plan: bool = False  # no queries from anywhere: the reasoner proposes what to look for
    webhook: str | None = None  # where the finished job is POSTed (service/webhooks.py)
    # The ground (service/geo): its height in metres above sea level, None for flat ground
    # at take-off height; and the flight the job belongs to, None to be grouped by time.
    ground_elevation: float | None = None
    flight: str | None = None

    def to_dict(self) -> dict[str, Any]:
        out: dict[str, Any] = {
            "queries": list(self.queries),
            "prompt": self.prompt,
            "options": self.options,
        }
        for name in TOKEN_LIMITS:
            if getattr(self, name) is not None:
                out[name] = getattr(self, name)
        out["tiling"] = self.tiling
        out["set_of_marks"] = self.set_of_marks
        if self.response_schema is not None:
            out["response_schema"] = self.response_schema
        out["redact"] = list(self.redact)
        out["keep_original"] = self.keep_original
        if self.profile is not None:
            out["profile"] = self.profile
        out["plan"] = self.plan
        if self.webhook is not None:
            out["webhook"] = self.webhook
        if self.ground_elevation is not None:
            out["ground_elevation"] = self.ground_elevation
        if self.flight is not None:
            out["flight"] = self.flight
        return out

    @classmethod
    def from_dict(cls, raw: dict[str, Any]) -> JobParams:
        return cls(
            tuple(raw["queries"]),
            raw["prompt"],
            dict(raw.get("options") or {}),
            raw.get("detect_max_tokens"),
            raw.get("reason_max_tokens"),
            tiling=raw.get("tiling", "auto"),
            set_of_marks=bool(raw.get("set_of_marks", False)),
            response_schema=raw.get("response_schema"),
            redact=tuple(raw.get("redact") or ()),
            keep_original=bool(raw.get("keep_original", True)),
            profile=raw.get("profile"),
            plan=bool(raw.get("plan", False)),
            webhook=raw.get("webhook"),
            ground_elevation=raw.get("ground_elevation"),
            flight=raw.get("flight"),
        )

    @property
    def detection_queries(self) -> tuple[str, ...]:
        """What the detector looks for: the queries, then classes to redact not among them."""
        return tuple(dict.fromkeys([*self.queries, *self.redact]))


# A job's generation limits: each defaults to, and may not exceed, its setting.
TOKEN_LIMITS = {
    "detect_max_tokens": "AIP_DETECT_MAX_TOKENS",
    "reason_max_tokens": "AIP_REASON_MAX_TOKENS",
}


def token_limit(raw: Any, name: str, cap: int) -> int:
    """A job's `name` (form text or a JSON number; absent: `cap`) checked to be 1..`cap`."""
    if raw is None or raw == "":
        return cap
    refusal = InvalidInput(
        f"{name} must be a whole number from 1 to {cap}: {TOKEN_LIMITS[name]} is this "
        "service's default and ceiling",
        code="invalid_option",
    )
    if isinstance(raw, bool) or (isinstance(raw, float) and not raw.is_integer()):
        raise refusal
    try:
        value = int(raw.strip() if isinstance(raw, str) else raw)
    except (TypeError, ValueError, OverflowError):
        raise refusal from None
    if not 1 <= value <= cap:
        raise refusal
    return value


def parse_queries(values: Iterable[str]) -> list[str]:
    """Repeatable values, each possibly comma-separated: ["car, truck", "person"] -> 3."""
    return [part.strip() for value in values for part in value.split(",") if part.strip()]


def build_params(
    queries: Sequence[str] | None,
    prompt: str | None,
    *,
    default_queries: Sequence[str],
    default_prompt: str,
    max_queries: int,
    max_prompt_chars: int,
    max_query_chars: int = 200,
    detect_max_tokens: int | None = None,
    reason_max_tokens: int | None = None,
    allow_plan: bool = False,
) -> JobParams:
    """`allow_plan`: no queries (given or default) makes a planning job (the reasoner
    proposes them) instead of a refusal."""
    chosen = parse_queries(queries) if queries else list(default_queries)
    unique = list(dict.fromkeys(chosen))
    if not unique and not allow_plan:
        raise InvalidInput("at least one detection query is needed", code="invalid_queries")
    if len(unique) > max_queries:
        raise InvalidInput(
            f"{len(unique)} detection queries; at most {max_queries} per job",
            code="invalid_queries",
        )
    for query in unique:
        if len(query) > max_query_chars:
            raise InvalidInput(
                f"detection query of {len(query)} characters; at most {max_query_chars}",
                code="invalid_queries",
            )
    text = default_prompt if prompt is None or not prompt.strip() else prompt.strip()
    if len(text) > max_prompt_chars:
        raise InvalidInput(
            f"prompt of {len(text)} characters; at most {max_prompt_chars}", code="invalid_prompt"
        )
    return JobParams(
        tuple(unique),
        text,
        detect_max_tokens=detect_max_tokens,
        reason_max_tokens=reason_max_tokens,
        plan=not unique,
    )

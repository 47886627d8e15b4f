"""What a profile is (its name's rule) and the profiles the service ships for aerial surveys:
pure data, seeded into the store at start (service.store.profiles).

Each answer schema is small and bounded (enums, integers with a range, short strings, short
arrays, every field required) so that a small reasoner can fill it under constrained
decoding. Changing one here rewrites the stored copy at the next start."""

from __future__ import annotations

import re
from dataclasses import dataclass
from typing import Any

from service.errors import InvalidInput

NAME = re.compile(r"[a-z0-9][a-z0-9-]{0,63}")


@dataclass(frozen=True)
class Shipped:
    """A profile the service ships: its description and parameters."""

    description: str
    params: dict[str, Any]


# A job or folder naming this uses no profile, not even the default.
NO_PROFILE = "none"


def worker_profiles(text: str) -> tuple[str, ...]:
    """AIP_WORKER_PROFILES / --profiles: comma-separated profile names, NO_PROFILE for jobs
    without one. Raises ValueError naming the first that is not a profile name."""
    names = tuple(part.strip() for part in text.split(",") if part.strip())
    for name in names:
        if name != NO_PROFILE and not NAME.fullmatch(name):
            raise ValueError(
                f"{name[:80]!r} is not a profile name (lowercase letters, digits and hyphens; "
                f"{NO_PROFILE!r} for jobs without a profile)"
            )
    return names


def check_name(name: str) -> str:
    if name == NO_PROFILE:
        raise InvalidInput(
            f"{NO_PROFILE!r} is reserved: a job naming it uses no profile",
            code="invalid_profile_name",
        )
    if not NAME.fullmatch(name):
        raise InvalidInput(
            f"{name[:80]!r} is not a profile name: 1 to 64 lowercase letters, digits and "
            "hyphens, starting with a letter or digit (e.g. my-survey)",
            code="invalid_profile_name",
        )
    return name


_SUMMARY = {"type": "string", "maxLength": 240}
_CITE = " Cite the numbered detections you rely on, like [2]."


def _count(most: int = 10000) -> dict[str, Any]:
    return {"type": "integer", "minimum": 0, "maximum": most}


def _closed(properties: dict[str, Any]) -> dict[str, Any]:
    return {
        "type": "object",
        "properties": properties,
        "required": list(properties),
        "additionalProperties": False,
    }


def _some(choices: list[str], most: int) -> dict[str, Any]:
    return {"type": "array", "items": {"type": "string", "enum": choices}, "maxItems": most}


VEHICLES_PEOPLE = Shipped(
    "Vehicles and people: counts by kind and where they are; people and license plates "
    "blurred in every image handed out",
    {
        "queries": ["car", "truck", "bus", "motorcycle", "bicycle", "person"],
        "prompt": "Count the vehicles and the people in this aerial image and describe where "
        "they are (roads, parking, buildings, open ground)." + _CITE,
        "tiling": "auto",
        "set_of_marks": True,
        # Detection and counting see the original; only the images handed out are blurred.
        "redact": ["person", "license plate"],
        "response_schema": _closed(
            {
                "vehicles": _count(),
                "people": _count(),
                "vehicle_kinds": _some(["car", "truck", "bus", "motorcycle", "bicycle"], 5),
                "setting": {
                    "type": "string",
                    "enum": ["road", "parking", "residential", "industrial", "rural", "other"],
                },
                "summary": _SUMMARY,
            }
        ),
    },
)

ROOF_SOLAR = Shipped(
    "Roof and solar-panel inspection: roofs, panels, visible damage or defects",
    {
        "queries": ["roof", "solar panel", "roof damage", "debris"],
        "prompt": "Inspect the roofs and solar panels in this aerial image: how many roofs "
        "carry panels, and is there visible damage, debris, missing material or soiling?" + _CITE,
        "tiling": "auto",
        "set_of_marks": True,
        "response_schema": _closed(
            {
                "roofs": _count(1000),
                "roofs_with_solar": _count(1000),
                "solar_panels": _count(),
                "condition": {"type": "string", "enum": ["good", "worn", "damaged", "unclear"]},
                "issues": _some(
                    [
                        "missing material",
                        "hole",
                        "debris",
                        "soiling",
                        "cracked panel",
                        "shading",
                        "standing water",
                        "other",
                    ],
                    5,
                ),
                "summary": _SUMMARY,
            }
        ),
    },
)

STORM_DAMAGE = Shipped(
    "Flood and storm damage: water, fallen trees, damaged buildings, blocked roads, people",
    {
        "queries": ["flood water", "fallen tree", "damaged building", "debris", "person"],
        "prompt": "Assess flood and storm damage in this aerial image: how severe it is, how "
        "far the water reaches, which hazards block access, and whether people are "
        "visible who may need help." + _CITE,
        "tiling": "auto",
        # Areas of water and debris: numbered boxes drawn over them would hide more than help.
        "set_of_marks": False,
        "response_schema": _closed(
            {
                "severity": {"type": "string", "enum": ["none", "minor", "moderate", "severe"]},
                "flooding": {"type": "string", "enum": ["none", "partial", "widespread"]},
                "damaged_buildings": _count(1000),
                "people_visible": _count(1000),
                "roads": {"type": "string", "enum": ["passable", "partly blocked", "blocked"]},
                "hazards": _some(
                    [
                        "flood water",
                        "fallen tree",
                        "downed power line",
                        "collapsed structure",
                        "debris",
                        "landslide",
                        "other",
                    ],
                    6,
                ),
                "summary": _SUMMARY,
            }
        ),
    },
)

LIVESTOCK = Shipped(
    "Livestock count: animals by species and how they are spread",
    {
        "queries": ["cow", "sheep", "horse", "goat"],
        "prompt": "Count the livestock in this aerial image by species, say how the animals "
        "are grouped, and note any animal that looks isolated, lying down or outside "
        "a fence." + _CITE,
        "tiling": "auto",
        "set_of_marks": True,
        "response_schema": _closed(
            {
                "total": _count(),
                "by_species": _closed(
                    {
                        "cattle": _count(),
                        "sheep": _count(),
                        "horses": _count(),
                        "goats": _count(),
                        "other": _count(),
                    }
                ),
                "grouping": {
                    "type": "string",
                    "enum": ["one herd", "several groups", "scattered", "none visible"],
                },
                "concerns": _some(
                    [
                        "isolated animal",
                        "animal lying down",
                        "outside fence",
                        "near water",
                        "other",
                    ],
                    5,
                ),
                "summary": _SUMMARY,
            }
        ),
    },
)

BUILTINS: dict[str, Shipped] = {
    "vehicles-people": VEHICLES_PEOPLE,
    "roof-solar": ROOF_SOLAR,
    "storm-damage": STORM_DAMAGE,
    "livestock": LIVESTOCK,
}

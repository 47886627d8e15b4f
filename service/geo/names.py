"""What a flight may be called: names given (on submission, by an inbox folder) and the names
of flights grouped by capture time, which a given name may never take."""

from __future__ import annotations

import re
from datetime import datetime

# auto-YYYYMMDD-HHMMSS after the first frame's capture time; -2, -3 on a clash.
AUTO = re.compile(r"auto-\d{8}-\d{6}(-\d+)?")


def auto_name(first: datetime) -> str:
    return first.strftime("auto-%Y%m%d-%H%M%S")


def is_auto(name: str) -> bool:
    return AUTO.fullmatch(name) is not None


def name_problem(name: str, longest: int) -> str | None:
    """Why `name` cannot be a given flight name, or None. It is shown, and it is a path in URLs
    (`/v1/flights/site-a/day 1`): printable, no empty, `.` or `..` segment (clients would
    normalise them away), and not the form grouped flights are named by."""
    if not 1 <= len(name) <= longest or not name.isprintable():
        return f"1 to {longest} printable characters"
    if any(part in ("", ".", "..") for part in name.split("/")):
        return "no empty, . or .. part between slashes"
    if is_auto(name):
        return "not auto-YYYYMMDD-HHMMSS: that names flights grouped by capture time"
    return None

"""Where the time goes, for a missed target's note: a pyinstrument profile of one callable,
summarised as the few functions that spend most of it (their own time, summed per function)."""

from __future__ import annotations

from collections.abc import Callable
from pathlib import Path
from typing import Any


def hotspots(call: Callable[[], Any], top: int = 4) -> str:
    """Profile `call()` on this thread; "" when pyinstrument is missing (`pip install -e
    '.[bench]'`). Time in `epoll.poll`/`select` is this thread waiting (on another thread or
    the disk)."""
    try:
        from pyinstrument import Profiler
    except ImportError:
        return ""
    profiler = Profiler(interval=0.0005)
    profiler.start()
    try:
        call()
    finally:
        session = profiler.stop()
    root = session.root_frame()
    if root is None:
        return ""
    own: dict[str, float] = {}  # function -> seconds of its own time
    stack = [root]
    while stack:
        frame = stack.pop()
        stack.extend(frame.children)
        if frame.total_self_time > 0:
            owner = frame.parent if frame.is_synthetic_leaf and frame.parent else frame
            where = Path(owner.file_path or "").name
            builtin = not where or where.startswith("<")
            name = owner.function if builtin else f"{where}:{owner.function}"
            own[name] = own.get(name, 0.0) + frame.total_self_time
    total = sum(own.values()) or 1.0
    ranked = sorted(own.items(), key=lambda item: -item[1])[:top]
    parts = [f"{name} {100 * t / total:.0f}%" for name, t in ranked]
    return "event-loop thread's own time: " + ", ".join(parts) + " (epoll.poll: waiting)"

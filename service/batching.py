"""How many queued jobs the worker runs as one batch: the `AIP_BATCH` setting parsed and
validated, and `auto` resolved by a pure rule from the device and measured throughput. Knows
neither the queue nor the models."""

from __future__ import annotations

from collections.abc import Mapping
from typing import Literal

Batch = int | Literal["auto"]

MAX_BATCH = 32
# What `auto` may choose from: the batch sizes the benchmark measures.
CANDIDATES = (1, 2, 4, 8)
# On a GPU, decode is bound by per-step overhead, so a batch of 8 costs about what one does.
GPU_DEFAULT = 8
# On a CPU, measured (bench/batch_bench.py, `small` checkpoints, 2 cores, full run on a quiet
# machine): a burst of 8 jobs ran at 1.03x the jobs/s of one at a time in batches of 2, 0.94x
# in 4s, 1.04x in 8s (a loaded machine once showed 1.57x at 2): the matmuls already use every
# core through the BLAS, so rows buy nothing that pays for a batch's wait and memory.
CPU_DEFAULT = 1
# A larger batch must buy this much throughput over the next smaller one to be worth its
# extra memory and the wait its first job has for the last.
MIN_GAIN = 1.10


def parse_setting(value: str) -> Batch:
    """`auto` or a whole number from 1 to MAX_BATCH (1: one job at a time)."""
    text = value.strip().lower()
    if text == "auto":
        return "auto"
    try:
        number = int(text)
    except ValueError:
        raise ValueError(f"use `auto` or a whole number from 1 to {MAX_BATCH}") from None
    return check(number)


def check(size: int) -> int:
    if isinstance(size, bool) or not 1 <= size <= MAX_BATCH:
        raise ValueError(f"the batch size must be a whole number from 1 to {MAX_BATCH}")
    return size


def best_measured(jobs_per_second: Mapping[int, float], *, min_gain: float = MIN_GAIN) -> int:
    """The batch size to use given burst throughput measured at each size: grow from 1 while
    the next size measured gives at least `min_gain` times the throughput of the current."""
    if min_gain < 1.0:
        raise ValueError("min_gain must be 1.0 or more")
    sizes = sorted(n for n in jobs_per_second if n >= 1 and jobs_per_second[n] > 0)
    if not sizes:
        return 1
    chosen = sizes[0]
    for size in sizes[1:]:
        if jobs_per_second[size] >= min_gain * jobs_per_second[chosen]:
            chosen = size
    return chosen


def resolve(setting: Batch, *, on_cpu: bool, measured: Mapping[int, float] | None = None) -> int:
    """The batch size the worker claims: a number as set; `auto` from throughput measured on
    this device when known, else CPU_DEFAULT on a CPU and GPU_DEFAULT on Metal or a GPU."""
    if setting != "auto":
        return check(setting)
    if measured:
        return best_measured(measured)
    return CPU_DEFAULT if on_cpu else GPU_DEFAULT

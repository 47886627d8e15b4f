"""Memory arithmetic for the model host as pure functions: checkpoint sizes read from
safetensors headers (never the weights), the default budget, and whether a load fits.
Knows neither mlx nor the host's threads."""

from __future__ import annotations

import json
import re
from collections.abc import Callable, Collection, Mapping
from dataclasses import dataclass
from pathlib import Path

from service.errors import OverBudget
from service.models.sources import read_header, shards

# Weights are materialised this many bytes at a time at most, a sixteenth of the model at least
# down to MIN_CHUNK_BYTES: one chunk's source arrays, plus a copy of a tensor the model's
# sanitize() rearranges, are what a load holds beyond its final size. A small model's chunk
# shrinks with it, or one chunk would be the whole model and the peak twice its size.
CHUNK_BYTES = 16 * 1024 * 1024
MIN_CHUNK_BYTES = 1024 * 1024
# Without a GPU working set to go by, models may take this share of physical memory.
RAM_SHARE = 0.75
# On a CUDA device, models may take this share of the device memory free at start. The rest is
# headroom for activations and other processes: MLX's CUDA allocator may use managed memory,
# which past capacity pages to host RAM (slow) rather than failing.
DEVICE_FREE_SHARE = 0.9

_UNITS = {"": 1, "K": 1024, "M": 1024**2, "G": 1024**3, "T": 1024**4}
_SIZE = re.compile(r"^\s*(\d+(?:\.\d+)?)\s*([KMGT]?)(?:I?B)?\s*$", re.IGNORECASE)
_DTYPE_BYTES = {
    "F64": 8, "I64": 8, "U64": 8, "F32": 4, "I32": 4, "U32": 4, "F16": 2, "BF16": 2,
    "I16": 2, "U16": 2, "I8": 1, "U8": 1, "BOOL": 1, "F8_E4M3": 1, "F8_E5M2": 1,
}  # fmt: skip
_HALF = ("F16", "BF16")


def parse_bytes(text: str) -> int:
    """`8G`, `8GB`, `8GiB`, `512M`, `1.5G` or plain bytes; units are binary (G = 2**30)."""
    match = _SIZE.match(text)
    if match is None:
        raise ValueError(f"{text!r} is not a size: use bytes or a number with K, M, G or T")
    return int(float(match.group(1)) * _UNITS[match.group(2).upper()])


def format_bytes(count: float) -> str:
    for unit in ("B", "KiB", "MiB", "GiB"):
        if abs(count) < 1024 or unit == "GiB":
            return f"{count:.0f} {unit}" if unit == "B" else f"{count:.1f} {unit}"
        count /= 1024
    raise AssertionError("unreachable")


@dataclass(frozen=True)
class Tensor:
    name: str
    dtype: str
    shape: tuple[int, ...]
    nbytes: int


def read_tensors(folder: Path) -> list[Tensor]:
    """Every tensor's name, dtype and shape from the shards' JSON headers: no weights are read."""
    tensors = []
    for shard in shards(folder):
        with shard.open("rb") as f:
            header = json.loads(read_header(f))
        for name, info in header.items():
            if name == "__metadata__":
                continue
            start, end = info["data_offsets"]
            tensors.append(Tensor(name, info["dtype"], tuple(info["shape"]), end - start))
    return tensors


@dataclass(frozen=True)
class Estimate:
    """What a load will cost: the weights' bytes in the files, what stays resident once loaded
    (half-precision floats become float32 on the CPU backend), and the peak while loading."""

    weights_bytes: int
    resident_bytes: int
    peak_bytes: int

    def to_dict(self) -> dict[str, int]:
        return {
            "weights_bytes": self.weights_bytes,
            "resident_bytes": self.resident_bytes,
            "peak_bytes": self.peak_bytes,
        }


def _module(name: str) -> str:
    return name.rsplit(".", 1)[0]


def chunk_for(resident_bytes: int) -> int:
    """The bytes materialised per loading step for a model holding `resident_bytes`."""
    return min(CHUNK_BYTES, max(MIN_CHUNK_BYTES, resident_bytes // 16))


def _with_chunk(weights: int, resident: int, largest: int) -> Estimate:
    return Estimate(weights, resident, resident + min(weights, chunk_for(resident)) + 2 * largest)


def estimate_load(tensors: Collection[Tensor], *, cpu: bool) -> Estimate:
    """A checkpoint loaded as it is. Packed (quantised) layers keep their dtypes everywhere."""
    quantised = {_module(t.name) for t in tensors if t.name.endswith(".scales")}
    resident = 0
    for t in tensors:
        widened = cpu and t.dtype in _HALF and _module(t.name) not in quantised
        resident += t.nbytes * (2 if widened else 1)
    largest = max((t.nbytes for t in tensors), default=0)
    return _with_chunk(sum(t.nbytes for t in tensors), resident, largest)


def estimate_quantised(
    tensors: Collection[Tensor],
    *,
    bits: int,
    cpu: bool,
    skip: Callable[[str], bool],
    group_size: int = 64,
) -> Estimate:
    """A full-precision checkpoint after conversion to `bits`, before converting it: matrices
    whose rows split into whole groups are packed (plus a scale and a bias per group, in the
    source dtype); `skip(name)` names what the converter leaves alone (vision towers)."""
    packed = 0
    rest: list[Tensor] = []
    for t in tensors:
        eligible = (
            t.name.endswith(".weight")
            and len(t.shape) == 2
            and t.shape[-1] % group_size == 0
            and not skip(t.name)
        )
        if not eligible:
            rest.append(t)
            continue
        count = t.shape[0] * t.shape[1]
        itemsize = _DTYPE_BYTES.get(t.dtype, 2)
        packed += count * bits // 8 + 2 * (count // group_size) * itemsize
    kept = estimate_load(rest, cpu=cpu)
    largest = max((t.nbytes for t in tensors), default=0)
    return _with_chunk(packed + kept.weights_bytes, packed + kept.resident_bytes, largest)


def conversion_peak(tensors: Collection[Tensor]) -> int:
    """mlx-vlm converts lazily and writes shard by shard: measured, the peak stays below the
    source weights' own size, which is what a conversion is allowed for."""
    return sum(t.nbytes for t in tensors)


def default_budget(
    physical_bytes: int, recommended_working_set: int | None, device_free: int | None = None
) -> int:
    """The GPU's recommended working set when MLX reports one (Apple silicon), else a share of
    the device memory free at start when it reports that (CUDA), else a share of physical
    memory (the CPU)."""
    if recommended_working_set:
        return int(recommended_working_set)
    if device_free:
        return int(device_free * DEVICE_FREE_SHARE)
    return int(physical_bytes * RAM_SHARE)


@dataclass(frozen=True)
class Plan:
    """How a load fits: beside the role's current model (which serves until the swap), or only
    once that model is freed (`replace_first`, jobs for the role wait), after evicting `evict`."""

    replace_first: bool
    evict: tuple[str, ...] = ()


def plan_load(
    role: str,
    what: str,
    need: Estimate,
    *,
    budget: int,
    resident: Mapping[str, int],
    evictable: Collection[str] = (),
) -> Plan:
    """Decide how loading `what` into `role` fits `budget`, given the bytes each loaded role
    holds; `evictable` lists other roles that may be freed to make room. Refuses (OverBudget)
    with both numbers when it cannot fit."""
    own = resident.get(role, 0)
    others = {r: b for r, b in resident.items() if r != role and b}
    held = sum(others.values())
    if held + own + need.peak_bytes <= budget:
        return Plan(replace_first=False)
    if held + need.peak_bytes <= budget:
        return Plan(replace_first=True)
    evict: list[str] = []
    for other in sorted(others, key=lambda r: -others[r]):
        if other not in evictable:
            continue
        evict.append(other)
        held -= others[other]
        if held + need.peak_bytes <= budget:
            return Plan(replace_first=True, evict=tuple(evict))
    holders = " and ".join(f"{format_bytes(b)} is held by the {r}" for r, b in others.items())
    raise OverBudget(
        f"loading the {role} {what} needs about {format_bytes(need.peak_bytes)} "
        f"({need.peak_bytes} bytes) at its peak ({format_bytes(need.resident_bytes)} resident, "
        "estimated from its safetensors headers), but the memory budget is "
        f"{format_bytes(budget)} ({budget} bytes)"
        + (f", of which {holders}" if holders else "")
        + "; raise AIP_MEMORY_BUDGET, unload another model or pick a smaller (or quantised) one"
        + (
            " or set AIP_EVICT_IDLE=1 to let idle roles be freed"
            if others and not evictable
            else ""
        )
    )

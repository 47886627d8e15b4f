"""One load of one role, start to finish: resolve the source, estimate it from its safetensors
headers and fit the budget, convert it once to a cached quantised copy, materialise it in
steps on the model thread (jobs run between the steps), and swap it in between jobs. On
failure the old model serves on. Driven by the model host, which owns every state it sets."""

from __future__ import annotations

import asyncio
import logging
import time
import traceback
from collections.abc import Callable
from dataclasses import dataclass, replace
from pathlib import Path
from typing import Any, Protocol

from service.errors import InvalidInput
from service.events import EventBus
from service.models import budget as budgets
from service.models import loading
from service.models import quantize as quant
from service.models.roles import Loaded, Progress, RoleState, Target
from service.models.sources import bytes_on_disk, go_offline, resolve, revision_of
from service.models.thread import ModelThread

log = logging.getLogger("aip.models")


class Host(Protocol):
    """What a load needs from the model host that drives it (the host satisfies this; swap
    does not import the host, so the dependency runs one way)."""

    roles: dict[str, RoleState]
    stand_ins: dict[str, Callable[[Path], Any]] | None
    resolve_sources: bool
    cache_dir: Path | None
    thread: ModelThread
    events: EventBus

    async def on_cpu(self) -> bool: ...
    async def budget_bytes(self) -> int: ...
    def resident(self) -> dict[str, int]: ...
    def evictable(self, role: str) -> tuple[str, ...]: ...
    async def free(self, role: str, why: str) -> None: ...
    def install(self, role: str, loaded: Loaded) -> None: ...


@dataclass(frozen=True)
class Prepared:
    """A load that fits: what to read, and how it fits the budget."""

    target: Target
    source: Path  # the folder asked for, resolved
    path: Path  # the folder to load: `source`, or its quantised copy
    source_revision: str
    convert: bool
    plan: budgets.Plan


def report(host: Host, state: RoleState, progress: Progress) -> Progress:
    """The role's load progress, as the report shows it and as an event."""
    state.progress = progress
    host.events.publish("model.progress", {"role": state.role, **_said(progress)})
    return progress


def _said(progress: Progress) -> dict[str, Any]:
    described = progress.describe()
    return {"phase": described["phase"], "percent": described["percent"]}


def phase(state: RoleState, name: str, began: float, detail: str) -> None:
    """One log line per phase, with its duration; the durations also show in the report."""
    seconds = time.perf_counter() - began
    state.phases[name] = seconds
    log.info("%s: %s in %.2f s: %s", state.role, name, seconds, detail)


async def prepare(host: Host, role: str, target: Target) -> Prepared:
    """Resolve, find a cached quantised copy, estimate, and fit the budget; raises what it
    refuses (OverBudget with both numbers, InvalidInput, ModelUnavailable) before anything
    is freed or read beyond the headers."""
    state = host.roles[role]
    began = time.perf_counter()
    report(host, state, Progress("resolve"))

    def inspect() -> tuple[Path, str, list[budgets.Tensor]]:  # one trip to a worker thread
        found = (
            resolve(role, target.source, allow_download=False)
            if host.resolve_sources
            else Path(target.source)
        )
        go_offline()  # downloads happen before (`aip models pull`, `aip serve`), never here
        return found, revision_of(found), budgets.read_tensors(found)

    source, source_revision, tensors = await asyncio.to_thread(inspect)
    cpu = await host.on_cpu()
    path, convert = source, False
    if target.quantize:
        if host.cache_dir is None or host.stand_ins is not None:
            raise InvalidInput("this model host has no cache for quantised copies")
        if quant.is_quantised(source):
            raise InvalidInput(
                f"{target.source!r} is quantised already: load it without `quantize`",
                code="already_quantised",
            )
        path = quant.cached_copy(host.cache_dir, source_revision, target.quantize)
        convert = not quant.is_complete(path, source_revision, target.quantize)
    if convert:
        skip = await host.thread.run(loading.multimodal_skip)
        estimate = budgets.estimate_quantised(
            tensors, bits=target.quantize or 0, cpu=cpu, skip=skip, group_size=quant.GROUP_SIZE
        )
        # The conversion runs before the load, so the budget must allow for it too.
        estimate = replace(
            estimate, peak_bytes=max(estimate.peak_bytes, budgets.conversion_peak(tensors))
        )
    else:
        if path != source:
            tensors = await asyncio.to_thread(budgets.read_tensors, path)
        estimate = budgets.estimate_load(tensors, cpu=cpu)
    state.estimate = estimate.to_dict()
    budget = await host.budget_bytes()
    plan = budgets.plan_load(
        role,
        str(target),
        estimate,
        budget=budget,
        resident=host.resident(),
        evictable=host.evictable(role),
    )
    how = "after freeing the old one" if plan.replace_first and state.current else "beside"
    phase(
        state,
        "resolve",
        began,
        f"{source} (revision {source_revision}) needs about "
        f"{budgets.format_bytes(estimate.peak_bytes)} at peak of a "
        f"{budgets.format_bytes(budget)} budget; loading {how}"
        + (f", evicting the {' and the '.join(plan.evict)}" if plan.evict else ""),
    )
    return Prepared(target, source, path, source_revision, convert, plan)


async def run(host: Host, role: str, prepared: Prepared) -> None:
    """Free what the plan says, convert if needed, load, swap. A failure after the old model
    was freed loads that one again before it is raised."""
    state = host.roles[role]
    # What to bring back should this fail, without its runtime: holding that would keep the
    # old weights in memory after they were freed to make room.
    old = replace(state.current, runtime=None) if state.current else None
    freed_old = False
    try:
        for other in prepared.plan.evict:
            await host.free(other, f"evicted to make room for the {role}")
        if prepared.plan.replace_first and old is not None:
            await host.free(role, "freed first: its replacement does not fit beside it")
            freed_old = True
        if prepared.convert:
            await _convert(host, state, prepared)
        loaded = await materialise(
            host, role, prepared.target, prepared.path, prepared.source_revision,
            revision=prepared.source_revision if prepared.path == prepared.source else None,
        )  # fmt: skip
        began = time.perf_counter()
        report(host, state, Progress("swap"))
        await host.thread.run(lambda: host.install(role, loaded))
        phase(state, "swap", began, f"now serving revision {loaded.revision}")
    except BaseException as exc:
        # The traceback's frames hold the half-loaded weights; let them go before going on.
        traceback.clear_frames(exc.__traceback__)
        if isinstance(exc, asyncio.CancelledError):
            raise
        await host.thread.run(loading.give_back_memory)
        if freed_old and old is not None:
            await _restore(host, role, old)
        raise


async def _convert(host: Host, state: RoleState, prepared: Prepared) -> None:
    began = time.perf_counter()
    report(host, state, Progress("convert"))  # mlx-vlm reports no fraction: none is shown
    bits = prepared.target.quantize or 0
    await host.thread.run(
        lambda: quant.convert(
            prepared.source, prepared.path, source_revision=prepared.source_revision, bits=bits
        )
    )
    phase(state, "convert", began, f"to {bits} bits, cached in {prepared.path}")


async def materialise(
    host: Host,
    role: str,
    target: Target,
    path: Path,
    source_revision: str,
    *,
    revision: str | None = None,
) -> Loaded:
    """Read the weights in steps on the model thread (jobs run between them) and wrap them.
    `revision`: the folder's, when already taken (the source loaded as it is)."""
    state = host.roles[role]
    began = time.perf_counter()
    progress = report(host, state, Progress("load", 0.0))
    if host.stand_ins is not None:
        loader = host.stand_ins[role]
        runtime, resident, peak = await host.thread.run(lambda: loading.one_shot(loader, path))
    else:
        staged = await host.thread.run(lambda: loading.open_staged(role, path))
        said = 0
        while not await host.thread.run(staged.step):
            progress.fraction = staged.fraction
            if int(100 * staged.fraction) > said:  # a whole percent more: not every step
                said = int(100 * staged.fraction)
                host.events.publish("model.progress", {"role": role, **_said(progress)})
        runtime, resident, peak = await host.thread.run(staged.finish)
    if revision is None:
        revision = await asyncio.to_thread(revision_of, path)
    on_disk = await asyncio.to_thread(bytes_on_disk, path)
    seconds = time.perf_counter() - began
    estimated = (state.estimate or {}).get("resident_bytes", 0)
    phase(
        state,
        "load",
        began,
        f"{budgets.format_bytes(resident)} resident (estimated {budgets.format_bytes(estimated)}"
        f"), peak {budgets.format_bytes(peak)}, {budgets.format_bytes(on_disk)} on disk",
    )
    return Loaded(
        runtime, target, path, revision, source_revision, on_disk, resident, peak, seconds,
        time.time(),
    )  # fmt: skip


async def _restore(host: Host, role: str, old: Loaded) -> None:
    """Bring back the model a failed replacement had freed: it fit before."""
    try:
        back = await materialise(
            host, role, old.target, old.path, old.source_revision, revision=old.revision
        )
        await host.thread.run(lambda: host.install(role, back))
        log.warning("%s: the previous model %s serves again", role, old.target)
    except Exception as exc:
        log.error("%s: the previous model could not be loaded again: %s", role, exc)

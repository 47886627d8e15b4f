"""The model host: the one owner of both models. It alone loads, swaps, unloads and frees them
and runs every inference, all on its single model thread, one call at a time, off the event
loop; loads must fit its memory budget. Knows neither HTTP nor the queue."""

from __future__ import annotations

import asyncio
import concurrent.futures
import contextlib
import logging
import os
import time
from collections.abc import Callable
from dataclasses import replace
from pathlib import Path
from typing import TYPE_CHECKING, Any, TypeVar

from service.errors import AipError, Conflict, JobFailure, ModelUnavailable, NotFound
from service.events import EventBus
from service.models import blas, device, loading, swap
from service.models import budget as budgets
from service.models import quantize as quant
from service.models.roles import Loaded, Progress, RoleState, Target
from service.models.sources import ROLES
from service.models.thread import ModelThread
from service.periodic import every

if TYPE_CHECKING:
    from service.config import Settings

log = logging.getLogger("aip.models")
T = TypeVar("T")
Loader = Callable[[Path], Any]
_MISSING = object()  # what a model-thread call returns when a role it needs is not in memory


class ModelHost:
    def __init__(
        self,
        sources: dict[str, str],
        *,
        loaders: dict[str, Loader] | None = None,
        resolve_sources: bool = True,
        budget_bytes: int | None = None,
        keep_alive: dict[str, float | None] | None = None,
        quantize: dict[str, int | None] | None = None,
        evict_idle: bool = False,
        cache_dir: Path | None = None,
    ) -> None:
        """`loaders` (one call, path -> runtime) and `resolve_sources=False` let tests host
        stand-in models. `budget_bytes` None: the platform's default. `keep_alive[role]` None:
        pinned. `cache_dir` holds quantised copies; without it `quantize` is refused."""
        self.roles = {
            role: RoleState(
                role,
                Target(sources[role], quant.check_bits((quantize or {}).get(role))),
                keep_alive=(keep_alive or {}).get(role),
            )
            for role in ROLES
        }
        self.stand_ins = loaders
        self.resolve_sources = resolve_sources
        self.evict_idle = evict_idle
        self.cache_dir = cache_dir
        self.thread = ModelThread()
        self._budget = budget_bytes
        self._slot: concurrent.futures.Future[None] | None = None  # the one load in flight
        self._jobs = 0  # jobs inside infer(): running, or waiting for a model
        self._tasks: set[asyncio.Task[None]] = set()
        self._cpu: bool | None = None
        # Load progress, loads and unloads are said here; the service puts its own bus in.
        self.events = EventBus()

    @classmethod
    def from_settings(cls, settings: Settings) -> ModelHost:
        # Before anything imports mlx; once per process. Where MKL is required but cannot load,
        # load_all fails both roles with the reason (in /v1/health), as does any later load.
        with contextlib.suppress(blas.BlasUnavailable):
            blas.configure(settings.cpu_blas)
        return cls(
            {"detector": settings.detector, "reasoner": settings.reasoner},
            budget_bytes=settings.memory_budget_bytes,
            keep_alive={
                "detector": settings.detector_keep_alive,
                "reasoner": settings.reasoner_keep_alive,
            },
            quantize={
                "detector": settings.detector_quantize,
                "reasoner": settings.reasoner_quantize,
            },
            evict_idle=settings.evict_idle,
            cache_dir=settings.data_dir / "models" / "quantized",
        )

    # -- reports ------------------------------------------------------------------------------

    @property
    def ready(self) -> bool:
        """Both roles serve, or can: one freed on purpose is loaded again by the next job."""
        return all(state.available for state in self.roles.values())

    def describe(self) -> list[dict[str, Any]]:
        return [state.describe() for state in self.roles.values()]

    def identity(self) -> dict[str, Any]:
        return {role: state.identity() for role, state in self.roles.items()}

    def report(self) -> dict[str, Any]:
        """The roles and the memory picture: budget, what the models hold, MLX's counters."""
        return {
            "budget_bytes": self._budget,
            "held_bytes": sum(self.resident().values()),
            "prefix_cache_bytes": self.cache_bytes(),
            "evict_idle": self.evict_idle,
            "mlx": loading.memory_if_imported(),
            "roles": self.describe(),
        }

    async def budget_bytes(self) -> int:
        if self._budget is None:
            found = await self.thread.run(device.measure)
            physical = os.sysconf("SC_PAGE_SIZE") * os.sysconf("SC_PHYS_PAGES")
            self._budget = budgets.default_budget(
                physical, found.working_set_bytes, found.free_bytes
            )
        return self._budget

    def resident(self) -> dict[str, int]:
        return {r: s.current.resident_bytes for r, s in self.roles.items() if s.current}

    def evictable(self, role: str) -> tuple[str, ...]:
        """With eviction on, the other loaded roles while idle: no job running or waiting
        (every job needs both roles)."""
        if not self.evict_idle or self._jobs:
            return ()
        return tuple(r for r, s in self.roles.items() if r != role and s.current is not None)

    async def on_cpu(self) -> bool:
        if self._cpu is None:
            self._cpu = await self.thread.run(loading.on_cpu)
        return self._cpu

    # -- loading ------------------------------------------------------------------------------

    async def load_all(self) -> None:
        """Load both roles as configured; a failure is kept on the role and raised. First,
        once: which CPU BLAS serves and its speed (a tiny GEMM, ms), for the health report."""
        if self.stand_ins is None and (blas.describe() or {}).get("gflops") is None:
            try:
                await self.thread.run(blas.measure)
            except blas.BlasUnavailable as exc:  # mlx cannot be imported: no model can load
                for state in self.roles.values():
                    state.state, state.error = "failed", exc.message
                raise
        if self.stand_ins is None:
            _said_device(await self.thread.run(device.measure))
        for role in ROLES:
            await self.load(role)

    async def load(self, role: str, target: Target | None = None, *, wait: bool = True) -> None:
        """Load `target` (default: what the role should hold) into `role`: beside the model it
        holds when the budget allows (that one serves until the swap), else after freeing it
        (jobs for the role wait). What is refused (over budget, bad input, a load already in
        flight) raises at once; with `wait=False` the rest then runs in the background and
        shows in `describe()`. A failed load leaves the old model serving."""
        state = self._role(role)
        target = target or state.target
        quant.check_bits(target.quantize)
        if self._slot is not None:
            busy = ", ".join(f"{s.role} <- {s.loading}" for s in self.roles.values() if s.loading)
            raise Conflict(
                f"another model load is in flight ({busy}); try again when it has finished "
                "(GET /v1/models shows its progress)",
                code="load_in_flight",
            )
        slot: concurrent.futures.Future[None] = concurrent.futures.Future()
        self._slot = slot
        before = (state.state, state.phases, state.estimate)
        state.loading, state.pending = target, slot
        state.state, state.error, state.phases = "loading", None, {}
        try:
            # Cached prompt prefixes go before any model would: a load is the pressure.
            await self.thread.run(lambda: self.fit_caches(0))
            prepared = await swap.prepare(self, role, target)
        except BaseException as exc:  # refused: the role stays as it was, with the reason
            self._settle(state, slot, before[0], exc)
            state.phases, state.estimate = before[1], before[2]
            raise
        if wait:
            await self._swap(role, prepared, slot, raise_errors=True)
            return
        task = asyncio.ensure_future(self._swap(role, prepared, slot, raise_errors=False))
        self._tasks.add(task)
        task.add_done_callback(self._tasks.discard)

    async def _swap(
        self,
        role: str,
        prepared: swap.Prepared,
        slot: concurrent.futures.Future[None],
        *,
        raise_errors: bool,
    ) -> None:
        state = self.roles[role]
        try:
            await swap.run(self, role, prepared)
        except BaseException as exc:
            log.error("%s: loading %s failed: %s", role, prepared.target, _reason(exc))
            self._settle(state, slot, "loaded" if state.current else "failed", exc)
            if isinstance(exc, asyncio.CancelledError):
                raise
            if raise_errors:
                if isinstance(exc, AipError):
                    raise
                raise ModelUnavailable(
                    f"the {role} model {prepared.target} failed to load: {_reason(exc)}",
                    code="model_load_failed",
                ) from exc
            return
        state.target = prepared.target
        state.swap = "replace_first" if prepared.plan.replace_first else "beside"
        self._settle(state, slot, "loaded")
        self.events.publish("model.loaded", {"role": role})

    def install(self, role: str, loaded: Loaded) -> None:
        """On the model thread, between jobs: the new model is warmed up, then takes over and
        the old one is freed."""
        state = self.roles[role]
        if self.stand_ins is None:
            self._warm_up(state, loaded.runtime)
        held = state.current.resident_bytes if state.current else 0
        loading.let_go(lambda: setattr(state, "current", loaded), held)
        state.last = replace(loaded, runtime=None)  # a description only: holds no weights
        state.loads += 1
        self.fit_caches()

    def _warm_up(self, state: RoleState, runtime: Any) -> None:
        """Every load of a real model runs one small inference before the model serves (stand-in
        runtimes are not warmed): the role stays `loading`, in phase `warmup` (/v1/health is
        503 until every role serves), and its seconds join the load's phases. Within the
        budget: it runs on the model just loaded, before anything else loads."""
        state.progress = Progress("warmup")
        began = time.perf_counter()
        swap.phase(state, "warmup", began, loading.warm_up(state.role, runtime))

    # -- caches -------------------------------------------------------------------------------

    def _caches(self) -> list[Any]:
        return [
            cache
            for state in self.roles.values()
            if state.current is not None
            and (cache := getattr(state.current.runtime, "prefixes", None)) is not None
        ]

    def cache_bytes(self) -> int:
        """What the runtimes' caches (the reasoner's prompt prefixes) hold now."""
        return sum(int(cache.nbytes) for cache in self._caches())

    def fit_caches(self, room: int | None = None) -> int:
        """On the model thread: bound the caches to `room` bytes (None: what the budget leaves
        beside the models, which stays their bound), dropping their oldest entries first;
        returns the bytes freed."""
        bound = room is None
        if room is None and self._budget is not None:
            room = max(self._budget - sum(self.resident().values()), 0)
        freed = 0
        for cache in self._caches():
            if bound:
                cache.max_bytes = room
            freed += cache.shrink(room)
        if freed:
            loading.give_back_memory()
        return freed

    def _settle(
        self,
        state: RoleState,
        slot: concurrent.futures.Future[None],
        state_after: str,
        error: BaseException | None = None,
    ) -> None:
        state.loading = state.pending = state.progress = None
        state.state = state_after
        if error is not None:
            state.error = _reason(error)
            # A failed load's last progress report, so a watcher need not poll to learn it.
            failed = {"role": state.role, "phase": "failed", "percent": None, "error": state.error}
            self.events.publish("model.progress", failed)
        if self._slot is slot:
            self._slot = None
        if not slot.done():
            slot.set_result(None)  # waiters look at the role again, whatever happened

    # -- freeing ------------------------------------------------------------------------------

    async def unload(self, role: str, why: str = "asked to") -> None:
        """Free the role's model; a job that needs it later loads it again."""
        state = self._role(role)
        if state.pending is not None:
            raise Conflict(
                f"the {role} is loading {state.loading}; unload it once that has finished",
                code="load_in_flight",
            )
        await self.free(role, why)

    async def free(self, role: str, why: str) -> None:
        state = self.roles[role]
        if state.current is not None:
            began = time.perf_counter()
            held = state.current.resident_bytes
            await self.thread.run(lambda: self._drop(role))
            log.info("%s: unload %s in %.2f s (%s)", role, budgets.format_bytes(held),
                     time.perf_counter() - began, why)  # fmt: skip
            self.events.publish("model.unloaded", {"role": role, "why": why})
        if state.state == "loaded":
            state.state = "unloaded"

    def _drop(self, role: str) -> None:
        state = self.roles[role]
        held = state.current.resident_bytes if state.current else 0
        loading.let_go(lambda: setattr(state, "current", None), held)

    async def expire_idle(self, now: float | None = None) -> list[str]:
        """Unload the roles with a keep-alive that no job has used for that long; never while
        a job runs or waits, or while a load is in flight. Returns the roles unloaded."""
        if self._jobs or self._slot is not None:
            return []
        now = time.time() if now is None else now
        expired = []
        for role, state in self.roles.items():
            model = state.current
            if state.keep_alive is None or model is None:
                continue
            idle = now - max(state.last_used or 0.0, model.loaded_at)
            if idle >= state.keep_alive:
                await self.unload(role, f"idle {idle:.1f} s, keep-alive {state.keep_alive:g} s")
                expired.append(role)
        return expired

    async def keep_alive(self) -> None:
        """For the service's life: apply keep-alives (returns at once when all are pinned)."""
        limits = [s.keep_alive for s in self.roles.values() if s.keep_alive is not None]
        if not limits:
            return
        tick = min(max(min(limits) / 4, 0.05), 5.0)
        await every(tick, self.expire_idle, what="the keep-alive check", log=log)

    # -- inference ----------------------------------------------------------------------------

    async def infer(self, fn: Callable[[Any, Any], T], served: dict[str, Any] | None = None) -> T:
        """Run `fn(detector, reasoner)` on the model thread. A role not in memory (freed by its
        keep-alive, or mid-swap) is waited for or loaded again first: the job waits, it does
        not fail. `served` is filled, in the same model-thread step as the call, with the
        identity of the models that ran it."""
        self._jobs += 1
        try:
            while True:
                for role in ROLES:
                    await self._available(role)
                outcome = await self.thread.run(lambda: self._serve(fn, served))
                if outcome is not _MISSING:
                    return outcome
        finally:
            self._jobs -= 1

    async def _available(self, role: str) -> None:
        state = self.roles[role]
        while state.current is None:
            if self._slot is not None:
                await asyncio.shield(asyncio.wrap_future(self._slot))
                continue
            if state.state == "failed" or state.last is None:
                raise ModelUnavailable(
                    f"the {role} model is not loaded: {state.error or 'it is still loading'}",
                    code="models_loading" if state.error is None else "model_load_failed",
                )
            log.info("%s: a job needs it: loading it again", role)
            try:
                await self.load(role)
            except Conflict:
                continue  # another load started first: wait for that one
            except AipError as exc:
                raise JobFailure(exc.code, exc.message, transient=True) from exc

    def _serve(self, fn: Callable[[Any, Any], T], served: dict[str, Any] | None) -> Any:
        """On the model thread: no swap can happen between these lines."""
        detector, reasoner = self.roles["detector"], self.roles["reasoner"]
        if detector.current is None or reasoner.current is None:
            return _MISSING
        if served is not None:
            served.clear()
            served.update(self.identity())
        try:
            return fn(detector.current.runtime, reasoner.current.runtime)
        finally:
            now = time.time()
            for state in (detector, reasoner):
                state.jobs_served += 1
                state.last_used = now

    # -- the rest -----------------------------------------------------------------------------

    def _role(self, role: str) -> RoleState:
        if role not in self.roles:
            raise NotFound(f"no model role {role!r}: the roles are {', '.join(ROLES)}")
        return self.roles[role]

    async def close(self) -> None:
        loop = asyncio.get_running_loop()
        mine = [task for task in self._tasks if task.get_loop() is loop]
        for task in mine:
            task.cancel()
        await asyncio.gather(*mine, return_exceptions=True)
        for state in self.roles.values():
            state.current, state.state = None, "unloaded"
        await asyncio.to_thread(self.thread.close)


def _said_device(found: device.Device) -> None:
    """The start-up line that says what MLX computes on."""
    memory = "host memory"
    if found.total_bytes:
        memory = budgets.format_bytes(found.total_bytes)
        if found.free_bytes is not None:
            memory += f", {budgets.format_bytes(found.free_bytes)} free"
    cache = (device.describe() or {}).get("kernel_cache")
    kernels = f"; kernel cache {cache['path']}" if cache and found.backend == "cuda" else ""
    name = found.name or "an unnamed device"
    log.info("MLX backend %s on %s (%s)%s", found.backend, name, memory, kernels)


def _reason(exc: BaseException) -> str:
    if isinstance(exc, AipError):
        return exc.message
    text = str(exc).strip().splitlines()[0][:300] if str(exc).strip() else ""
    return f"{type(exc).__name__}: {text}" if text else type(exc).__name__

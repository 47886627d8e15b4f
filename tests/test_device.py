"""The backend and device MLX computes on, the default memory budget from what the device
reports (stand-ins for `mx.device_info` shaped like MLX 0.32's CUDA and Metal reports, and the
real CPU one), and MLX's kernel cache pointed into the data directory by the real `aip serve`."""

from __future__ import annotations

import asyncio
import os
import subprocess
import sys
from pathlib import Path
from types import SimpleNamespace
from typing import Any

import mlx.core as mx
import pytest

from service.models import budget, device
from service.models.host import ModelHost
from tests.conftest import free_port, subprocess_env

GIB = 1024**3
# As MLX 0.32.4's CUDA backend reports an H200 (mlx/backend/cuda/device_info.cpp).
CUDA_INFO = {
    "device_name": "NVIDIA H200",
    "architecture": "sm_90",
    "uuid": "GPU-00000000-0000-0000-0000-000000000000",
    "pci_bus_id": "0000:00:00.0",
    "compute_capability_major": 9,
    "compute_capability_minor": 0,
    "total_memory": 150 * GIB,
    "free_memory": 140 * GIB,
}
# As MLX reports an Apple silicon GPU.
METAL_INFO = {
    "device_name": "Apple M3 Max",
    "architecture": "applegpu_g15s",
    "memory_size": 64 * GIB,
    "max_recommended_working_set_size": 48 * GIB,
    "max_buffer_length": 32 * GIB,
}


@pytest.fixture(autouse=True)
def unmeasured(monkeypatch: pytest.MonkeyPatch) -> None:
    """Each test measures afresh; the process's own measurement comes back afterwards."""
    monkeypatch.setattr(device, "_found", None)
    monkeypatch.setattr(device, "_kernel_cache_set_by", None)


def pretend(monkeypatch: pytest.MonkeyPatch, kind: str, info: dict[str, Any]) -> None:
    """Make mlx say its default device is a GPU of `kind` (cuda|metal) reporting `info`."""
    monkeypatch.setattr(mx, "default_device", lambda: mx.Device(mx.gpu))
    monkeypatch.setattr(mx, "device_info", lambda *_: dict(info))
    monkeypatch.setattr(mx.metal, "is_available", lambda: kind == "metal")
    cuda = SimpleNamespace(is_available=lambda: kind == "cuda")
    monkeypatch.setattr(mx, "cuda", cuda, raising=False)  # older builds have no mx.cuda


def default_budget() -> int:
    """The budget a model host with no configured one settles on, through its model thread."""
    host = ModelHost({"detector": "a", "reasoner": "b"}, loaders={}, resolve_sources=False)

    async def ask() -> int:
        try:
            return await host.budget_bytes()
        finally:
            await host.close()

    return asyncio.run(ask())


def test_cuda_budget_is_a_share_of_the_device_memory_free_at_start(
    monkeypatch: pytest.MonkeyPatch,
) -> None:
    pretend(monkeypatch, "cuda", CUDA_INFO)
    assert device.backend() == "cuda"
    assert device.device_name() == "NVIDIA H200 (sm_90)"
    assert device.device_memory() == (150 * GIB, 140 * GIB)
    assert default_budget() == int(140 * GIB * budget.DEVICE_FREE_SHARE)  # not host RAM
    found = device.describe()
    assert found is not None and found["backend"] == "cuda"
    assert (found["total_bytes"], found["free_bytes"]) == (150 * GIB, 140 * GIB)


def test_metal_budget_is_the_recommended_working_set(monkeypatch: pytest.MonkeyPatch) -> None:
    pretend(monkeypatch, "metal", METAL_INFO)
    assert device.backend() == "metal"
    assert device.device_name() == "Apple M3 Max (applegpu_g15s)"
    assert device.device_memory() == (64 * GIB, None)  # Metal reports no free figure
    assert default_budget() == 48 * GIB


def test_cpu_budget_is_a_share_of_host_memory() -> None:
    if device.backend() != "cpu":
        pytest.skip("this machine's MLX computes on a GPU")
    physical = os.sysconf("SC_PAGE_SIZE") * os.sysconf("SC_PHYS_PAGES")
    assert device.device_memory() is None
    assert default_budget() == int(physical * budget.RAM_SHARE)
    found = device.describe()
    assert found is not None and found["backend"] == "cpu" and found["total_bytes"] is None


def test_the_budget_rule_in_order() -> None:
    assert budget.default_budget(100, 40, 80) == 40  # a working set wins
    assert budget.default_budget(100, None, 80) == int(80 * budget.DEVICE_FREE_SHARE)
    assert budget.default_budget(100, None, None) == int(100 * budget.RAM_SHARE)


def test_a_kernel_cache_the_user_set_is_left_alone(tmp_path: Path) -> None:
    mine: dict[str, str] = {}
    assert device.use_kernel_cache(tmp_path, mine) == {
        "path": str(tmp_path / "mlx-kernels"),
        "set_by": "aip",
    }
    assert mine == {"MLX_PTX_CACHE_DIR": str(tmp_path / "mlx-kernels")}
    theirs = {"MLX_PTX_CACHE_DIR": "/elsewhere/ptx"}
    assert device.use_kernel_cache(tmp_path, theirs) == {"path": "/elsewhere/ptx", "set_by": "user"}
    assert theirs == {"MLX_PTX_CACHE_DIR": "/elsewhere/ptx"}


def test_aip_serve_points_the_kernel_cache_into_the_data_directory(tmp_path: Path) -> None:
    """The real start-up path, ended early to stay cheap: `aip serve` sets MLX_PTX_CACHE_DIR
    before anything imports mlx and says so at debug level; a missing model then stops
    it before any model loads."""
    data_dir, missing = tmp_path / "data", tmp_path / "missing"
    env = subprocess_env(
        tmp_path / "inbox", data_dir=data_dir, port=str(free_port()), detector=missing
    )
    env.pop("MLX_PTX_CACHE_DIR", None)
    done = subprocess.run(
        [sys.executable, "-m", "service.cli", "serve", "--log-level", "debug"],
        env=env,
        capture_output=True,
        text=True,
        timeout=120,
        check=False,
    )
    assert done.returncode == 2, done.stderr
    said = f"MLX kernel cache (CUDA): {data_dir / 'mlx-kernels'} (in the data directory)"
    assert said in done.stderr
    assert "not a model folder" in done.stderr.splitlines()[-1]

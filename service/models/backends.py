"""Which MLX backend distributions are installed, and the one-sentence fix when it is not exactly
one; reads package metadata only, never imports mlx."""

from __future__ import annotations

import importlib.metadata
import sys
from collections.abc import Sequence

# The distributions that ship mlx/lib/libmlx.so: each is one whole backend, and two installed
# share that one file, whichever was installed last serving. mlx-cuda is the CUDA backend's
# name before 0.31 (mlx-vlm's `cuda` extra still asks for it).
BACKENDS = ("mlx-cpu", "mlx-cuda-12", "mlx-cuda-13", "mlx-metal", "mlx-cuda")

CHOOSE = (
    "`pip install -e '.[cpu]'` in the project folder, or '.[cuda12]' / '.[cuda13]' on a Linux "
    "machine with an NVIDIA GPU and CUDA 12 / 13 (README: Installing)"
)


def installed_backends(path: Sequence[str] | None = None) -> list[str]:
    """The backend distributions installed, in BACKENDS' order; `path` searches those folders
    instead of sys.path."""
    where = list(sys.path if path is None else path)
    return [
        name
        for name in BACKENDS
        if next(iter(importlib.metadata.distributions(name=name, path=where)), None) is not None
    ]


def backend_problem(path: Sequence[str] | None = None, platform: str | None = None) -> str | None:
    """None when exactly one backend is installed; otherwise one sentence saying what to run.
    `platform` stands for sys.platform."""
    found = installed_backends(path)
    if len(found) == 1:
        return None
    if not found:
        if (platform or sys.platform) == "darwin":
            return (
                "no MLX backend is installed (on macOS mlx brings mlx-metal): run "
                "`pip install --force-reinstall 'mlx>=0.32.4'`"
            )
        return f"no MLX backend is installed: run {CHOOSE}"
    names = ", ".join(found)
    return (
        f"{len(found)} MLX backends are installed ({names}), and they overwrite each other's "
        f"libmlx.so: run `pip uninstall -y {' '.join(found)}`, then install one: {CHOOSE}"
    )

"""E2B decode benchmark (issue row 7, first half; full run only): text decode tokens/s of the
Gemma 4 E2B shape at 4 bits against this machine's memory-bandwidth bound (weight bytes read
per token ÷ measured copy bandwidth).

    .venv/bin/python -m bench.e2b_decode_bench

Builds `aip models tiny --size e2b` once under bench/results/checkpoints (minutes, ~2.7 GB).
"""

from __future__ import annotations

import json
import sys
import time
from pathlib import Path
from typing import Any, cast

import numpy as np

from bench.overhead_bench import CHECKPOINTS
from bench.table import Row, compare, main_for, median
from service.models import mlx_runtime

TOKENS = 8  # on a CPU backend this shape decodes at ~20 s per token
RUNS = 2


def copy_bandwidth(size: int = 1 << 30, runs: int = 5) -> float:
    """Bytes per second moved by a large memory copy (read + write), best of `runs`."""
    src = np.ones(size, dtype=np.uint8)
    dst = np.empty_like(src)
    best = float("inf")
    for _ in range(runs):
        began = time.perf_counter()
        np.copyto(dst, src)
        best = min(best, time.perf_counter() - began)
    return 2 * size / best


def bytes_per_token(folder: Path) -> int:
    """Weights a decode step reads: the text model's, the tied embedding once (the output
    head), not the per-layer embedding table (one row per token) nor the vision tower."""
    from service.models import budget

    total = 0
    for tensor in budget.read_tensors(folder):
        name = tensor.name
        if not name.startswith("language_model.") or "embed_tokens_per_layer" in name:
            continue
        total += tensor.nbytes
    return total


CPU_FINDING = (
    ". Finding: on the CPU backend 4-bit matmuls run MLX's own quantised kernel, not the BLAS "
    "(a token's ~5 GFLOP would take ~0.1 s at the float32 GEMM rate MKL gives here, against "
    "the ~20 s measured); not ours: closing it needs a vectorised CPU quantised matmul in MLX, "
    "or float32 weights on CPU (about 4x the memory). On Metal and CUDA MLX has fast kernels"
)


def run(quick: bool) -> list[Row]:
    if quick:
        print("bench: e2b_decode runs in the full run only", file=sys.stderr)
        return []
    import mlx_vlm

    from service.models import tiny

    _, reasoner = tiny.build_checkpoints(CHECKPOINTS / "e2b", "e2b")
    per_token = bytes_per_token(reasoner)
    bandwidth = copy_bandwidth()
    model, processor = mlx_vlm.load(str(reasoner))
    rates = []
    for _ in range(RUNS):
        result: Any = mlx_vlm.generate(
            model,
            cast(Any, processor),
            "Describe a field.",
            max_tokens=TOKENS,
            temperature=0.0,
            verbose=False,
        )
        rates.append(float(result.generation_tps))
    config = json.loads((reasoner / "config.json").read_text())
    bound = bandwidth / per_token
    return [
        compare(
            "E2B shape, 4 bits: text decode vs memory-bandwidth bound",
            median(rates),
            bound,
            unit="tok/s",
            note=f"{per_token / 1e9:.2f} GB of weights read per token, copy bandwidth "
            f"{bandwidth / 1e9:.1f} GB/s; {TOKENS} tokens × {RUNS}, greedy, text only; "
            f"{config['text_config']['num_hidden_layers']} layers; reported as a fraction of "
            "the bound (no target in the issue)" + (CPU_FINDING if mlx_runtime.on_cpu() else ""),
        )
    ]


if __name__ == "__main__":
    main_for("e2b_decode", run, __doc__)

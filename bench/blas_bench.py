"""CPU BLAS benchmark (issue row 7, second half): MLX's float32 GEMM on its CPU backend
against numpy's on the same matrices, interleaved, and which BLAS each one loaded.

    .venv/bin/python -m bench.blas_bench [--quick]
"""

from __future__ import annotations

import os
import time

import mlx.core as mx
import numpy as np

from bench.machine import loaded_blas
from bench.table import Row, compare, interleaved, main_for, median


def _gflops(n: int, seconds: float) -> float:
    return 2 * n**3 / seconds / 1e9


def run(quick: bool) -> list[Row]:
    n, rounds = (1024, 5) if quick else (2048, 9)
    rng = np.random.default_rng(0)
    a = rng.standard_normal((n, n), dtype=np.float32)
    b = rng.standard_normal((n, n), dtype=np.float32)
    ma, mb = mx.array(a), mx.array(b)
    mx.eval(ma, mb)

    def ours() -> float:
        began = time.perf_counter()
        mx.eval(mx.matmul(ma, mb, stream=mx.cpu))
        return _gflops(n, time.perf_counter() - began)

    def numpy() -> float:
        began = time.perf_counter()
        np.matmul(a, b)
        return _gflops(n, time.perf_counter() - began)

    ours()
    numpy()  # warm both (thread pools, first-touch pages)
    samples = interleaved({"mlx": ours, "numpy": numpy}, rounds)
    libraries = ", ".join(loaded_blas()) or "not detected"
    coretype = os.environ.get("OPENBLAS_CORETYPE")
    env_note = (
        f"; OPENBLAS_CORETYPE={coretype} is set here, which slows a current numpy (see the "
        "environment notes)"
        if coretype
        else ""
    )
    finding = ""
    if "mlx_cpu.libs/libblas" in libraries:
        finding = (
            ". Finding: the mlx[cpu] wheel links the reference (netlib) libblas it bundles in "
            "mlx_cpu.libs, numpy links OpenBLAS; not ours: MLX built against OpenBLAS would "
            "close it"
        )
    return [
        compare(
            f"float32 GEMM {n}×{n}, MLX CPU vs numpy",
            median(samples["mlx"]),
            median(samples["numpy"]),
            unit="GFLOP/s",
            at_least=0.5,
            note=f"BLAS libraries loaded: {libraries}{env_note}; {rounds} rounds interleaved; "
            f"target proposed here (the issue sets none){finding}",
        )
    ]


if __name__ == "__main__":
    main_for("blas", run, __doc__)

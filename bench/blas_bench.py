"""CPU BLAS benchmark (issue 12, the fast CPU path): MLX's float32 GEMM with the BLAS this
process chose (`AIP_CPU_BLAS`, default auto: Intel MKL on Linux x86_64) against numpy's on the
same matrices, then the same GEMM and one-query detection in two worker processes, one with the
chosen BLAS and one with the reference BLAS the mlx[cpu] wheel bundles, interleaved.

    .venv/bin/python -m bench.blas_bench [--quick]

Quick runs detection on the tiny detector (its GEMMs are too small for the target to apply);
the full run on `small`, where the issue's target is ≥ 5×.
"""

from __future__ import annotations

import io
import json
import os
import subprocess
import sys
import time
from pathlib import Path
from typing import IO, Any

import numpy as np

from bench.overhead_bench import CHECKPOINTS
from bench.table import Row, compare, interleaved, main_for, median

ROOT = Path(__file__).resolve().parents[1]
QUERY = "car"


def _gflops(n: int, seconds: float) -> float:
    return 2 * n**3 / seconds / 1e9


def _mlx_gemm(n: int) -> float:
    """GFLOP/s of one n×n float32 GEMM on MLX's CPU stream (inputs made and evaluated first)."""
    import mlx.core as mx

    a = mx.random.normal((n, n), key=mx.random.key(0), stream=mx.cpu)
    b = mx.random.normal((n, n), key=mx.random.key(1), stream=mx.cpu)
    mx.eval(a, b)
    began = time.perf_counter()
    mx.eval(mx.matmul(a, b, stream=mx.cpu))
    return _gflops(n, time.perf_counter() - began)


def _image() -> Any:
    from PIL import Image

    buffer = io.BytesIO()
    Image.new("RGB", (640, 480), (40, 120, 200)).save(buffer, format="JPEG")
    return Image.open(io.BytesIO(buffer.getvalue())).convert("RGB")


def worker(detector_path: str) -> None:
    """`--worker PATH`: load the detector under this process's BLAS, say which BLAS and how
    fast, then answer `gemm N` and `detect` lines from stdin with one JSON line each."""
    from service.models import blas, falcon

    blas.measure()
    detector = falcon.load(Path(detector_path))
    image = _image()
    detector.detect(image, QUERY)  # warm-up
    print(json.dumps(blas.describe()), flush=True)
    for line in sys.stdin:
        command = line.split()
        if command[:1] == ["gemm"]:
            print(json.dumps(_mlx_gemm(int(command[1]))), flush=True)
        elif command[:1] == ["detect"]:
            began = time.perf_counter()
            detector.detect(image, QUERY)
            print(json.dumps(time.perf_counter() - began), flush=True)
        else:
            return


class Worker:
    """One `--worker` process with `AIP_CPU_BLAS` set to `setting`."""

    def __init__(self, setting: str, detector_path: Path) -> None:
        env = {**os.environ, "AIP_CPU_BLAS": setting}
        self.process = subprocess.Popen(
            [sys.executable, "-m", "bench.blas_bench", "--worker", str(detector_path)],
            cwd=ROOT,
            env=env,
            stdin=subprocess.PIPE,
            stdout=subprocess.PIPE,
            text=True,
        )
        self.report: dict[str, Any] = self._read()

    def _read(self) -> Any:
        stdout: IO[str] | None = self.process.stdout
        line = stdout.readline() if stdout else ""
        if not line:
            raise RuntimeError(f"the blas worker exited with {self.process.wait()}")
        return json.loads(line)

    def ask(self, command: str) -> float:
        assert self.process.stdin is not None
        self.process.stdin.write(command + "\n")
        self.process.stdin.flush()
        return float(self._read())

    def close(self) -> None:
        if self.process.stdin:
            self.process.stdin.close()
        self.process.wait(timeout=60)


def _describe(report: dict[str, Any]) -> str:
    threading = f", {report['threading']} threading × {report['threads']}"
    return (
        f"{report.get('blas')} ({report.get('library') or 'library not found'}"
        f"{threading if report.get('threading') else ''})"
    )


def run(quick: bool) -> list[Row]:
    from service.models import blas, tiny

    n, gemm_rounds = (1024, 3) if quick else (1024, 5)
    size, detect_rounds = ("tiny", 3) if quick else ("small", 3)

    # In this process: MLX with the chosen BLAS vs numpy, same matrices.
    blas.measure()
    rng = np.random.default_rng(0)
    a = rng.standard_normal((n, n), dtype=np.float32)
    b = rng.standard_normal((n, n), dtype=np.float32)

    def numpy() -> float:
        began = time.perf_counter()
        np.matmul(a, b)
        return _gflops(n, time.perf_counter() - began)

    _mlx_gemm(n)
    numpy()  # warm both (thread pools, first-touch pages)
    here = interleaved({"mlx": lambda: _mlx_gemm(n), "numpy": numpy}, gemm_rounds)
    chosen = blas.describe() or {}
    rows = [
        compare(
            f"float32 GEMM {n}×{n}, MLX CPU ({chosen.get('blas')}) vs numpy",
            median(here["mlx"]),
            median(here["numpy"]),
            unit="GFLOP/s",
            at_least=0.5,
            note=f"MLX: {_describe(chosen)}; numpy: its own OpenBLAS; {gemm_rounds} rounds "
            "interleaved; target proposed here (the issue sets none). Where missed: the GEMM "
            "itself runs inside MKL (its threads, its kernels for this CPU; OpenBLAS has its "
            "own per CPU family), not ours; the issue's target, a small detect at least 5x "
            "faster than the stock wheel, is the row below",
        )
    ]

    # Two workers, the chosen BLAS and the stock one, interleaved call by call.
    detector_path, _ = tiny.build_checkpoints(CHECKPOINTS / size, size)
    fast, stock = Worker("auto", detector_path), Worker("bundled", detector_path)
    try:
        gemm = interleaved(
            {"fast": lambda: fast.ask(f"gemm {n}"), "stock": lambda: stock.ask(f"gemm {n}")},
            gemm_rounds,
        )
        detect = interleaved(
            {"fast": lambda: fast.ask("detect"), "stock": lambda: stock.ask("detect")},
            detect_rounds,
        )
    finally:
        fast.close()
        stock.close()
    both = f"fast: {_describe(fast.report)}; stock: {_describe(stock.report)}"
    rows.append(
        compare(
            f"float32 GEMM {n}×{n}, MLX CPU: AIP_CPU_BLAS=auto vs the wheel's bundled BLAS",
            median(gemm["fast"]),
            median(gemm["stock"]),
            unit="GFLOP/s",
            note=f"{both}; {gemm_rounds} rounds interleaved across two worker processes",
        )
    )
    on_small = size == "small"
    target = (
        "target from the issue: ≥ 5× faster"
        if on_small
        else ("the issue's target (≥ 5× faster) is for `small`: the full run")
    )
    rows.append(
        compare(
            f"detect, 1 query on one 640×480 image ({size}): AIP_CPU_BLAS=auto vs the stock BLAS",
            median(detect["fast"]),
            median(detect["stock"]),
            unit="s",
            at_most=0.2 if on_small else None,
            note=f"{both}; {detect_rounds} rounds interleaved, each process loaded and warmed "
            f"first; {target}",
        )
    )
    return rows


if __name__ == "__main__":
    if sys.argv[1:2] == ["--worker"]:
        worker(sys.argv[2])
    else:
        main_for("blas", run, __doc__)

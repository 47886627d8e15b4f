"""Demo benchmark: start-up time of `aip serve --demo`, per-stage timings of demo jobs, and
the service's peak memory, against a baseline measured in the same run (the bare Python
process importing the same stack without loading models).

    .venv/bin/python -m bench.demo_bench [--quick]
"""

from __future__ import annotations

import io
import os
import signal
import socket
import statistics
import subprocess
import sys
import tempfile
import time
from pathlib import Path

import httpx
from PIL import Image

from bench.table import Row, compare, main_for


def free_port() -> int:
    with socket.socket() as s:
        s.bind(("127.0.0.1", 0))
        return int(s.getsockname()[1])


def peak_rss_mb(pid: int) -> float:
    for line in Path(f"/proc/{pid}/status").read_text().splitlines():
        if line.startswith("VmHWM:"):
            return int(line.split()[1]) / 1024
    return float("nan")


def frame(i: int) -> bytes:
    image = Image.new("RGB", (1280, 720), (40 + i, 110, 60))
    buffer = io.BytesIO()
    image.save(buffer, format="JPEG")
    return buffer.getvalue()


def _import_stack(env: dict[str, str]) -> tuple[float, float]:
    """Baseline: a bare Python process importing the same stack, no models: (s, peak MiB)."""
    out = subprocess.run(
        [
            sys.executable,
            "-c",
            "import time; t=time.perf_counter(); import service.app, "
            "mlx_vlm; print(time.perf_counter()-t); import resource; "
            "print(resource.getrusage(resource.RUSAGE_SELF).ru_maxrss / 1024)",
        ],
        capture_output=True,
        text=True,
        check=True,
        env=env,
    ).stdout.split()
    return float(out[0]), float(out[1])


def _serve_demo(env: dict[str, str], port: int, jobs: int) -> tuple[float, float, list[dict]]:
    """Start `aip serve --demo`, run `jobs` jobs: (seconds to healthy, peak MiB, timings)."""
    started = time.perf_counter()
    process = subprocess.Popen(
        [sys.executable, "-m", "service.cli", "serve", "--demo"],
        env=env,
        stdout=subprocess.DEVNULL,
        stderr=subprocess.DEVNULL,
    )
    url = f"http://127.0.0.1:{port}"
    try:
        while True:
            try:
                if httpx.get(f"{url}/v1/health").status_code == 200:
                    break
            except httpx.TransportError:
                pass
            if process.poll() is not None:
                raise RuntimeError("aip serve --demo exited before it was healthy")
            time.sleep(0.02)
        ready = time.perf_counter() - started
        timings: list[dict[str, float]] = []
        for i in range(jobs):
            job = httpx.post(
                f"{url}/v1/jobs",
                files={"image": ("f.jpg", frame(i))},
                data={"queries": "car, person, building"},
            ).json()
            while job["status"] not in ("succeeded", "failed"):
                time.sleep(0.05)
                job = httpx.get(f"{url}/v1/jobs/{job['id']}").json()
            if job["status"] != "succeeded":
                raise RuntimeError(f"demo job failed: {job}")
            timings.append(job["timings_ms"])
        return ready, peak_rss_mb(process.pid), timings
    finally:
        process.send_signal(signal.SIGTERM)
        process.wait(timeout=60)


def run(quick: bool) -> list[Row]:
    jobs = 1 if quick else 5
    work = Path(tempfile.mkdtemp(prefix="aip-demo-"))
    port = free_port()
    env = {
        **os.environ,
        "AIP_DATA_DIR": str(work / "data"),
        "AIP_INBOX": str(work / "inbox"),
        "AIP_PORT": str(port),
        "AIP_LOG_STDERR": "0",
    }
    first_base = _import_stack(env)
    first = _serve_demo(env, port, jobs)  # builds the tiny checkpoints
    second_base = _import_stack(env)
    ready, peak, timings = _serve_demo(env, port, jobs)
    total = statistics.median(t.get("total", 0) for t in timings)
    models = statistics.median(t.get("detect", 0) + t.get("reason", 0) for t in timings)
    stages = ", ".join(
        f"{s} {statistics.median(t.get(s, 0) for t in timings):.0f}"
        for s in ("queue_wait", "decode", "detect", "reason", "persist")
    )
    return [
        compare(
            "aip serve --demo, first start (builds tiny checkpoints) to healthy",
            first[0],
            first_base[0],
            unit="s",
            at_most=10,
            note="baseline: a bare process importing service.app and mlx_vlm; target proposed here",
        ),
        compare(
            "aip serve --demo, second start to healthy",
            ready,
            second_base[0],
            unit="s",
            at_most=3,
            note="baseline: importing the same stack; target proposed here",
        ),
        compare(
            "aip serve --demo, peak RSS after jobs",
            peak,
            second_base[1],
            unit="MiB",
            at_most=2.0,
            note="baseline: peak RSS of importing the stack; target proposed here",
        ),
        compare(
            "demo job (1280x720, 3 queries): total vs detect + reason",
            total,
            models,
            unit="ms",
            at_most=1.03,
            note=f"the service's own stage timings (median ms: {stages}) on tiny checkpoints, "
            f"{jobs} jobs; against a bare mlx-vlm loop: the overhead row",
        ),
    ]


if __name__ == "__main__":
    main_for("demo", run, __doc__)

"""Demo benchmark: start-up time of `aip serve --demo`, per-stage timings of demo jobs, and
the service's peak memory, against a baseline measured in the same run (the bare Python
process importing the same stack without loading models).

    .venv/bin/python bench/demo_bench.py [--jobs 5]
"""

from __future__ import annotations

import argparse
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


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--jobs", type=int, default=5)
    args = parser.parse_args()
    work = Path(tempfile.mkdtemp(prefix="aip-demo-"))
    port = free_port()
    env = {
        **os.environ,
        "AIP_DATA_DIR": str(work / "data"),
        "AIP_INBOX": str(work / "inbox"),
        "AIP_PORT": str(port),
        "AIP_LOG_STDERR": "0",
    }

    baseline = subprocess.run(
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

    for label in ("first start (builds tiny checkpoints)", "second start"):
        started = time.perf_counter()
        process = subprocess.Popen(
            [sys.executable, "-m", "service.cli", "serve", "--demo"],
            env=env,
            stdout=subprocess.DEVNULL,
            stderr=subprocess.DEVNULL,
        )
        url = f"http://127.0.0.1:{port}"
        while True:
            try:
                if httpx.get(f"{url}/v1/health").status_code == 200:
                    break
            except httpx.TransportError:
                pass
            time.sleep(0.02)
        ready = time.perf_counter() - started
        timings: list[dict[str, float]] = []
        for i in range(args.jobs):
            job = httpx.post(
                f"{url}/v1/jobs",
                files={"image": ("f.jpg", frame(i))},
                data={"queries": "car, person, building"},
            ).json()
            while job["status"] not in ("succeeded", "failed"):
                time.sleep(0.05)
                job = httpx.get(f"{url}/v1/jobs/{job['id']}").json()
            assert job["status"] == "succeeded", job
            timings.append(job["timings_ms"])
        peak = peak_rss_mb(process.pid)
        process.send_signal(signal.SIGTERM)
        code = process.wait(timeout=60)
        print(f"\n{label}: healthy after {ready:.2f} s; peak RSS {peak:.0f} MB; exit status {code}")
        stages = ["queue_wait", "decode", "detect", "reason", "persist", "total"]
        print(f"  {'job (1280x720, 3 queries)':<28}" + "".join(f"{s:>11}" for s in stages))
        for n, t in enumerate(timings, start=1):
            print(f"  {'job ' + str(n):<28}" + "".join(f"{t.get(s, 0):>11.0f}" for s in stages))
        print(
            f"  {'median (ms)':<28}"
            + "".join(f"{statistics.median(t.get(s, 0) for t in timings):>11.0f}" for s in stages)
        )
    print(
        f"\nbaseline: importing the stack takes {float(baseline[0]):.2f} s and "
        f"{float(baseline[1]):.0f} MB peak RSS"
    )


if __name__ == "__main__":
    main()

"""Decode memory benchmark: peak RSS added while one image is validated at intake and decoded
for the models, each in a fresh process, against 3 bytes per pixel (the image as 8-bit RGB).

    .venv/bin/python bench/decode_bench.py [--quick]
"""

from __future__ import annotations

import argparse
import json
import os
import resource
import subprocess
import sys
import tempfile
from pathlib import Path
from typing import Any

import numpy as np
from PIL import Image

TARGET = 1.3
ROOT = Path(__file__).resolve().parent.parent

# name -> (how it is made, description)
IMAGES = {
    "png16": "16-bit grey PNG",
    "png8": "8-bit RGB PNG",
    "jpeg": "JPEG (quality 90)",
    "rgba": "RGBA PNG",
}


def _pixels(side: int, channels: int, dtype: Any, top: int) -> np.ndarray:
    """A smooth gradient with texture, so encoders and filters have real work."""
    ramp = np.linspace(0, top * 0.8, side, dtype=np.float32)
    texture = (np.arange(side, dtype=np.uint32) * 2654435761 % 997).astype(np.float32)
    texture *= top * 0.2 / 997
    row = (ramp + texture).astype(dtype)
    plane = np.empty((side, side), dtype=dtype)
    for y in range(side):  # row by row: the generator must not need the memory it measures
        plane[y] = np.roll(row, y)
    return plane if channels == 1 else np.repeat(plane[:, :, None], channels, axis=2)


def make(kind: str, side: int, folder: Path) -> Path:
    path = folder / f"{kind}-{side}.{'jpg' if kind == 'jpeg' else 'png'}"
    if path.exists():
        return path
    if kind == "png16":
        image = Image.fromarray(_pixels(side, 1, np.uint16, 60000))
    else:
        channels = {"png8": 3, "jpeg": 3, "rgba": 4}[kind]
        image = Image.fromarray(_pixels(side, channels, np.uint8, 255))
    partial = path.with_suffix(".partial")
    if kind == "jpeg":
        image.save(partial, format="JPEG", quality=90)
    else:
        image.save(partial, format="PNG", compress_level=1)
    partial.replace(path)
    return path


def _peak_reset() -> bool:
    try:
        Path("/proc/self/clear_refs").write_text("5")  # resets VmHWM (Linux)
        return True
    except OSError:
        return False


def _status(field: str) -> int:
    for line in Path("/proc/self/status").read_text().splitlines():
        if line.startswith(field + ":"):
            return int(line.split()[1]) * 1024
    raise KeyError(field)


def child(how: str, path: str) -> None:
    """Runs in a fresh process: imports first (numpy too: the service has it loaded for its
    models), then measures only the decode."""
    import numpy  # noqa: F401

    from service.intake import inspect_image, open_for_models

    data = Path(path).read_bytes() if how == "intake" else b""
    linux = _peak_reset()
    before = _status("VmRSS") if linux else resource.getrusage(resource.RUSAGE_SELF).ru_maxrss
    if how == "intake":
        record = inspect_image(data, max_pixels=10**9)
        size = (record.width, record.height)
    else:
        _, size = open_for_models(Path(path).parent, Path(path).name)
    # Elsewhere (macOS) the peak since start, in bytes: imports are done, so it is close.
    peak = _status("VmHWM") if linux else resource.getrusage(resource.RUSAGE_SELF).ru_maxrss
    print(json.dumps({"added": peak - before, "pixels": size[0] * size[1]}))


def measure(how: str, path: Path) -> dict[str, int]:
    out = subprocess.run(
        [sys.executable, __file__, "--child", how, str(path)],
        check=True,
        capture_output=True,
        text=True,
        cwd=ROOT,
        env={**os.environ, "PYTHONPATH": str(ROOT)},
    )
    result: dict[str, int] = json.loads(out.stdout.strip().splitlines()[-1])
    return result


def run(quick: bool) -> list[dict[str, Any]]:
    side = 4000 if quick else 10_000
    folder = Path(tempfile.gettempdir()) / "aip-decode-bench"
    folder.mkdir(exist_ok=True)
    rows = []
    for kind, description in IMAGES.items():
        path = make(kind, side, folder)
        intake, worker = measure("intake", path), measure("worker", path)
        pixels = worker["pixels"]
        ours = max(intake["added"], worker["added"])
        baseline = 3 * pixels
        ratio = ours / baseline
        rows.append(
            {
                "measure": f"peak RSS added decoding a {pixels / 1e6:.0f} MP {description}",
                "ours": round(ours / 2**20, 1),
                "baseline": round(baseline / 2**20, 1),
                "ratio": round(ratio, 3),
                "target": f"≤ {TARGET}",
                "met": ratio <= TARGET,
                "unit": "MiB",
                "note": (
                    f"intake {intake['added'] / 2**20:.0f} MiB, worker "
                    f"{worker['added'] / 2**20:.0f} MiB; file {path.stat().st_size / 2**20:.1f}"
                    " MiB (held by intake, not counted); baseline = 3 bytes x pixels"
                ),
            }
        )
    return rows


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--quick", action="store_true", help="16 MP images instead of 100 MP")
    parser.add_argument("--child", nargs=2, metavar=("HOW", "PATH"), help=argparse.SUPPRESS)
    args = parser.parse_args()
    if args.child:
        child(*args.child)
        return
    for row in run(args.quick):
        print(json.dumps(row, ensure_ascii=False))


if __name__ == "__main__":
    main()

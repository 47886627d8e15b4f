"""The quantised-copy cache: a full-precision checkpoint converted once to 4 or 8 bits through
mlx-vlm's own converter, kept under the data directory by source revision and bits, and found
again on every later load. Knows nothing of roles, budgets or the host's threads."""

from __future__ import annotations

import contextlib
import io
import json
import logging
import os
import shutil
import tempfile
import warnings
from pathlib import Path

from service.errors import InvalidInput

BITS = (4, 8)
GROUP_SIZE = 64  # mlx-vlm's default; the budget's estimate assumes the same
MARKER = "aip_quantized.json"  # written last: a folder without it is not a finished conversion

log = logging.getLogger("aip.models")


def check_bits(bits: int | None) -> int | None:
    if bits is not None and bits not in BITS:
        raise InvalidInput(f"quantize must be one of {BITS}, not {bits!r}", code="invalid_quantize")
    return bits


def is_quantised(folder: Path) -> bool:
    """Whether a checkpoint is already quantised (its config says so): it is loaded as it is."""
    try:
        config = json.loads((folder / "config.json").read_text())
    except (OSError, ValueError):
        return False
    return bool(config.get("quantization") or config.get("quantization_config"))


def cached_copy(cache_root: Path, source_revision: str, bits: int) -> Path:
    return cache_root / f"{source_revision}-q{bits}"


def is_complete(dest: Path, source_revision: str, bits: int) -> bool:
    try:
        marker = json.loads((dest / MARKER).read_text())
    except (OSError, ValueError):
        return False
    return bool(marker == {"source_revision": source_revision, "bits": bits})


def convert(source: Path, dest: Path, *, source_revision: str, bits: int) -> Path:
    """Convert `source` into `dest` with mlx-vlm (lazily, shard by shard). Written into a temp
    sibling and renamed into place, so an interrupted conversion never looks finished. Runs on
    the model thread: it uses the accelerator."""
    from mlx_vlm.convert import convert as mlx_convert

    if is_complete(dest, source_revision, bits):
        return dest
    dest.parent.mkdir(parents=True, exist_ok=True)
    tmp = Path(tempfile.mkdtemp(prefix=f".{dest.name}.tmp-", dir=dest.parent))
    try:
        out = tmp / "model"
        # The converter prints its progress; the service logs instead. Its Gemma 4 audio
        # front end warns about mel filters: there is no audio here.
        with contextlib.redirect_stdout(io.StringIO()) as printed, warnings.catch_warnings():
            warnings.filterwarnings("ignore", message="At least one mel filter has all zero")
            mlx_convert(
                str(source), mlx_path=str(out), quantize=True, q_bits=bits, q_group_size=GROUP_SIZE
            )
        for line in printed.getvalue().splitlines():
            log.debug("convert: %s", line)
        (out / MARKER).write_text(json.dumps({"source_revision": source_revision, "bits": bits}))
        if dest.exists():  # an unfinished earlier attempt: set it aside, never merge into it
            os.replace(dest, tmp / "old")
        os.replace(out, dest)
    finally:
        shutil.rmtree(tmp, ignore_errors=True)
    return dest

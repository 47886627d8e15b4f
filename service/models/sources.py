"""Where a model's files are: a local folder, the hub cache, or a first download; and the
revision (content hash) of what was found. Never imports mlx."""

from __future__ import annotations

import hashlib
import json
import os
import re
import struct
from pathlib import Path
from typing import BinaryIO

from service.errors import ModelUnavailable

ROLES = ("detector", "reasoner")
ENV_OF = {"detector": "AIP_DETECTOR", "reasoner": "AIP_REASONER"}
_REPO_ID = re.compile(r"^[\w.-]+/[\w.-]+$")
_PATTERNS = ["*.json", "*.safetensors", "*.jinja", "*.model", "*.txt", "*.tiktoken", "*.py"]


def _missing(role: str, source: str, why: str) -> ModelUnavailable:
    return ModelUnavailable(
        f"the {role} model {source!r} {why}: point {ENV_OF[role]} at a local folder holding it "
        f"(or run `aip models pull {role}` once while online), or run `aip serve --demo` to "
        "try the whole pipeline offline on tiny checkpoints",
        code="model_missing",
    )


def resolve(role: str, source: str, *, allow_download: bool) -> Path:
    """A local folder is used as it is; a hub id comes from the local cache, else (when
    allowed) is downloaded once with a progress bar."""
    path = Path(source).expanduser()
    if path.is_dir() or not _REPO_ID.match(source):
        if not (path / "config.json").is_file():
            raise _missing(role, source, "is not a model folder (no config.json there)")
        return path.resolve()
    from huggingface_hub import snapshot_download

    try:
        return Path(snapshot_download(source, allow_patterns=_PATTERNS, local_files_only=True))
    except Exception:  # not in the cache: fall through to a download, if allowed
        pass
    if not allow_download or os.environ.get("HF_HUB_OFFLINE") == "1":
        raise _missing(role, source, "is not on this machine")
    try:
        return Path(snapshot_download(source, allow_patterns=_PATTERNS))
    except Exception as exc:
        reason = str(exc).strip().splitlines()[0][:160] if str(exc).strip() else type(exc).__name__
        raise _missing(
            role, source, f"is not on this machine and could not be downloaded ({reason})"
        ) from None


def go_offline() -> None:
    """Once weights are on disk nothing may call out: pin the hub libraries offline."""
    os.environ["HF_HUB_OFFLINE"] = "1"
    os.environ["TRANSFORMERS_OFFLINE"] = "1"
    os.environ.setdefault("HF_HUB_DISABLE_TELEMETRY", "1")


def shards(folder: Path) -> list[Path]:
    """The weight files mlx-vlm loads: those the index names, else every `*.safetensors`
    but a consolidated copy."""
    index = folder / "model.safetensors.index.json"
    if index.is_file():
        try:
            names = set(json.loads(index.read_text()).get("weight_map", {}).values())
        except (OSError, ValueError):
            names = set()
        found = [folder / name for name in sorted(names) if (folder / name).is_file()]
        if found:
            return found
    return [p for p in sorted(folder.glob("*.safetensors")) if p.name != "consolidated.safetensors"]


def read_header(f: BinaryIO) -> bytes:
    """The JSON header of an open safetensors file (names, dtypes, shapes, offsets)."""
    (length,) = struct.unpack("<Q", f.read(8))
    return f.read(length)


_SAMPLE = 1024 * 1024


def _safetensors_fingerprint(path: Path) -> bytes:
    """The header plus the first and last MiB of weights."""
    size = path.stat().st_size
    with path.open("rb") as f:
        header = read_header(f)
        head = f.read(_SAMPLE)
        f.seek(max(f.tell(), size - _SAMPLE))
        tail = f.read(_SAMPLE)
    return header + head + tail


def revision_of(folder: Path) -> str:
    """A short fingerprint of the checkpoint: config, file sizes, safetensors headers and a
    sample of the weights at each end of every file; cheap enough to take at every load."""
    digest = hashlib.sha256()
    for name in ("config.json", "model.safetensors.index.json"):
        if (folder / name).is_file():
            digest.update((folder / name).read_bytes())
    for shard in shards(folder):
        digest.update(shard.name.encode())
        digest.update(str(shard.stat().st_size).encode())
        digest.update(_safetensors_fingerprint(shard))
    return digest.hexdigest()[:12]


def bytes_on_disk(folder: Path) -> int:
    return sum(p.stat().st_size for p in shards(folder))

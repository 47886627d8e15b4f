"""Pure rules of the inbox: which files count, and the job parameters a file gets from the
folder configs above it and its sidecar."""

from __future__ import annotations

import contextlib
import fnmatch
import json
from dataclasses import dataclass
from pathlib import Path, PurePosixPath
from typing import Any

from service.errors import InvalidInput
from service.jobspec import MAX_FLIGHT_NAME, OPTION_KEYS, parse_options

FILING_FOLDERS = ("processed", "failed")
FOLDER_CONFIG = "aip.json"
IMAGE_SUFFIXES = frozenset(
    {".jpg", ".jpeg", ".png", ".webp", ".tif", ".tiff", ".bmp", ".gif", ".mpo"}
)
# Names that editors, browsers, copy tools and macOS use while a file is incomplete or as junk.
TEMPORARY = ("*.part", "*.partial", "*.crdownload", "*.download", "*.tmp", "*.temp", "*.swp",
             "~$*", "*~", "Thumbs.db", "desktop.ini")  # fmt: skip
_SPEC_KEYS = {*OPTION_KEYS, "profile"}  # checked by service.jobspec
_PARAM_KEYS = {*_SPEC_KEYS, "max_attempts"}
_FOLDER_KEYS = _PARAM_KEYS | {"sidecar"}
# Processing a duplicate again is asked for one file at a time, never for a whole folder.
_SIDECAR_KEYS = _PARAM_KEYS | {"reprocess"}


def kind_of(relative_path: str) -> str:
    """`ignore`, `config`, `sidecar`, `image` or `other` (a file to reject: not an image)."""
    parts = PurePosixPath(relative_path).parts
    if not parts or parts[0] in FILING_FOLDERS or any(p.startswith(".") for p in parts):
        return "ignore"  # hidden files and folders, macOS ._* and .DS_Store, our own filing
    name = parts[-1]
    if any(fnmatch.fnmatch(name, pattern) for pattern in TEMPORARY):
        return "ignore"
    if name == FOLDER_CONFIG:
        return "config"
    suffix = PurePosixPath(name).suffix.lower()
    if suffix == ".json":
        return "sidecar"
    return "image" if suffix in IMAGE_SUFFIXES else "other"


def ignored_folder(relative_dir: str) -> bool:
    """Folders never walked: hidden ones and the inbox's own filing folders."""
    parts = PurePosixPath(relative_dir).parts
    return bool(parts) and (parts[0] in FILING_FOLDERS or any(p.startswith(".") for p in parts))


def sidecar_of(relative_path: str) -> str | None:
    """`a/b/frame.jpg` -> `a/b/frame.json` (an image named `aip.*` has none: that name is
    the folder's config)."""
    sidecar = PurePosixPath(relative_path).with_suffix(".json")
    return None if sidecar.name == FOLDER_CONFIG else str(sidecar)


class ParamsError(ValueError):
    pass


@dataclass(frozen=True)
class FileParams:
    folder: dict[str, Any]  # the job options of the folder configs above the file, merged
    given: dict[str, Any]  # those of its sidecar: the job's own
    max_attempts: int | None
    sidecar_required: bool
    reprocess: bool = False


def _read_json(path: Path, allowed: set[str]) -> dict[str, Any]:
    try:
        data = json.loads(path.read_text(encoding="utf-8"))
    except (OSError, UnicodeDecodeError, json.JSONDecodeError) as exc:
        raise ParamsError(f"{path.name} is not valid JSON: {exc}") from None
    if not isinstance(data, dict):
        raise ParamsError(f"{path.name} must hold a JSON object")
    unknown = set(data) - allowed
    if unknown:
        raise ParamsError(
            f"{path.name} has unknown keys {sorted(unknown)}; allowed: {sorted(allowed)}"
        )
    return data


def _check(data: dict[str, Any], where: str) -> dict[str, Any]:
    """`data` with its job options normalized (absent, null or blank ones left out)."""
    try:
        options = parse_options({k: v for k, v in data.items() if k in _SPEC_KEYS}, where)
    except InvalidInput as exc:
        raise ParamsError(exc.message) from None
    data = {**{k: v for k, v in data.items() if k not in _SPEC_KEYS}, **options}
    attempts = data.get("max_attempts")
    if attempts is not None and not (isinstance(attempts, int) and 1 <= attempts <= 10):
        raise ParamsError(f"{where}: max_attempts must be a whole number 1..10")
    if not isinstance(data.get("reprocess", False), bool):
        raise ParamsError(f"{where}: reprocess must be true or false")
    if data.get("sidecar", "optional") not in ("optional", "required"):
        raise ParamsError(f'{where}: sidecar must be "optional" or "required"')
    return data


def params_for(root: Path, relative_path: str, sidecar_path: str | None = None) -> FileParams:
    """Folder configs apply from the inbox root down (deeper ones override); the file's own
    sidecar (`sidecar_path`, by default the one beside `relative_path`) overrides them all.
    The job options come back as those two layers: service.jobspec.resolve puts a profile
    (the sidecar's, else the folder's, else the default) under the folder's."""
    merged: dict[str, Any] = {}
    own: dict[str, Any] = {}
    folder = PurePosixPath()
    for part in ("", *PurePosixPath(relative_path).parts[:-1]):
        folder = folder / part if part else folder
        config = root / folder / FOLDER_CONFIG
        if config.is_file():
            where = str(folder / FOLDER_CONFIG)
            merged.update(_check(_read_json(config, _FOLDER_KEYS), where))
    if folder.parts and "flight" not in merged:
        # A subfolder is a flight, unless its config names one (or `auto`); a folder name
        # that is no flight name (unprintable characters) leaves the file to its capture time.
        with contextlib.suppress(InvalidInput):
            merged.update(parse_options({"flight": folder.as_posix()[:MAX_FLIGHT_NAME]}, ""))
    sidecar = sidecar_path or sidecar_of(relative_path)
    if sidecar is not None and (root / sidecar).is_file():
        own = _check(_read_json(root / sidecar, _SIDECAR_KEYS), sidecar)
    return FileParams(
        folder={k: v for k, v in merged.items() if k in _SPEC_KEYS},
        given={k: v for k, v in own.items() if k in _SPEC_KEYS},
        max_attempts=own.get("max_attempts", merged.get("max_attempts")),
        sidecar_required=merged.get("sidecar") == "required",
        reprocess=own.get("reprocess", False),
    )


def unfiled_path(relative_path: str) -> str:
    """`processed/a/x.jpg` -> `a/x.jpg`: where a filed file was dropped (its folder configs)."""
    parts = PurePosixPath(relative_path).parts
    if len(parts) > 1 and parts[0] in FILING_FOLDERS:
        return PurePosixPath(*parts[1:]).as_posix()
    return relative_path

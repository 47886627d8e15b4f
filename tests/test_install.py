"""Every `pip install` of this project the README shows brings exactly one MLX backend: from the
metadata (pyproject.toml, then the installed distributions' Requires-Dist, markers evaluated for
Linux x86_64 and macOS arm64), and from pip's resolver in a dry run of the requirements that can
bring one, where the package index answers (with CI set it must). Also the refusal `aip serve`
and `aip worker` give without exactly one backend."""

from __future__ import annotations

import atexit
import functools
import importlib.metadata
import json
import os
import re
import shlex
import shutil
import socket
import subprocess
import sys
import tempfile
import time
import tomllib
from collections.abc import Iterator
from concurrent.futures import Future, ThreadPoolExecutor
from dataclasses import dataclass
from pathlib import Path

import pytest
from packaging.markers import default_environment
from packaging.requirements import Requirement
from packaging.utils import canonicalize_name

from service.models import backends

ROOT = Path(__file__).resolve().parent.parent
PROJECT = "aerial-intelligence-pipeline"
BACKENDS = frozenset(backends.BACKENDS)
PLATFORMS = {
    "linux-x86_64": {
        "sys_platform": "linux",
        "platform_system": "Linux",
        "platform_machine": "x86_64",
    },
    "darwin-arm64": {
        "sys_platform": "darwin",
        "platform_system": "Darwin",
        "platform_machine": "arm64",
    },
}
# pip's words for an index it could not reach (urllib3's, and the OS's through it).
UNREACHABLE = (
    "NewConnectionError",
    "Failed to establish a new connection",
    "Temporary failure in name resolution",
    "Name or service not known",
    "Network is unreachable",
    "ConnectTimeoutError",
    "ProxyError",
    "ReadTimeoutError",
    "Connection refused",
)


@dataclass(frozen=True)
class Install:
    """One project install as the README writes it."""

    command: str  # the README's text around it
    extras: frozenset[str]
    fresh: bool  # it makes the environment (`python3 -m venv`): the whole install


def documented_installs() -> list[Install]:
    """Every install of this project in the README, inline or in a code block: a `pip install`
    whose target is the checkout (`.`, `.[extras]`) or the project by name."""
    found: dict[Install, None] = {}
    for line in (ROOT / "README.md").read_text().splitlines():
        for piece in line.split("`"):
            for segment in re.split(r"&&|;|\|\|", piece):
                if "pip install" not in segment:
                    continue
                words = shlex.split(segment.split("pip install", 1)[1])
                for word in words:
                    if word.startswith("-"):
                        continue
                    target, _, extras = word.partition("[")
                    if target == "." or canonicalize_name(target) == PROJECT:
                        names = frozenset(
                            canonicalize_name(e) for e in extras.rstrip("]").split(",") if e
                        )
                        found[Install(piece.strip(), names, "-m venv" in piece)] = None
    return list(found)


@functools.cache
def project() -> dict[str, list[Requirement]]:
    """The project's requirements from pyproject.toml by extra ('' for the base), not from its
    installed metadata, which is as old as the last `pip install -e`."""
    data = tomllib.loads((ROOT / "pyproject.toml").read_text())["project"]
    found = {"": [Requirement(r) for r in data["dependencies"]]}
    for extra, listed in data["optional-dependencies"].items():
        found[canonicalize_name(extra)] = [Requirement(r) for r in listed]
    return found


@functools.cache
def declared(name: str) -> tuple[Requirement, ...]:
    """An installed distribution's Requires-Dist; none for one not installed here (a backend
    wheel for another machine: a leaf)."""
    try:
        return tuple(Requirement(r) for r in importlib.metadata.requires(name) or ())
    except importlib.metadata.PackageNotFoundError:
        return ()


def active(name: str, extra: str, platform: str) -> Iterator[Requirement]:
    """The requirements `name[extra]` adds on this platform ('': the distribution itself)."""
    if name == PROJECT:
        yield from project().get(extra, [])
        return
    env = {key: str(value) for key, value in default_environment().items()}
    env |= {**PLATFORMS[platform], "extra": extra}
    for req in declared(name):
        if req.marker is None or req.marker.evaluate(env):
            yield req


def walk(extras: frozenset[str], platform: str) -> list[tuple[str, Requirement]]:
    """Every requirement installing the project with these extras meets on this platform, with
    the distribution declaring it, following requirements and their extras through the
    metadata; versions are not resolved."""
    seen: set[tuple[str, str]] = set()
    met: list[tuple[str, Requirement]] = []
    todo = [(PROJECT, ""), *((PROJECT, e) for e in extras)]
    while todo:
        name, extra = todo.pop()
        if (name, extra) in seen:
            continue
        seen.add((name, extra))
        for req in active(name, extra, platform):
            met.append((name, req))
            child = canonicalize_name(req.name)
            todo += [(child, ""), *((child, canonicalize_name(e)) for e in req.extras)]
    return met


def installed_by(extras: frozenset[str], platform: str) -> set[str]:
    """The distributions installing the project with these extras brings (the metadata's)."""
    return {PROJECT} | {canonicalize_name(req.name) for _, req in walk(extras, platform)}


def backends_of(extras: frozenset[str], platform: str) -> set[str]:
    return installed_by(extras, platform) & BACKENDS


def test_the_readme_documents_one_fresh_install_per_backend() -> None:
    installs = documented_installs()
    fresh = [i for i in installs if i.fresh]
    assert fresh and fresh[0].command.startswith("python3 -m venv"), installs
    # The quick start's first command is the Linux CPU install.
    assert backends_of(fresh[0].extras, "linux-x86_64") == {"mlx-cpu"}, fresh[0]
    covered = set().union(*(backends_of(i.extras, "linux-x86_64") for i in fresh))
    assert covered >= {"mlx-cpu", "mlx-cuda-12", "mlx-cuda-13"}, fresh


@pytest.mark.parametrize("platform", sorted(PLATFORMS))
def test_no_documented_install_brings_two_backends(platform: str) -> None:
    """A fresh install gets exactly one; an add-on install (an extra on top) none on Linux,
    where the backend it sits on is kept. On macOS every one gets Metal, with mlx."""
    # The mlx extras this reads must be mlx's own, as declared: else every answer is empty.
    assert {"cpu", "cuda12", "cuda13"} <= set(
        importlib.metadata.metadata("mlx").get_all("Provides-Extra") or []
    )
    wrong = []
    for install in documented_installs():
        found = backends_of(install.extras, platform)
        if platform.startswith("darwin"):
            ok = found == {"mlx-metal"}
        else:
            ok = len(found) == 1 if install.fresh else len(found) <= 1
            ok = ok and "mlx-metal" not in found
        if not ok:
            wrong.append(f"{install.command!r}: {sorted(found)}")
    assert not wrong, f"on {platform}: " + "; ".join(wrong)


@pytest.mark.parametrize("platform", sorted(PLATFORMS))
def test_no_extra_alone_brings_two_backends(platform: str) -> None:
    """Documented or not (the `cuda` alias, a new one): each extra alone, at most one."""
    for extra in project():
        found = backends_of(frozenset({extra} - {""}), platform)
        assert len(found) <= 1, f"[{extra}] on {platform}: {sorted(found)}"
    assert backends_of(frozenset(), "linux-x86_64") == set()  # plain `pip install -e .`


# -- pip's resolver -----------------------------------------------------------------------------

MLX_CHAIN = frozenset({PROJECT, "mlx", *BACKENDS})


def stand_in_project(folder: Path, extras: frozenset[str]) -> Path:
    """The project as pip sees it when it picks a backend, and nothing else: its name, every
    extra, its requirements on itself, mlx and the backends (markers as written), and the
    requirements on mlx the rest of the install declares (mlx-audio pins mlx's version, and
    with it the backends'). A full resolution of the project takes 50-95 s per install here,
    mostly for packages that cannot bring a backend."""

    def kept(reqs: list[Requirement]) -> list[str]:
        return [str(r) for r in reqs if canonicalize_name(r.name) in MLX_CHAIN]

    pins = set()
    for declarer, req in walk(extras, "linux-x86_64"):
        if declarer not in MLX_CHAIN and canonicalize_name(req.name) in MLX_CHAIN:
            pin = Requirement(str(req))
            pin.marker = None  # evaluated for this machine by the walk
            pins.add(str(pin))
    listed = project()
    lines = [
        '[build-system]\nrequires = ["hatchling>=1.25"]\nbuild-backend = "hatchling.build"\n',
        f'[project]\nname = {json.dumps(PROJECT)}\nversion = "0.1.0"',
        f"dependencies = {json.dumps(kept(listed['']) + sorted(pins))}\n",
        "[project.optional-dependencies]",
        *(f"{json.dumps(e)} = {json.dumps(kept(reqs))}" for e, reqs in listed.items() if e),
        "\n[tool.hatch.build.targets.wheel]\nbypass-selection = true",
    ]
    folder.mkdir()
    (folder / "pyproject.toml").write_text("\n".join(lines) + "\n")
    return folder


@dataclass(frozen=True)
class DryRun:
    extras: frozenset[str]
    returncode: int
    stderr: str
    seconds: float
    installs: frozenset[str]


def dry_run(extras: frozenset[str], folder: Path) -> DryRun:
    """pip's resolver on the stand-in's `.[extras]` as a fresh environment would get it
    (--ignore-installed), nothing installed: what its --report says it would install."""
    where = stand_in_project(folder, extras)
    report = folder / "report.json"
    command = [sys.executable, "-m", "pip", "install", "--dry-run", "--ignore-installed", "-q"]
    command += ["--report", str(report)]
    # As environment, these reach the pip that installs the build backend too.
    quick = {**os.environ, "PIP_RETRIES": "2", "PIP_DEFAULT_TIMEOUT": "30"}
    began = time.monotonic()
    try:
        done = subprocess.run(
            [*command, f".[{','.join(sorted(extras))}]"],
            cwd=where,
            env=quick,
            capture_output=True,
            text=True,
            timeout=300,
        )
    except subprocess.TimeoutExpired:
        return DryRun(extras, -1, "ReadTimeoutError: no answer in 300 s", 300.0, frozenset())
    seconds = time.monotonic() - began
    names: frozenset[str] = frozenset()
    if done.returncode == 0:
        listed = json.loads(report.read_text())["install"]
        names = frozenset(canonicalize_name(i["metadata"]["name"]) for i in listed)
    return DryRun(extras, done.returncode, done.stderr, seconds, names)


_started: list[Future[DryRun]] = []


def start_dry_runs() -> None:
    """The dry runs, begun in the background as the session starts (tests/conftest.py, when
    the test below was collected): mostly waiting on the index, they overlap the other
    tests instead of adding a minute or two to the run."""
    if _started or not sys.platform.startswith("linux"):
        return
    bearing = {e for e in project() if e and backends_of(frozenset({e}), "linux-x86_64")}
    wanted = sorted(
        {i.extras & bearing for i in documented_installs() if i.extras & bearing}, key=sorted
    )
    root = Path(tempfile.mkdtemp(prefix="aip-dry-run-"))
    pool = ThreadPoolExecutor(len(wanted), thread_name_prefix="dry-run")
    _started.extend(pool.submit(dry_run, extras, root / str(n)) for n, extras in enumerate(wanted))
    pool.shutdown(wait=False)
    atexit.register(shutil.rmtree, root, True)


def test_the_resolver_installs_one_backend_for_each_documented_linux_install() -> None:
    """One dry run per distinct set of backend-bearing extras among the documented installs
    (the others add only packages that bring none). The resolver must agree with the
    metadata walk, on this machine's platform (Linux)."""
    if not sys.platform.startswith("linux"):
        pytest.skip("the resolver's dry run answers for the machine it runs on: Linux only")
    start_dry_runs()  # already running, unless this test runs alone
    runs = [future.result() for future in _started]
    failed = [r for r in runs if r.returncode != 0]
    if failed:
        reason = failed[0].stderr
        lines = [ln for ln in reason.splitlines() if "is ignored" not in ln and ln.strip()]
        summary = lines[-1].strip() if lines else f"pip exited {failed[0].returncode}"
        network = [word for word in UNREACHABLE if word in reason]
        if network and not os.environ.get("CI"):
            pytest.skip(f"the package index is unreachable (pip: {network[0]}): no dry run")
        pytest.fail(f"pip's dry run of .[{','.join(sorted(failed[0].extras))}]: {summary}")
    timings = ", ".join(f".[{','.join(sorted(r.extras))}] {r.seconds:.1f} s" for r in runs)
    print(f"resolver dry runs: {timings}")
    for run in runs:
        found = run.installs & BACKENDS
        assert len(found) == 1, f".[{','.join(sorted(run.extras))}]: {sorted(found)}"
        assert found == backends_of(run.extras, "linux-x86_64"), (run.extras, found)


# -- the refusal, with stand-in distributions ---------------------------------------------------


def stand_in(folder: Path, *names: str) -> list[str]:
    """A folder where importlib.metadata finds these distributions installed (a dist-info each,
    with its METADATA), as the path to search."""
    for name in names:
        info = folder / f"{name.replace('-', '_')}-0.32.4.dist-info"
        info.mkdir(parents=True)
        (info / "METADATA").write_text(f"Metadata-Version: 2.1\nName: {name}\nVersion: 0.32.4\n")
    return [str(folder)]


def test_exactly_one_backend_is_no_problem(tmp_path: Path) -> None:
    path = stand_in(tmp_path, "mlx-cuda-13", "mlx-vlm")
    assert backends.installed_backends(path) == ["mlx-cuda-13"]
    assert backends.backend_problem(path, "linux") is None
    assert backends.backend_problem() is None  # this test run's own environment


@pytest.mark.parametrize("platform", ["linux", "darwin"])
def test_no_backend_is_one_sentence_with_the_command(tmp_path: Path, platform: str) -> None:
    problem = backends.backend_problem(stand_in(tmp_path, "mlx"), platform)
    assert problem is not None and "\n" not in problem
    assert problem.startswith("no MLX backend is installed")
    expected = "pip install -e '.[cpu]'" if platform == "linux" else "mlx-metal"
    assert expected in problem


def test_two_backends_are_named_with_how_to_keep_one(tmp_path: Path) -> None:
    path = stand_in(tmp_path, "mlx-cuda-13", "mlx-cpu")
    assert backends.installed_backends(path) == ["mlx-cpu", "mlx-cuda-13"]
    problem = backends.backend_problem(path, "linux")
    assert problem is not None and "\n" not in problem
    assert "2 MLX backends are installed (mlx-cpu, mlx-cuda-13)" in problem
    assert "pip uninstall -y mlx-cpu mlx-cuda-13" in problem and "'.[cuda13]'" in problem


def free_port() -> int:
    with socket.socket() as sock:
        sock.bind(("127.0.0.1", 0))
        return int(sock.getsockname()[1])


@pytest.mark.parametrize(
    "argv",
    [["serve", "--port", "PORT"], ["worker", "--database", "postgresql://aip@127.0.0.1:1/aip"]],
)
def test_serve_and_worker_refuse_without_a_backend_in_one_line(
    tmp_path: Path, argv: list[str]
) -> None:
    """The real CLI, in a process whose metadata lookup finds no backend installed."""
    argv = [str(free_port()) if a == "PORT" else a for a in argv]
    code = (
        "import sys\n"
        "from service.models import backends\n"
        "backends.installed_backends = lambda path=None: []  # as after `pip install -e .`\n"
        "from service.cli import main\n"
        f"sys.exit(main({[*argv, '--data-dir', str(tmp_path / 'data')]!r}))\n"
    )
    clean = {k: v for k, v in os.environ.items() if not k.startswith("AIP_")}
    done = subprocess.run(
        [sys.executable, "-c", code],
        cwd=ROOT,
        env={**clean, "AIP_INBOX_ENABLED": "0"},
        capture_output=True,
        text=True,
        timeout=120,
    )
    assert done.returncode == 2, done.stderr
    lines = done.stderr.strip().splitlines()
    assert lines == [f"aip: {backends.backend_problem(path=[])}"]  # nothing found: this one
    assert not (tmp_path / "data").exists()  # refused before anything was written

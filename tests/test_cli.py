"""The `aip` command as people use it: the real command (a subprocess where the process itself
matters: exit status, signals, tracebacks; `main()` in-process elsewhere) against a real
service. No error case may print a traceback."""

from __future__ import annotations

import argparse
import contextlib
import io
import json
import os
import pty
import re
import select
import signal
import socket
import subprocess
import sys
import threading
import time
from collections.abc import Callable, Iterator
from pathlib import Path
from typing import Any

import pytest
from PIL import Image

from service.cli import INTERRUPTED, main
from service.cli.commands import build_parser
from service.cli.output import job_summary, print_job, printable
from service.cli.waiting import progress_text
from tests.conftest import (
    RunningService,
    free_port,
    gate_detector,
    make_image,
    make_settings,
    subprocess_env,
)

Serve = Callable[..., RunningService]


def _env(tmp_path: Path, checkpoints: tuple[Path, Path] | None = None) -> dict[str, str]:
    return subprocess_env(tmp_path / "inbox", checkpoints)


def aip(*args: str, env: dict[str, str] | None = None, timeout: float = 60) -> tuple[int, str, str]:
    """The real command in its own process."""
    done = subprocess.run(
        [sys.executable, "-m", "service.cli", *args],
        capture_output=True,
        text=True,
        timeout=timeout,
        env=env,
    )
    assert "Traceback" not in done.stdout + done.stderr, done.stderr
    return done.returncode, done.stdout, done.stderr


def run(capsys: pytest.CaptureFixture[str], *args: str) -> tuple[int, str, str]:
    """`main()` in this process: the same code, without a second interpreter's start-up."""
    capsys.readouterr()
    try:
        code = main(list(args))
    except SystemExit as exc:  # argparse
        code = int(exc.code or 0)
    out, err = capsys.readouterr()
    assert "Traceback" not in out + err
    return code, out, err


def _one_sentence(err: str) -> str:
    lines = err.strip().splitlines()
    assert len(lines) == 1 and lines[0].startswith("aip: "), err
    return lines[0]


def _is_json(text: str) -> bool:
    try:
        json.loads(text)
    except ValueError:
        return False
    return True


@pytest.fixture
def service(tmp_path: Path, serve: Serve) -> RunningService:
    return serve(make_settings(tmp_path))


# -- the parser -------------------------------------------------------------------------------


def _parsers(parser: argparse.ArgumentParser) -> Iterator[argparse.ArgumentParser]:
    yield parser
    for action in parser._actions:
        if isinstance(action, argparse._SubParsersAction):
            for sub in action.choices.values():
                yield from _parsers(sub)


def test_every_flag_and_argument_has_help() -> None:
    missing = [
        f"{parser.prog} {action.option_strings or action.dest}"
        for parser in _parsers(build_parser())
        for action in parser._actions
        if not isinstance(action, argparse._SubParsersAction) and not action.help
    ]
    assert missing == []
    assert sum(1 for _ in _parsers(build_parser())) > 20  # the walk reached the leaves


def test_a_wrong_flag_prints_that_subcommands_usage(capsys: pytest.CaptureFixture[str]) -> None:
    code, out, err = aip("jobs", "--no-such-flag")
    assert code == 2 and out == ""
    assert err.startswith("usage: aip jobs ") and "unrecognized arguments: --no-such-flag" in err
    code, _, err = run(capsys, "models", "list", "--no-such-flag")
    assert code == 2 and err.startswith("usage: aip models list ")
    code, _, err = run(capsys, "service", "install", "--platform", "linux", "--nope")
    assert code == 2 and err.startswith("usage: aip service install ")


def test_an_unknown_top_level_option_is_named(capsys: pytest.CaptureFixture[str]) -> None:
    for argv in (["--bogus"], ["--bogus", "jobs"], ["--vers"]):
        code, out, err = run(capsys, *argv)
        assert code == 2 and out == "" and err.startswith("usage: aip [-h]"), argv
        assert err.splitlines()[-1] == f"aip: error: unrecognized arguments: {argv[0]}", argv


def test_a_filter_given_twice_is_a_usage_error(capsys: pytest.CaptureFixture[str]) -> None:
    # The API filters on one status; keeping only the last one silently would mislead.
    for command in ("jobs", "export", "stats"):
        code, out, err = run(capsys, command, "--status", "queued", "--status", "running")
        assert code == 2 and out == "" and err.startswith(f"usage: aip {command} "), command
        assert "argument --status: given twice" in err.splitlines()[-1], command


# -- failures are one sentence ----------------------------------------------------------------


def test_client_commands_without_a_service_say_one_sentence(
    tmp_path: Path, capsys: pytest.CaptureFixture[str]
) -> None:
    url = f"http://127.0.0.1:{free_port()}"  # nothing listens there
    code, out, err = aip("export", "--url", url, env=_env(tmp_path))
    assert code == 1 and out == ""
    assert "no service answers" in _one_sentence(err) and "aip serve" in err
    commands = (["show", "1"], ["jobs"], ["stats"], ["wait", "1"], ["cancel", "1"],
                ["models", "list"], ["inbox", "reprocess", "a.jpg"],
                ["export", "--json"])  # fmt: skip
    for command in commands:
        code, out, err = run(capsys, *command, "--url", url)
        assert code == 1 and out == "" and url in _one_sentence(err), command
    for bad in ("nonsense", "http://[::1", "ftp://host"):
        code, _, err = run(capsys, "jobs", "--url", bad)
        assert code == 2 and "--url http://127.0.0.1:8765" in _one_sentence(err), bad


def test_an_out_of_range_port_is_refused_before_any_request(
    tmp_path: Path, capsys: pytest.CaptureFixture[str], monkeypatch: pytest.MonkeyPatch
) -> None:
    monkeypatch.setenv("AIP_PORT", "99999")
    sentences = set()
    for command in (["jobs"], ["show", "1"], ["serve", "--data-dir", str(tmp_path / "d")]):
        code, out, err = run(capsys, *command)
        assert code == 2 and out == "", command
        sentences.add(_one_sentence(err))
    assert sentences == {"aip: AIP_PORT='99999': not a port number (1..65535)"}
    monkeypatch.delenv("AIP_PORT")
    for url in ("http://127.0.0.1:99999", "http://127.0.0.1:0"):
        code, _, err = run(capsys, "jobs", "--url", url)
        assert code == 2 and "is not a port number (1..65535)" in _one_sentence(err), url
        assert "no service answers" not in err
    assert not (tmp_path / "d").exists()


def _unix_socket(path: str) -> None:
    with socket.socket(socket.AF_UNIX) as sock:
        sock.bind(path)  # the socket file stays after close


@pytest.mark.parametrize(
    ("make", "kind"), [(os.mkfifo, "a named pipe (FIFO)"), (_unix_socket, "a socket")]
)
def test_submit_refuses_what_is_not_a_regular_file_without_opening_it(
    tmp_path: Path, capsys: pytest.CaptureFixture[str], make: Callable[[str], None], kind: str
) -> None:
    special = tmp_path / "ff.jpg"
    make(str(special))
    url = f"http://127.0.0.1:{free_port()}"
    for path, what in ((str(special), kind), (os.devnull, "a character device")):
        code, out, _ = run(capsys, "submit", path, "--url", url)  # a FIFO open would hang here
        why = f"not a regular file ({what}): only image files can be submitted"
        assert code == 1 and out == f"{path}: refused: {why}\n", path
    code, out, _ = run(capsys, "submit", str(tmp_path / "nothing.jpg"), "--url", url)
    assert code == 1 and out.endswith(": refused: no such file or folder\n")


def test_a_fifo_swapped_in_after_the_check_is_refused_not_waited_on(tmp_path: Path) -> None:
    from service.cli.files import image_files, open_regular

    path = tmp_path / "a.jpg"
    path.write_bytes(make_image())
    files, refused = image_files([str(path)])
    assert files == [path] and refused == []
    path.unlink()
    os.mkfifo(path)  # no writer: a blocking open would wait forever
    with pytest.raises(OSError, match=r"not a regular file \(a named pipe \(FIFO\)\)"):
        open_regular(path)


def test_a_missing_token_gets_one_hint(
    tmp_path: Path,
    serve: Serve,
    capsys: pytest.CaptureFixture[str],
    monkeypatch: pytest.MonkeyPatch,
) -> None:
    monkeypatch.delenv("AIP_TOKEN", raising=False)
    service = serve(make_settings(tmp_path, token="s3cret"))
    code, out, err = run(capsys, "jobs", "--url", service.url)
    assert code == 1 and out == ""
    sentence = _one_sentence(err)
    assert "unauthorized" in sentence and sentence.count("AIP_TOKEN") == 1, sentence


@contextlib.contextmanager
def _rude_server(behaviour: str) -> Iterator[str]:
    """A port that accepts connections and then says nothing (`silent`), or hangs up at once
    (`hangup`), or answers with a page that is not the service (`other`)."""
    listener = socket.socket()
    listener.bind(("127.0.0.1", 0))
    listener.listen()
    held: list[socket.socket] = []

    def serve() -> None:
        with contextlib.suppress(OSError):
            while True:
                conn, _ = listener.accept()
                if behaviour == "silent":
                    held.append(conn)
                    continue
                if behaviour == "other":
                    conn.recv(65536)
                    conn.sendall(b"HTTP/1.1 200 OK\r\nContent-Length: 5\r\n\r\nhello")
                conn.close()

    threading.Thread(target=serve, daemon=True).start()
    try:
        yield f"http://127.0.0.1:{listener.getsockname()[1]}"
    finally:
        listener.close()
        for conn in held:
            conn.close()


@pytest.mark.parametrize(
    ("behaviour", "expected"),
    [("silent", "did not answer within"), ("hangup", "failed"), ("other", "something other")],
)
def test_any_http_failure_is_one_sentence(
    behaviour: str,
    expected: str,
    capsys: pytest.CaptureFixture[str],
    monkeypatch: pytest.MonkeyPatch,
) -> None:
    monkeypatch.setattr("service.client.TIMEOUT_SECONDS", 0.3)
    with _rude_server(behaviour) as url:
        code, out, err = run(capsys, "show", "1", "--url", url)
    assert code == 1 and out == "" and expected in _one_sentence(err)


def test_port_checks_come_before_anything_is_created(
    tmp_path: Path, capsys: pytest.CaptureFixture[str], monkeypatch: pytest.MonkeyPatch
) -> None:
    data = tmp_path / "data"
    with socket.socket() as taken:
        taken.bind(("127.0.0.1", 0))
        taken.listen()
        port = str(taken.getsockname()[1])
        code, out, err = aip(
            "serve", "--demo", "--port", port, "--data-dir", str(data), env=_env(tmp_path)
        )
    assert code == 2 and out == ""
    sentence = _one_sentence(err)
    assert f"port {port}" in sentence and "--port" in sentence and "AIP_PORT" in sentence
    assert not data.exists() and not (tmp_path / "inbox").exists()  # no database, no watcher

    for bad in ("99999", "0", "http"):
        code, _, err = run(capsys, "serve", "--port", bad, "--data-dir", str(data))
        assert code == 2 and err.startswith("usage: aip serve ")
        assert "not a port number (1..65535)" in err.splitlines()[-1]
    monkeypatch.setenv("AIP_PORT", "99999")
    code, _, err = run(capsys, "serve", "--data-dir", str(data))
    assert code == 2 and "AIP_PORT" in _one_sentence(err)
    assert not data.exists()
    monkeypatch.setenv("AIP_PORT", "http")  # not even a number: every command says so once
    for command in (["serve"], ["jobs"], ["service", "status", "--platform", "linux"]):
        code, _, err = run(capsys, *command)
        assert code == 2 and "AIP_PORT='http'" in _one_sentence(err), command


def test_a_second_service_on_the_same_data_dir_or_inbox_is_one_sentence(
    tmp_path: Path, service: RunningService, tiny_checkpoints: tuple[Path, Path]
) -> None:
    data = service.settings.data_dir
    env = _env(tmp_path, tiny_checkpoints)
    code, out, err = aip("serve", "--data-dir", str(data), "--port", str(free_port()), env=env)
    assert code == 2 and out == ""
    sentence = _one_sentence(err)
    assert "already using" in sentence and str(data) in sentence and "--data-dir" in sentence

    other = tmp_path / "other"  # another data directory, the same inbox
    code, _, err = aip(
        "serve", "--data-dir", str(other), "--inbox", str(service.settings.inbox_dir),
        "--port", str(free_port()), env=env,
    )  # fmt: skip
    assert code == 2 and "--inbox" in _one_sentence(err) and "already watched" in err


def test_a_failure_inside_the_apps_start_up_is_one_sentence(
    tmp_path: Path, tiny_checkpoints: tuple[Path, Path]
) -> None:
    folder = tmp_path / "a-folder-not-a-database"
    folder.mkdir()
    env = {**_env(tmp_path, tiny_checkpoints), "AIP_DB": str(folder)}
    code, out, err = aip(
        "serve", "--log-level", "warning", "--data-dir", str(tmp_path / "data"),
        "--port", str(free_port()), env=env,
    )  # fmt: skip
    assert code == 1 and out == ""
    assert "unable to open database file" in _one_sentence(err) and "startup failed" not in err


def test_sigterm_while_starting_up_is_a_clean_stop(tmp_path: Path) -> None:
    process = subprocess.Popen(
        [sys.executable, "-m", "service.cli", "serve", "--demo", "--port", str(free_port()),
         "--data-dir", str(tmp_path / "data")],
        env=_env(tmp_path), stdout=subprocess.PIPE, stderr=subprocess.PIPE, text=True,
    )  # fmt: skip
    assert process.stderr is not None
    first = process.stderr.readline()  # printed as the demo checkpoints start to be written
    assert "demo mode" in first
    process.send_signal(signal.SIGTERM)
    _, err = process.communicate(timeout=60)
    assert process.returncode == 0, first + err
    assert "stopped (SIGTERM) before the service started" in err and "Traceback" not in err


def _aip_command() -> list[str]:
    """The console script people run when it is installed (its start-up is the one to cover),
    else the module."""
    script = Path(sys.executable).with_name("aip")
    return [str(script)] if script.exists() else [sys.executable, "-m", "service.cli"]


def _before_main(code: int, output: str) -> bool:
    """What only Python itself can print: the Ctrl-C landed while the interpreter started (a
    fatal error importing `site`), or while the launcher was still importing (`import re`,
    `from service.cli import main`) before `main` ran: no frame of ours but a module body."""
    if code == 1 and output.startswith("Fatal Python error: init_import_site"):
        return True
    if code == -signal.SIGINT and output == "":  # before Python set its handler
        return True
    ours = Path(__file__).resolve().parents[1] / "service"
    frames = re.findall(r'File "([^"]+)", line \d+, in (\S+)', output)
    return (
        code == -signal.SIGINT
        and output.rstrip().endswith("KeyboardInterrupt")
        and all(
            name == "<module>" and Path(file).name == "__init__.py"
            for file, name in frames
            if Path(file).resolve().is_relative_to(ours)
        )
    )


@pytest.mark.parametrize("command", ["jobs", "serve"])
def test_ctrl_c_at_any_moment_is_no_traceback(tmp_path: Path, command: str) -> None:
    """Client commands exit 130, and `aip serve` stopped before it started exits 0 (as a stop
    of a running service does), from the first instant `main` runs, imports included."""

    def start(n: int, url: str) -> subprocess.Popen[str]:
        data = str(tmp_path / f"d{n}")
        args = (["jobs", "--url", url] if command == "jobs" else
                ["serve", "--demo", "--port", str(free_port()), "--data-dir", data])  # fmt: skip
        return subprocess.Popen(
            [*_aip_command(), *args], env=_env(tmp_path), text=True,
            stdout=subprocess.PIPE, stderr=subprocess.PIPE,
        )  # fmt: skip

    def stop(process: subprocess.Popen[str]) -> tuple[int, str]:
        process.send_signal(signal.SIGINT)
        out, err = process.communicate(timeout=60)
        return process.returncode, out + err

    expected = INTERRUPTED if command == "jobs" else 0
    # For `jobs`: a service that takes the connection and never answers, so the command is
    # still running whenever the Ctrl-C comes.
    with socket.socket() as silent, socket.socket() as last:
        for listener in (silent, last):
            listener.bind(("127.0.0.1", 0))
            listener.listen(16)
        url = "http://127.0.0.1:{}".format
        for n, delay in enumerate((0.03, 0.05, 0.1, 0.2, 0.3, 0.45, 0.6)):
            process = start(n, url(silent.getsockname()[1]))
            time.sleep(delay)
            code, output = stop(process)
            if code != expected and _before_main(code, output):
                continue
            assert code == expected and "Traceback" not in output, (delay, output)
        # And once certainly inside `main`: connected to the service, or writing the demo models.
        process = start(99, url(last.getsockname()[1]))
        if command == "jobs":
            last.settimeout(60)
            connection, _ = last.accept()
        else:
            assert process.stderr is not None and "demo mode" in process.stderr.readline()
        code, output = stop(process)
    assert code == expected and "Traceback" not in output, output
    if command == "serve":
        assert output.strip().splitlines()[-1] == "aip: stopped (SIGINT) before the service started"
    else:
        connection.close()


def test_a_ctrl_c_anywhere_in_main_is_caught_imports_included(
    capsys: pytest.CaptureFixture[str], monkeypatch: pytest.MonkeyPatch
) -> None:
    """The window a subprocess hits only by chance: the interrupt lands in the lazy import."""
    real_import = __import__

    def interrupted_import(name: str, *args: Any, **kwargs: Any) -> Any:
        if name == "service.cli.commands":
            raise KeyboardInterrupt
        return real_import(name, *args, **kwargs)

    monkeypatch.setattr("builtins.__import__", interrupted_import)
    assert main(["jobs"]) == INTERRUPTED
    assert main(["serve", "--demo"]) == 0
    _, err = capsys.readouterr()
    assert err == "\naip: stopped (SIGINT) before the service started\n"
    assert signal.getsignal(signal.SIGINT) is signal.default_int_handler  # given back


# -- waiting ----------------------------------------------------------------------------------


def _read_until(fd: int, text: str, process: subprocess.Popen[Any], timeout: float = 60) -> str:
    seen = b""
    deadline = time.monotonic() + timeout
    while text.encode() not in seen:
        assert time.monotonic() < deadline and process.poll() is None, seen.decode()
        if select.select([fd], [], [], 0.1)[0]:
            seen += os.read(fd, 4096)
    return seen.decode()


def _drain(fd: int) -> str:
    """What is left to read from a terminal whose other end has closed."""
    text = b""
    with contextlib.suppress(OSError):  # EIO: everything was read
        while select.select([fd], [], [], 1)[0]:
            chunk = os.read(fd, 4096)
            if not chunk:
                break
            text += chunk
    return text.decode()


def test_wait_shows_the_queue_position_then_stage_and_ctrl_c_names_the_job(
    tmp_path: Path,
    service: RunningService,
    monkeypatch: pytest.MonkeyPatch,
    capsys: pytest.CaptureFixture[str],
) -> None:
    gate = gate_detector(service, monkeypatch)
    ahead = service.submit(queries="car").json()["id"]
    assert gate.inside.wait(60)
    running = service.client.get(f"/v1/jobs/{ahead}").json()
    assert running["stage"] == "detect:car" and running["queue_position"] is None

    image = tmp_path / "frame.jpg"
    image.write_bytes(make_image())
    terminal, stderr_tty = pty.openpty()  # a terminal for stderr: the progress line shows
    process = subprocess.Popen(
        [sys.executable, "-m", "service.cli", "submit", str(image), "--wait", "--url", service.url],
        env=_env(tmp_path), stdout=subprocess.PIPE, stderr=stderr_tty, text=True,
    )  # fmt: skip
    os.close(stderr_tty)
    try:
        assert process.stdout is not None
        line = process.stdout.readline()
        job_id = int(line.rsplit(": job ", 1)[1].split()[0])
        progress = _read_until(terminal, "queued, position 1 in the queue", process)
        assert f"job {job_id}: queued" in progress
        assert service.client.get(f"/v1/jobs/{job_id}").json()["queue_position"] == 1
        process.send_signal(signal.SIGINT)
        assert process.wait(timeout=30) == 130
        err = _drain(terminal)
    finally:
        os.close(terminal)
        if process.poll() is None:
            process.kill()
    assert "Traceback" not in err
    assert f"`aip wait {job_id}`" in err and f"`aip show {job_id}`" in err

    code, out, _ = run(capsys, "cancel", str(job_id), "--url", service.url)
    assert code == 0 and out == f"job {job_id}: cancelled\n"
    code, out, _ = run(capsys, "cancel", str(ahead), "--url", service.url)
    assert code == 0 and out.startswith(f"job {ahead}: cancel requested")
    gate.release.set()
    assert service.wait(ahead)["status"] == "cancelled"


def test_progress_text_names_position_then_stage() -> None:
    queued = {"id": 3, "status": "queued", "queue_position": 2}
    running = {"id": 2, "status": "running", "stage": "reason"}
    done = {"id": 1, "status": "succeeded"}
    assert progress_text([queued]) == "job 3: queued, position 2 in the queue"
    assert progress_text([running]) == "job 2: running: reason"
    assert progress_text([{**running, "stage": "detect:car"}]) == "job 2: running: detect 'car'"
    assert progress_text([done, running, queued]) == (
        "1 of 3 done; job 2 running: reason; 1 queued, next at position 2"
    )


# -- everyday use -----------------------------------------------------------------------------


def _image_with_gps(path: Path) -> None:
    image = Image.open(io.BytesIO(make_image(96, 64)))
    exif = Image.Exif()
    exif[0x010F], exif[0x0110] = "DJI", "FC3411"  # make, model
    exif[0x8825] = {1: "N", 2: (47.0, 30.0, 0.0), 3: "E", 4: (8.0, 15.0, 0.0)}
    image.save(path, exif=exif)


def test_submit_files_and_folders_then_wait_show_and_list(
    tmp_path: Path, service: RunningService, capsys: pytest.CaptureFixture[str]
) -> None:
    folder = tmp_path / "flight"
    (folder / "sub").mkdir(parents=True)
    _image_with_gps(folder / "a.jpg")
    (folder / "sub" / "b.png").write_bytes(make_image(64, 48, fmt="PNG"))
    (folder / ".hidden.jpg").write_bytes(make_image(32, 32))
    (folder / "notes.txt").write_text("not an image")
    broken = tmp_path / "broken.jpg"
    broken.write_text("not an image either")
    url = ["--url", service.url]
    query = ["-q", "car", "-p", "Is the road blocked?"]

    paths = [str(folder), str(broken), str(tmp_path / "nope")]
    code, out, _ = run(capsys, "submit", *paths, *query, *url)
    assert code == 1  # something was refused
    assert "2 accepted, 0 duplicates, 2 refused" in out
    assert f"{broken}: refused: not_an_image" in out and "nope: refused: no such file" in out
    code, out, _ = run(capsys, "submit", str(broken), "--json", *url)
    assert code == 1 and json.loads(out)["error"]["code"] == "not_an_image"
    assert json.loads(out)["path"] == str(broken)

    code, out, err = run(capsys, "submit", str(folder), *query, "--wait", "--json", *url)
    assert code == 0 and err == ""  # no progress line where stderr is no terminal
    jobs = [json.loads(line) for line in out.splitlines()]  # JSON Lines, one job per image
    assert [j["input"]["name"] for j in jobs] == ["a.jpg", "b.png"]
    assert all(j["status"] == "succeeded" for j in jobs)  # duplicates of the first two, waited
    first = jobs[0]["id"]

    code, out, _ = run(capsys, "submit", str(folder / "a.jpg"), *query, "--again", *url)
    # A new job; the idle worker may have taken it before the 202 was answered.
    assert code == 0 and f"job {first}" not in out and ("queued" in out or "running" in out)

    code, out, _ = run(capsys, "show", str(first), *url)
    assert code == 0
    for text in ("queries    car", "prompt     Is the road blocked?", "camera     DJI FC3411",
                 "gps        47.500000, 8.250000", "detector   ", "reasoner   ", "reasoning",
                 "a.jpg  96x64 JPEG"):  # fmt: skip
        assert text in out, text
    assert "detections (" in out and not _is_json(out)

    code, out, _ = run(capsys, "jobs", "--limit", "2", *url)
    lines = out.splitlines()
    assert lines[0].split() == ["ID", "STATUS", "CREATED", "FOUND", "NAME"] and len(lines) == 4
    assert lines[-1].startswith("more: aip jobs --limit 2 --url ")
    cursor = lines[-1].split("--cursor ")[1]
    code, out, _ = run(capsys, "jobs", "--limit", "2", "--cursor", cursor, *url)
    assert code == 0 and out.splitlines()[1].split()[0] == str(first)
    assert "more:" not in out


def test_json_only_when_asked(service: RunningService, capsys: pytest.CaptureFixture[str]) -> None:
    job = service.wait(service.submit().json()["id"])
    url = ["--url", service.url]
    commands = (["stats"], ["models", "list"], ["jobs"], ["show", str(job["id"])],
                ["wait", str(job["id"])],
                ["prune", "--older-than", "30d", "--dry-run"])  # fmt: skip
    for command in commands:
        code, out, _ = run(capsys, *command, *url)
        assert code == 0 and not _is_json(out), command
        code, out, _ = run(capsys, *command, *url, "--json")
        lines = out.splitlines()
        assert code == 0 and (_is_json(out) or all(map(_is_json, lines))), command
    code, out, _ = run(capsys, "export", "--json", *url)
    assert code == 0 and [json.loads(line)["id"] for line in out.splitlines()] == [job["id"]]
    code, _, err = run(capsys, "export", "--json", "--format", "csv", *url)
    assert code == 2 and "JSON Lines" in _one_sentence(err)
    code, out, _ = run(capsys, "retry", str(job["id"]), *url, "--json")
    assert code == 1 and out == ""  # a succeeded job is not retried: one sentence on stderr


def test_show_lists_the_timings_in_pipeline_order_with_total_last(
    service: RunningService, capsys: pytest.CaptureFixture[str]
) -> None:
    job = service.wait(service.submit().json()["id"])
    assert job["status"] == "succeeded" and "persist" in job["timings_ms"]
    code, out, _ = run(capsys, "show", str(job["id"]), "--url", service.url)
    assert code == 0
    stages = re.findall(r"(\w+) \d+ ms", out)
    assert stages == ["queue_wait", "decode", "detect", "reason", "geo", "persist", "total"], out


def test_inbox_reprocess_runs_a_handled_file_again(
    tmp_path: Path, serve: Serve, capsys: pytest.CaptureFixture[str]
) -> None:
    settings = make_settings(tmp_path)
    settings.inbox_dir.mkdir(parents=True)
    (settings.inbox_dir / "drop.jpg").write_bytes(make_image())  # there at start: picked up
    service = serve(settings)
    deadline = time.monotonic() + 60
    while not (settings.inbox_dir / "processed" / "drop.jpg").exists():
        assert time.monotonic() < deadline, "the inbox never filed the image"
        time.sleep(0.05)
    [first] = service.client.get("/v1/jobs", params={"source": "inbox"}).json()["jobs"]
    code, out, _ = run(capsys, "inbox", "reprocess", "processed/drop.jpg", "--url", service.url)
    assert code == 0 and out.startswith("processed/drop.jpg: job ")
    again = int(out.split(": job ")[1].split()[0])
    assert again != first["id"]
    assert service.wait(again)["input"]["sha256"] == first["input"]["sha256"]


def test_show_never_sends_escape_sequences_from_a_model_or_a_file_name(
    capsys: pytest.CaptureFixture[str],
) -> None:
    job = {
        "id": 7, "status": "succeeded", "attempts": 1, "max_attempts": 3,
        "input": {"name": "evil\x1b]0;title\x07.jpg", "width": 4, "height": 3, "bytes": 10},
        "params": {"queries": ["car\u202e"], "prompt": "why?"},
        "result": {"detections": [{"number": 1, "label": "car\u202e", "box": [0, 0, 1, 1]}],
                   "reasoning": "fine\x1b[2J\nsecond line"},
    }  # fmt: skip
    print_job(job)
    shown = capsys.readouterr().out
    assert "\x1b" not in shown and "\x07" not in shown and "\u202e" not in shown
    assert "fine\ufffd[2J" in shown and "second line" in shown
    assert printable(job_summary(job)) == job_summary(job)

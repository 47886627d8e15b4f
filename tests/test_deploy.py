"""`aip service` against stand-in launchctl / systemctl / tail executables first on PATH that
record their arguments; the rendered plist and unit validated by plistlib, an INI parse and
(where present) `systemd-analyze verify`; the service's own rotating log."""

from __future__ import annotations

import configparser
import json
import logging
import os
import plistlib
import shlex
import shutil
import socket
import stat
import subprocess
import threading
from collections.abc import Callable, Iterator
from http.server import BaseHTTPRequestHandler, ThreadingHTTPServer
from pathlib import Path

import pytest
import uvicorn

from service import __version__, deploy
from service.cli import main
from service.config import Settings
from service.logs import LOG_FILE, configure_logging
from tests.conftest import RunningService, make_settings

STANDIN = r"""#!/bin/sh
tool=$(basename "$0")
{ printf '%s' "$tool"; for a in "$@"; do printf '\t%s' "$a"; done; printf '\n'; } >> "$STANDIN_LOG"
verb=$1; [ "$verb" = --user ] && verb=$2
[ -f "$STANDIN_DIR/$tool-$verb.out" ] && cat "$STANDIN_DIR/$tool-$verb.out"
[ -f "$STANDIN_DIR/$tool-$verb.rc" ] && exit "$(cat "$STANDIN_DIR/$tool-$verb.rc")"
exit 0
"""
UID = os.getuid()
AGENT = f"gui/{UID}/local.aip"


class Env:
    def __init__(self, root: Path, capsys: pytest.CaptureFixture[str]) -> None:
        self.home = root / "home"
        # Escaping: an XML entity; `%z` is no systemd specifier, so unescaped it fails verify.
        self.data = root / "my data & 100%zone"
        self.bin = root / "bin"
        self.log = root / "calls.log"
        self.capsys = capsys

    def aip(self, *args: str) -> tuple[int, str, str]:
        self.capsys.readouterr()
        code = main(["service", *args])
        out, err = self.capsys.readouterr()
        return code, out, err

    def install(self, platform: str, *args: str) -> tuple[int, str, str]:
        return self.aip("install", "--platform", platform, "--data-dir", str(self.data), *args)

    def calls(self) -> list[list[str]]:
        if not self.log.exists():
            return []
        return [line.split("\t") for line in self.log.read_text().splitlines()]

    def reply(self, tool: str, verb: str, out: str = "", rc: int = 0) -> None:
        (self.bin / f"{tool}-{verb}.out").write_text(out)
        (self.bin / f"{tool}-{verb}.rc").write_text(str(rc))


@pytest.fixture
def env(tmp_path: Path, monkeypatch: pytest.MonkeyPatch, capsys: pytest.CaptureFixture[str]) -> Env:
    e = Env(tmp_path, capsys)
    e.home.mkdir()
    e.bin.mkdir()
    for tool in ("launchctl", "systemctl", "tail"):
        script = e.bin / tool
        script.write_text(STANDIN)
        script.chmod(0o755)
    for key in list(os.environ):
        if key.startswith(("AIP_", "XDG_", "HF_")):
            monkeypatch.delenv(key)
    monkeypatch.setenv("HOME", str(e.home))
    monkeypatch.setenv("HF_HOME", str(tmp_path / "hf"))  # an empty hub cache
    monkeypatch.setenv("PATH", f"{e.bin}{os.pathsep}{os.environ['PATH']}")
    monkeypatch.setenv("STANDIN_LOG", str(e.log))
    monkeypatch.setenv("STANDIN_DIR", str(e.bin))
    monkeypatch.setattr(deploy, "LINGER_DIR", tmp_path / "linger")
    return e


def _unit(text: str) -> dict[str, dict[str, list[str]]]:
    """systemd's INI dialect: repeated keys accumulate (configparser would keep the last)."""
    sections: dict[str, dict[str, list[str]]] = {}
    current: dict[str, list[str]] = {}
    for line in text.splitlines():
        line = line.strip()
        if not line or line.startswith(("#", ";")):
            continue
        if line.startswith("["):
            current = sections.setdefault(line.strip("[]"), {})
            continue
        key, _, value = line.partition("=")
        current.setdefault(key, []).append(value)
    return sections


def _env_line(value: str) -> tuple[str, str]:
    """One `Environment="KEY=value"` as systemd reads it: C escapes, `%%` for a `%`."""
    assert value[0] == value[-1] == '"', value
    body, text, i = value[1:-1], "", 0
    while i < len(body):
        if body[i] == "\\":
            assert body[i + 1] in '\\"', f"systemd would read \\{body[i + 1]} as a C escape"
            i += 1
        else:
            assert body[i] != '"', f"an unescaped quote ends the value early: {value}"
        text += body[i]
        i += 1
    key, _, raw = text.partition("=")
    return key, raw.replace("%%", "%")


def _tree(root: Path) -> dict[str, bytes | None]:
    return {
        str(p.relative_to(root)): (p.read_bytes() if p.is_file() else None)
        for p in sorted(root.rglob("*"))
    }


def test_install_on_macos_writes_a_valid_agent_then_enables_and_bootstraps(env: Env) -> None:
    code, out, _ = env.install("macos", "--demo")
    assert code == 0
    path = env.home / "Library" / "LaunchAgents" / "local.aip.plist"
    assert env.calls() == [
        ["launchctl", "enable", AGENT],
        ["launchctl", "bootstrap", f"gui/{UID}", str(path)],
    ]
    plist = plistlib.loads(path.read_bytes())
    types = {
        "Label": str, "ProgramArguments": list, "WorkingDirectory": str,
        "EnvironmentVariables": dict, "RunAtLoad": bool, "KeepAlive": dict,
        "ThrottleInterval": int, "ProcessType": str, "ExitTimeOut": int,
        "StandardOutPath": str, "StandardErrorPath": str, "SoftResourceLimits": dict,
    }  # fmt: skip
    assert {key: type(plist[key]) for key in plist} == types
    assert plist["Label"] == "local.aip" and plist["RunAtLoad"] is True
    assert plist["KeepAlive"] == {"SuccessfulExit": False}  # crash: restart; clean stop: not
    assert plist["ProcessType"] == "Interactive"
    assert plist["ExitTimeOut"] == 15 + 5 and plist["ThrottleInterval"] >= 5
    assert plist["SoftResourceLimits"]["NumberOfFiles"] >= 1024
    exe, *rest = plist["ProgramArguments"]
    assert rest == ["serve", "--demo"] and os.access(exe, os.X_OK) and Path(exe).is_absolute()
    env_vars = plist["EnvironmentVariables"]
    assert all(isinstance(v, str) for v in env_vars.values())
    assert env_vars["AIP_DATA_DIR"] == plist["WorkingDirectory"] == str(env.data)
    for key in ("AIP_DATA_DIR", "AIP_INBOX", "AIP_LOG_DIR"):
        assert Path(env_vars[key]).is_absolute() and Path(env_vars[key]).is_dir(), key
    assert env_vars["AIP_INBOX"] == str(env.data / "inbox")
    for key in ("StandardOutPath", "StandardErrorPath"):
        assert Path(plist[key]).parent == Path(env_vars["AIP_LOG_DIR"])
    assert env_vars["HF_HUB_OFFLINE"] == "1" and env_vars["AIP_LOG_STDERR"] == "0"
    assert env_vars["PATH"].split(":")[0] == str(Path(exe).parent)
    assert "AIP_TOKEN" not in env_vars and "AIP_DETECTOR" not in env_vars  # demo: own models
    assert stat.S_IMODE(path.stat().st_mode) == 0o644
    assert str(path) in out

    assert env.install("macos", "--demo")[0] == 0  # again: the loaded agent goes first
    assert env.calls()[2:] == [
        ["launchctl", "bootout", AGENT],
        ["launchctl", "enable", AGENT],
        ["launchctl", "bootstrap", f"gui/{UID}", str(path)],
    ]


def test_install_on_linux_writes_a_valid_unit_then_reloads_and_enables(env: Env) -> None:
    code, out, _ = env.install("linux", "--demo", "--port", "9123")
    assert code == 0
    path = env.home / ".config" / "systemd" / "user" / "aip.service"
    assert env.calls() == [
        ["systemctl", "--user", "daemon-reload"],
        ["systemctl", "--user", "enable", "--now", "aip.service"],
    ]
    text = path.read_text()
    parser = configparser.ConfigParser(strict=False, interpolation=None)
    parser.read_string(text)
    assert parser.sections() == ["Unit", "Service", "Install"]
    unit = _unit(text)
    service = {key: values[-1] for key, values in unit["Service"].items()}
    assert service["Type"] == "exec" and service["Restart"] == "on-failure"
    assert service["KillSignal"] == "SIGTERM" and int(service["TimeoutStopSec"]) == 15 + 5
    assert int(service["LimitNOFILE"]) >= 1024 and int(service["RestartSec"]) >= 5
    assert unit["Install"]["WantedBy"] == ["default.target"]
    exe, *rest = shlex.split(service["ExecStart"])
    assert rest == ["serve", "--demo"] and os.access(exe, os.X_OK) and Path(exe).is_absolute()
    env_vars = dict(_env_line(v) for v in unit["Service"]["Environment"])
    assert env_vars["AIP_DATA_DIR"] == str(env.data)
    assert service["WorkingDirectory"].replace("%%", "%") == str(env.data)
    for key in ("AIP_DATA_DIR", "AIP_INBOX", "AIP_LOG_DIR"):
        assert Path(env_vars[key]).is_absolute() and Path(env_vars[key]).is_dir(), key
    assert env_vars["AIP_LOG_DIR"] == str(env.data / "logs") and env_vars["AIP_PORT"] == "9123"
    assert env_vars["HF_HUB_OFFLINE"] == "1" and "AIP_LOG_STDERR" not in env_vars
    assert "loginctl enable-linger" in out  # no linger file for this user

    assert env.install("linux", "--demo", "--port", "9123")[0] == 0  # again: restart
    assert env.calls()[2:] == [
        ["systemctl", "--user", "daemon-reload"],
        ["systemctl", "--user", "enable", "aip.service"],
        ["systemctl", "--user", "restart", "aip.service"],
    ]


@pytest.mark.skipif(not shutil.which("systemd-analyze"), reason="systemd-analyze not installed")
def test_rendered_unit_passes_systemd_analyze_verify(env: Env, tmp_path: Path) -> None:
    token = 's3"c\\re t%z$HOME'
    assert env.install("linux", "--demo", "--token", token)[0] == 0
    path = env.home / ".config" / "systemd" / "user" / "aip.service"
    runtime = tmp_path / "runtime"
    runtime.mkdir(mode=0o700)
    result = subprocess.run(
        ["systemd-analyze", "--user", "verify", str(path)],
        capture_output=True,
        text=True,
        env={**os.environ, "XDG_RUNTIME_DIR": str(runtime)},
        timeout=60,
    )
    assert result.returncode == 0 and result.stderr == "", result.stderr  # warnings: rc 0 too
    env_vars = dict(_env_line(v) for v in _unit(path.read_text())["Service"]["Environment"])
    assert env_vars["AIP_TOKEN"] == token
    assert stat.S_IMODE(path.stat().st_mode) == 0o600  # the token is not world-readable


@pytest.mark.parametrize("platform", ["macos", "linux"])
def test_dry_run_prints_the_file_and_commands_and_changes_nothing(env: Env, platform: str) -> None:
    before = _tree(env.home.parent)
    code, out, _ = env.install(platform, "--demo", "--dry-run")
    assert code == 0
    assert _tree(env.home.parent) == before and env.calls() == []
    assert "# would write" in out and str(env.home) in out
    assert ("<key>ProcessType</key>" in out) == (platform == "macos")
    assert ("Restart=on-failure" in out) == (platform == "linux")
    expected = f"$ launchctl bootstrap gui/{UID}" if platform == "macos" else "enable --now"
    assert expected in out


def test_install_refuses_when_models_are_not_on_disk(env: Env, tmp_path: Path) -> None:
    missing = tmp_path / "no-such-detector"
    code, _, err = env.install("linux", "--detector", str(missing))
    assert code == 2
    assert str(missing) in err and "mlx-community/gemma-4-e2b-it-4bit" in err  # both named
    assert "aip models pull" in err
    assert env.calls() == [] and not (env.home / ".config").exists()

    for name in ("detector", "reasoner"):  # present (a folder with config.json): installs
        (tmp_path / name).mkdir()
        (tmp_path / name / "config.json").write_text("{}")
    detector, reasoner = str(tmp_path / "detector"), str(tmp_path / "reasoner")
    code, _, err = env.install("macos", "--detector", detector, "--reasoner", reasoner)
    assert code == 0, err
    plist = plistlib.loads((env.home / "Library/LaunchAgents/local.aip.plist").read_bytes())
    assert plist["ProgramArguments"][1:] == ["serve"]
    assert plist["EnvironmentVariables"]["AIP_DETECTOR"] == detector


def test_dry_run_without_weights_prints_the_unit_and_warns(env: Env, tmp_path: Path) -> None:
    before = _tree(env.home.parent)
    missing = tmp_path / "no-such-detector"
    code, out, err = env.install("linux", "--detector", str(missing), "--dry-run")
    assert code == 0 and env.calls() == [] and _tree(env.home.parent) == before
    assert "# would write" in out and "Restart=on-failure" in out and "enable --now" in out
    assert str(missing) in err and "aip models pull" in err and "would not start" in err
    assert f'Environment="AIP_DETECTOR={missing}"' in out
    assert "models pull" not in out  # the warning stays off stdout, which holds only the file


def test_install_refuses_a_public_address_without_a_token(env: Env) -> None:
    code, _, err = env.install("linux", "--demo", "--host", "0.0.0.0")
    assert code == 2 and "token" in err and env.calls() == []


@pytest.mark.parametrize(
    ("platform", "stop"),
    [
        ("macos", [["launchctl", "bootout", AGENT]]),
        (
            "linux",
            [
                ["systemctl", "--user", "disable", "--now", "aip.service"],
                ["systemctl", "--user", "daemon-reload"],
            ],
        ),
    ],
)
def test_uninstall_stops_and_removes_the_file_and_keeps_the_data(
    env: Env, platform: str, stop: list[list[str]]
) -> None:
    assert env.install(platform, "--demo")[0] == 0
    path = (
        env.home
        / {
            "macos": "Library/LaunchAgents/local.aip.plist",
            "linux": ".config/systemd/user/aip.service",
        }[platform]
    )
    kept = env.data / "aip.db"
    kept.write_bytes(b"jobs")
    env.log.unlink()

    assert env.aip("uninstall", "--platform", platform, "--dry-run")[0] == 0
    assert path.exists() and env.calls() == []

    code, out, _ = env.aip("uninstall", "--platform", platform)
    assert code == 0 and "untouched" in out
    assert env.calls() == stop
    assert not path.exists() and kept.read_bytes() == b"jobs" and (env.data / "inbox").is_dir()


def _free_port() -> int:
    with socket.socket() as s:
        s.bind(("127.0.0.1", 0))
        return int(s.getsockname()[1])


@pytest.fixture
def health_server() -> Iterator[int]:
    class Health(BaseHTTPRequestHandler):
        def do_GET(self) -> None:
            body = json.dumps({"status": "ok", "version": "9.9", "queue": {"depth": 3}})
            self.send_response(200 if self.path == "/v1/health" else 404)
            self.send_header("Content-Type", "application/json")
            self.end_headers()
            self.wfile.write(body.encode())

        def log_message(self, *args: object) -> None:
            pass

    server = ThreadingHTTPServer(("127.0.0.1", 0), Health)
    threading.Thread(target=server.serve_forever, daemon=True).start()
    yield server.server_address[1]
    server.shutdown()
    server.server_close()


def test_status_on_macos_reports_launchctl_state_and_health_of_the_installed_port(
    env: Env, health_server: int
) -> None:
    assert env.install("macos", "--demo", "--port", str(health_server))[0] == 0
    env.reply("launchctl", "print", f"{AGENT} = {{\n\tstate = running\n\tpid = 4242\n"
              "\tlast exit code = 0\n\tendpoints = {\n\t\tstate = active\n\t}\n}\n")  # fmt: skip
    code, out, _ = env.aip("status", "--platform", "macos")
    assert code == 0
    assert "launchd: loaded, running, pid 4242, last exit status 0" in out
    assert f"health: ok at http://127.0.0.1:{health_server} (version 9.9, queue 3)" in out
    assert env.calls()[-1] == ["launchctl", "print", AGENT]

    env.reply("launchctl", "print", "Could not find service", rc=113)
    code, out, _ = env.aip("status", "--platform", "macos")
    assert code == 3 and "launchd: not loaded" in out


def test_status_on_linux_reports_systemctl_state_and_a_silent_service(env: Env) -> None:
    port = _free_port()  # nothing listens there
    assert env.install("linux", "--demo", "--port", str(port))[0] == 0
    env.reply("systemctl", "show", "LoadState=loaded\nActiveState=activating\n"
              "SubState=auto-restart\nMainPID=0\nExecMainStatus=1\n")  # fmt: skip
    code, out, _ = env.aip("status", "--platform", "linux")
    assert code == 0
    assert "systemd: loaded, activating (auto-restart), last exit status 1" in out
    assert f"health: not answering at http://127.0.0.1:{port}" in out
    show = env.calls()[-1]
    assert show[:4] == ["systemctl", "--user", "show", "aip.service"]

    assert env.aip("uninstall", "--platform", "linux")[0] == 0
    code, out, _ = env.aip("status", "--platform", "linux")
    assert code == 3 and "not installed" in out


@pytest.fixture
def root_logging() -> Iterator[None]:
    root = logging.getLogger()
    handlers, level = list(root.handlers), root.level
    yield
    for handler in list(root.handlers):
        root.removeHandler(handler)
        handler.close()
    for handler in handlers:
        root.addHandler(handler)
    root.setLevel(level)


def test_service_log_rotates_within_its_cap_and_carries_uvicorn(
    tmp_path: Path, root_logging: None
) -> None:
    log_dir = tmp_path / "logs"
    path = configure_logging("info", log_dir, stderr=False, max_bytes=4000, backups=2)
    assert path == log_dir / LOG_FILE
    uvicorn.Config(app=lambda: None, log_config=None, log_level="info")  # what cmd_serve runs
    logging.getLogger("uvicorn.error").info("uvicorn says hello")
    for i in range(400):
        logging.getLogger("aip").info("line %d %s", i, "x" * 40)
    logging.getLogger("uvicorn.access").info("GET /v1/health 200")
    assert sorted(p.name for p in log_dir.iterdir()) == ["aip.log", "aip.log.1", "aip.log.2"]
    assert all(p.stat().st_size <= 4000 for p in log_dir.iterdir())
    assert "GET /v1/health 200" in path.read_text() and "line 399" in path.read_text()


def test_the_access_log_never_writes_a_token_from_a_query(
    tmp_path: Path, root_logging: None
) -> None:
    path = configure_logging("info", tmp_path / "logs", stderr=False)
    assert path is not None
    access = logging.getLogger("uvicorn.access")
    line = '%s - "%s %s HTTP/%s" %d'  # uvicorn's access record
    access.info(line, "127.0.0.1:5", "GET", "/v1/events?job_id=3&token=s3cret&x=1", "1.1", 200)
    access.info(line, "127.0.0.1:5", "GET", "/v1/events?token=s3cret", "1.1", 200)
    text = path.read_text()
    assert "s3cret" not in text
    assert "/v1/events?job_id=3&token=***&x=1" in text and "/v1/events?token=***" in text


def test_logs_prints_the_tail_of_the_installed_log_or_follows_it(env: Env) -> None:
    assert env.install("linux", "--demo")[0] == 0
    code, _, err = env.aip("logs", "--platform", "linux")
    assert code == 1 and "no log yet" in err
    log = env.data / "logs" / LOG_FILE
    log.write_text("one\ntwo\nthree\n")
    code, out, _ = env.aip("logs", "--platform", "linux", "-n", "2")
    assert code == 0 and out == "two\nthree\n"
    assert env.aip("logs", "--platform", "linux", "-f", "-n", "5")[0] == 0
    assert env.calls()[-1] == ["tail", "-n", "5", "-F", str(log)]


def test_status_sends_the_installed_token_to_a_guarded_service(
    tmp_path: Path, serve: Callable[[Settings], RunningService]
) -> None:
    """With a token, health tells strangers only its status: status must send the token."""
    service = serve(make_settings(tmp_path, token="s3cret"))
    url = service.url
    assert deploy.health(url) == f"ok at {url}"
    assert f"ok at {url} (version {__version__}, queue 0)" == deploy.health(url, "s3cret")

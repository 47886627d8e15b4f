"""HTML to PDF through a headless Chromium found on this machine (none is downloaded): a
temporary file, a throwaway profile, no network, and errors worded for people."""

from __future__ import annotations

import contextlib
import os
import shutil
import signal
import subprocess
import tempfile
from pathlib import Path

from service.atomic import write_atomically

NAMES = ("chromium", "chromium-browser", "google-chrome", "google-chrome-stable")
HOW = (
    "install Chromium (Debian: apt-get install chromium) or set AIP_CHROMIUM to a Chromium or "
    "Chrome binary"
)


class PdfError(RuntimeError):
    """A PDF could not be made; the message says why, for people."""


def find_converter() -> str | None:
    """The browser that prints PDFs: AIP_CHROMIUM when set (a path or a name on PATH; when it
    names nothing runnable there is none, rather than some other browser), else the first of
    NAMES on PATH."""
    chosen = os.environ.get("AIP_CHROMIUM")
    if chosen:
        return shutil.which(chosen)
    for name in NAMES:
        found = shutil.which(name)
        if found:
            return found
    return None


def html_to_pdf(html: str, target: Path, *, timeout: float = 60) -> None:
    """Print `html` (a self-contained document) to the PDF file `target`, replaced whole or
    not at all. Raises PdfError when there is no converter, it fails, or it takes longer than
    `timeout` seconds."""
    browser = find_converter()
    if browser is None:
        chosen = os.environ.get("AIP_CHROMIUM")
        if chosen:
            raise PdfError(f"no PDF: AIP_CHROMIUM={chosen} is not a program that can run; {HOW}")
        raise PdfError(f"no PDF: no Chromium found; {HOW}")
    with tempfile.TemporaryDirectory(prefix="aip-pdf-") as work:
        folder = Path(work)
        page, printed, profile = folder / "report.html", folder / "report.pdf", folder / "profile"
        page.write_text(html, encoding="utf-8")
        command = [
            browser,
            "--headless",
            "--no-sandbox",
            "--disable-gpu",
            "--disable-background-networking",
            "--disable-component-update",
            "--disable-extensions",
            "--disable-sync",
            "--no-first-run",
            "--no-default-browser-check",
            "--no-pdf-header-footer",
            f"--user-data-dir={profile}",
            f"--print-to-pdf={printed}",
            page.as_uri(),
        ]
        _run(command, timeout)
        data = printed.read_bytes() if printed.is_file() else b""
        if not data.startswith(b"%PDF"):
            raise PdfError(f"no PDF: {Path(browser).name} finished without writing one")
        write_atomically(Path(target), lambda out: out.write(data))


def _run(command: list[str], timeout: float) -> None:
    """Run the browser in a process group of its own, so that on a timeout its helper
    processes (renderer, zygote) end with it."""
    name = Path(command[0]).name
    try:
        process = subprocess.Popen(
            command,
            stdin=subprocess.DEVNULL,
            stdout=subprocess.DEVNULL,
            stderr=subprocess.PIPE,
            start_new_session=True,
        )
    except OSError as error:
        raise PdfError(f"no PDF: could not start {name}: {error.strerror or error}") from None
    try:
        _, stderr = process.communicate(timeout=timeout)
    except subprocess.TimeoutExpired:
        _kill_group(process)
        raise PdfError(f"no PDF: {name} took longer than {timeout:g} s") from None
    finally:
        _kill_group(process)  # helpers left behind by a browser that exited
    if process.returncode != 0:
        said = _last_line(stderr.decode("utf-8", "replace"))
        raise PdfError(
            f"no PDF: {name} failed (exit status {process.returncode})"
            + (f": {said}" if said else "")
        )


def _kill_group(process: subprocess.Popen[bytes]) -> None:
    with contextlib.suppress(ProcessLookupError, PermissionError):
        os.killpg(process.pid, signal.SIGKILL)
    if process.returncode is None:
        process.communicate()


def _last_line(text: str) -> str:
    lines = [line.strip() for line in text.splitlines() if line.strip()]
    return lines[-1][:300] if lines else ""

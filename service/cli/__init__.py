"""The `aip` entry point: `main` only. It imports nothing at module level and the rest of the
command inside its handler, so a Ctrl-C (or a stop asked of `aip serve`) in the first instant is
one line and an exit status, never a traceback; the parser lives in `service.cli.commands`."""

import sys

INTERRUPTED = 130  # the shell's status for a command stopped by Ctrl-C


class StopRequested(BaseException):
    """SIGTERM or SIGINT arrived while `aip serve` was starting, before uvicorn took over."""


stops_requested: list[str] = []  # kept too: a library may swallow the exception (see serve.py)


def stop_during_startup() -> None:
    """Until uvicorn runs, SIGTERM or SIGINT ends `aip serve` at once: the service manager (or
    the user) asked for a stop, which is a clean exit (status 0), whenever it comes."""
    import signal

    def stop(signum: int, frame: object) -> None:
        stops_requested.append(signal.Signals(signum).name)
        raise StopRequested(stops_requested[-1])

    for stop_signal in (signal.SIGTERM, signal.SIGINT):
        signal.signal(stop_signal, stop)


def main(argv: list[str] | None = None) -> int:
    serving = False
    try:
        args = sys.argv[1:] if argv is None else argv
        # Top-level options take no value, so the first other word is the command.
        serving = next((a for a in args if not a.startswith("-")), None) in ("serve", "worker")
        if serving:
            stop_during_startup()
        from service.cli.commands import run

        return run(args)
    except (KeyboardInterrupt, StopRequested) as stop:
        if serving:
            name = str(stop) or "SIGINT"  # Python's own handler, before ours was set
            print(f"aip: stopped ({name}) before the service started", file=sys.stderr)
            return 0
        print(file=sys.stderr)  # end the line the ^C was echoed on
        return INTERRUPTED
    finally:
        import signal

        if serving:  # the usual handlers again, for a caller in the same process (tests)
            signal.signal(signal.SIGINT, signal.default_int_handler)
            signal.signal(signal.SIGTERM, signal.SIG_DFL)
        if argv is None:
            # The process ends now: a late Ctrl-C has nothing left to stop, and would only
            # print a traceback from the interpreter's exit handlers.
            signal.signal(signal.SIGINT, signal.SIG_IGN)

"""The command-line boundary: an expected error becomes one line that names what to fix, and an exit code.

    def cli(argv=None) -> int:                       # what `python -m pkg.tool` runs
        return run_cli(main, argv, prog="python -m pkg.tool")

Exit codes: 0 done; 1 a runtime error (damaged data or checkpoint, a full disk, a failed rank); 2 a usage
error (bad arguments or config: a missing file, an unwritable folder, an impossible value). Argparse's own
errors also exit 2. An expected error prints `<prog>: error: <message>` and no traceback; `--debug` (or
DIVAE_DEBUG=1) adds the traceback, and `traceback_file` keeps it in a file. Anything else is a bug: its
traceback is always printed.

Usage errors are `ConfigError`s (`UsageError` is the name for command-line arguments); runtime errors are
OSError and the packages' own error classes, passed as `runtime`.
"""

from __future__ import annotations

import argparse
import os
import socket
import sys
import traceback
from collections.abc import Callable, Sequence
from pathlib import Path
from typing import Any

from divae.utils.config import ConfigError

EXIT_OK, EXIT_ERROR, EXIT_USAGE = 0, 1, 2


class UsageError(ConfigError):
    """A command-line argument that cannot work (exit 2); the message names the argument and the fix."""


def debug_requested(argv: Sequence[str] | None) -> bool:
    """True with `--debug` in argv (default sys.argv) or DIVAE_DEBUG=1 in the environment."""
    args = sys.argv[1:] if argv is None else argv
    return "--debug" in args or os.environ.get("DIVAE_DEBUG", "") == "1"


def one_line(e: BaseException) -> str:
    """The first line of an exception's message; an OSError as `<strerror>: <file>`."""
    if isinstance(e, OSError) and e.strerror and e.filename:
        return f"{e.strerror}: {e.filename}"
    text = str(e).strip() or type(e).__name__
    return text.splitlines()[0]


def exit_code(e: BaseException, runtime: tuple[type[BaseException], ...] = ()) -> int | None:
    """EXIT_USAGE for a usage error, EXIT_ERROR for an expected runtime error, None for anything else (a bug)."""
    if isinstance(e, ConfigError):
        return EXIT_USAGE
    if isinstance(e, (OSError, *runtime)):
        return EXIT_ERROR
    return None


def report(e: BaseException, prog: str, *, debug: bool = False, runtime: tuple[type[BaseException], ...] = (),
           emit: Callable[[str], Any] | None = None, traceback_file: str | os.PathLike | None = None) -> int:
    """Print the one-line report of `e` (with the traceback when `debug` or when `e` is unexpected) through
    `emit` (default: stderr); append the traceback to `traceback_file` when given. Returns the exit code."""
    emit = emit or (lambda line: print(line, file=sys.stderr, flush=True))
    code = exit_code(e, runtime)
    tb = "".join(traceback.format_exception(type(e), e, e.__traceback__))
    saved = None
    if traceback_file is not None:
        try:
            with open(traceback_file, "a") as f:
                f.write(tb + "\n")
            saved = str(traceback_file)
        except OSError:
            pass
    if code is None or debug:
        emit(tb.rstrip())
    if code is None:
        return EXIT_ERROR
    hint = ""
    if not debug and code != EXIT_USAGE:
        hint = f" (traceback in {saved})" if saved else " (--debug for the traceback)"
    emit(f"{prog}: error: {one_line(e)}{hint}")
    return code


def rank_emit(line: str) -> None:
    """Print `line` to stderr, prefixed with `[rank r] ` under a multi-process launcher (WORLD_SIZE > 1)."""
    multi = os.environ.get("WORLD_SIZE", "1").isdigit() and int(os.environ.get("WORLD_SIZE", "1")) > 1
    print(f"[rank {os.environ.get('RANK', '?')}] {line}" if multi else line, file=sys.stderr, flush=True)


def run_cli(main: Callable[[list[str]], Any], argv: Sequence[str] | None = None, *, prog: str,
            runtime: tuple[type[BaseException], ...] = (), emit: Callable[[str], Any] | None = None) -> int:
    """Run `main(argv)` at the CLI boundary: its int result (else 0), or the exit code of what it raised."""
    args = list(sys.argv[1:] if argv is None else argv)
    try:
        out = main(args)
    except Exception as e:  # noqa: BLE001 - the boundary: expected errors become one line, bugs keep tracebacks
        return report(e, prog, debug=debug_requested(args), runtime=runtime, emit=emit)
    return out if isinstance(out, int) and not isinstance(out, bool) else EXIT_OK


def path_arg(value: str | os.PathLike, flag: str, *, kind: str = "file") -> Path:
    """`value` as a Path that exists as a `kind` ("file" or "dir"); a UsageError naming `flag` otherwise."""
    p = Path(value)
    if not p.exists():
        raise UsageError(f"{flag} {p}: no such {'file' if kind == 'file' else 'folder'}")
    if kind == "file" and not p.is_file():
        raise UsageError(f"{flag} {p} is a folder, not a file")
    if kind == "dir" and not p.is_dir():
        raise UsageError(f"{flag} {p} is a file, not a folder")
    return p


def writable_dir(value: str | os.PathLike, flag: str) -> Path:
    """Create folder `value` if needed and check that a file can be written in it; a UsageError naming `flag`."""
    p = Path(value)
    if p.exists() and not p.is_dir():
        raise UsageError(f"{flag} {p} is a file; give a folder")
    try:
        p.mkdir(parents=True, exist_ok=True)
        probe = p / f".write_test_{socket.gethostname()}_{os.getpid()}"
        probe.write_bytes(b"")
        probe.unlink()
    except OSError as e:
        raise UsageError(f"{flag} {p} is not writable ({e.strerror or e}); choose a folder you can write to") from None
    return p


def int_at_least(low: int) -> Callable[[str], int]:
    """An argparse `type`: an integer >= `low`, else a clear usage error."""
    def parse(text: str) -> int:
        try:
            v = int(text)
        except ValueError:
            raise argparse.ArgumentTypeError(f"expected an integer, got {text!r}") from None
        if v < low:
            raise argparse.ArgumentTypeError(f"must be >= {low}, got {v}")
        return v
    return parse


def minutes(text: str) -> float:
    """An argparse `type`: a number of minutes >= 0."""
    try:
        v = float(text)
    except ValueError:
        raise argparse.ArgumentTypeError(f"expected a number of minutes, got {text!r}") from None
    if not 0 <= v < 1e6:
        raise argparse.ArgumentTypeError(f"must be >= 0 minutes, got {v}")
    return v

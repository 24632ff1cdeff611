"""dipcohort: untrained-network reconstruction (DIP, aSeqDIP, ...) over cohorts of scans.

One module per subcommand under `dipcohort.commands`.

Each command module defines `register(subparsers)` (adds its parser, sets `func`) and its
`func(args) -> int`. One handler here turns what goes wrong into exit codes: a user's mistake
(bad argument, manifest, path, permission, full or read-only disk, unreadable file) is one line
naming the file or flag and exit code 2; anything else is one line plus the path of a log file
holding the traceback, exit code 1; Ctrl-C / SIGTERM end with 130 / 143; a closed pipe
(`dipcohort status STORE | head -3`) ends quietly.
"""
from __future__ import annotations

import argparse
import datetime as _dt
import errno
import importlib
import os
import sys
import tempfile
import traceback
from pathlib import Path

from pipeline.errors import Interrupted, UsageError

COMMANDS = ("recon", "run", "status", "verify", "aggregate", "report", "export", "tune", "demo")

# OSErrors that mean "the user's file system or path", not a bug: exit 2 with the file named
USER_ERRNOS = {
    errno.ENOENT: "no such file or directory", errno.EACCES: "permission denied", errno.EPERM: "not permitted",
    errno.ENOSPC: "no space left on the device", errno.EROFS: "read-only file system",
    errno.EDQUOT: "disk quota exceeded", errno.EISDIR: "is a directory", errno.ENOTDIR: "not a directory",
    errno.EEXIST: "already exists", errno.ENAMETOOLONG: "file name too long", errno.ENOTEMPTY: "not empty",
}


def build_parser() -> argparse.ArgumentParser:
    parser = argparse.ArgumentParser(prog="dipcohort", description=__doc__.splitlines()[0])
    sub = parser.add_subparsers(dest="command", required=True)
    for name in COMMANDS:
        try:
            module = importlib.import_module(f"dipcohort.commands.{name}")
        except ModuleNotFoundError as err:
            if err.name == f"dipcohort.commands.{name}":
                continue  # command not built yet
            raise
        module.register(sub)
    return parser


def main(argv: list[str] | None = None) -> int:
    parser = build_parser()
    args = parser.parse_args(argv)
    prog = f"dipcohort {args.command}"
    try:
        code = int(args.func(args) or 0)
        sys.stdout.flush()  # here, so that a closed pipe is caught below, not at interpreter exit
        return code
    except UsageError as err:
        return _say(prog, str(err))
    except OSError as err:
        if isinstance(err, BrokenPipeError):
            return _quiet_pipe()
        if err.errno in USER_ERRNOS:
            return _say(prog, os_error_message(err))
        return _unexpected(prog, err)
    except MemoryError:
        return _say(prog, "out of memory; use smaller images (--size) or fewer jobs at once (--workers)")
    except Interrupted as stop:
        return 128 + stop.signum
    except KeyboardInterrupt:
        print(f"\n{prog}: interrupted", file=sys.stderr)
        return 130
    except Exception as err:  # noqa: BLE001 - the one place that turns a bug into a log file
        return _unexpected(prog, err)


def os_error_message(err: OSError) -> str:
    """'PATH: what went wrong' for an OSError, naming the file(s) involved."""
    what = USER_ERRNOS.get(err.errno, err.strerror or str(err))
    files = [f for f in (err.filename, err.filename2) if f]
    if not files:
        return f"{what} ({err})"
    hint = {errno.ENOSPC: "; free some space or write to another --out (what was done is kept)",
            errno.EROFS: "; choose a writable --out", errno.EACCES: "; check its permissions or choose another path",
            errno.EDQUOT: "; free some space or write to another --out"}.get(err.errno, "")
    return f"{' -> '.join(str(f) for f in files)}: {what}{hint}"


def _say(prog: str, message: str) -> int:
    try:
        print(f"{prog}: error: {message}", file=sys.stderr)
    except BrokenPipeError:
        pass
    return 2


def _quiet_pipe() -> int:
    """The reader went away (`| head`): stop writing, say nothing (Python's documented recipe)."""
    try:
        devnull = os.open(os.devnull, os.O_WRONLY)
        os.dup2(devnull, sys.stdout.fileno())
    except (OSError, ValueError):
        pass
    return 0


def _unexpected(prog: str, err: BaseException) -> int:
    """A bug or an environment problem we did not foresee: one line, the traceback in a log file."""
    text = "".join(traceback.format_exception(type(err), err, err.__traceback__))
    stamp = _dt.datetime.now().strftime("%Y%m%d-%H%M%S")
    where = None
    for folder in (Path(tempfile.gettempdir()), Path.cwd()):
        try:
            path = folder / f"dipcohort-error-{stamp}-{os.getpid()}.log"
            path.write_text(f"{prog} {' '.join(sys.argv[1:])}\n{text}")
            where = path
            break
        except OSError:
            continue
    first = f"{type(err).__name__}: {err}".splitlines()[0]
    tail = f"; the traceback is in {where}" if where else f"\n{text}"
    print(f"{prog}: unexpected error: {first}{tail}", file=sys.stderr)
    return 1


if __name__ == "__main__":  # pragma: no cover
    sys.exit(main())

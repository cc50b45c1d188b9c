"""`trustmesh logs [NAME] [-n LINES] [-f]`: the local network's process logs (HOME/logs/NAME.log).

Without NAME: the last lines of every process's log, each line prefixed with its process; with
-f, new lines as they are written, from every log (or NAME's) until Ctrl-C. A log that is
truncated or replaced (a restart that starts it anew) is followed from its new start.
"""

from __future__ import annotations

import argparse
import os
import pathlib
import sys
import time
from typing import TextIO

from trustmesh.endpoints import home_dir

POLL = 0.2  # seconds between looks at the logs when following
TAIL_BLOCK = 64 * 1024


class LogsError(Exception):
    """No such log, or no local network; the message says what there is."""


def log_files(home: pathlib.Path) -> dict[str, pathlib.Path]:
    folder = home / "logs"
    if not folder.is_dir():
        raise LogsError(f"no local network logs in {folder}; `trustmesh up` starts a network there (or give --home "
                        f"/ TRUSTMESH_HOME)")
    return {p.name[:-len(".log")]: p for p in sorted(folder.glob("*.log"), key=lambda p: _natural(p.name))}


def _natural(name: str) -> tuple:
    stem = name.removesuffix(".log")
    head, _, tail = stem.rpartition("-")
    return (head, int(tail)) if tail.isdigit() else (stem, 0)


def tail(path: pathlib.Path, lines: int) -> tuple[list[str], int]:
    """The last `lines` lines of `path` and the offset where the file ended."""
    try:
        with open(path, "rb") as handle:
            handle.seek(0, os.SEEK_END)
            end = handle.tell()
            if lines <= 0:
                return [], end
            data, position = b"", end
            while position > 0 and data.count(b"\n") <= lines:
                step = min(TAIL_BLOCK, position)
                position -= step
                handle.seek(position)
                data = handle.read(step) + data
    except FileNotFoundError:
        return [], 0
    text = data.decode("utf-8", "replace").splitlines()
    return text[-lines:], end


class _Follower:
    def __init__(self, name: str, path: pathlib.Path, offset: int):
        self.name, self.path, self.offset = name, path, offset
        self.partial = b""
        self.identity = _identity(path)

    def read(self) -> list[str]:
        identity = _identity(self.path)
        try:
            size = self.path.stat().st_size
        except FileNotFoundError:
            return []
        if identity != self.identity or size < self.offset:  # replaced or truncated: from its start
            self.identity, self.offset, self.partial = identity, 0, b""
        if size == self.offset:
            return []
        with open(self.path, "rb") as handle:
            handle.seek(self.offset)
            data = handle.read(size - self.offset)
        self.offset += len(data)
        data = self.partial + data
        *complete, self.partial = data.split(b"\n")
        return [line.decode("utf-8", "replace") for line in complete]


def _identity(path: pathlib.Path):
    try:
        info = path.stat()
    except FileNotFoundError:
        return None
    return info.st_dev, info.st_ino


def show(home: pathlib.Path, name: str | None, *, lines: int, follow: bool, out: TextIO | None = None,
         until=None) -> None:
    """Print the logs; with follow, keep printing until interrupted (or until() says so, for tests)."""
    out = out or sys.stdout
    files = log_files(home)
    if name is not None:
        if name not in files:
            raise LogsError(f"no log named {name!r} in {home / 'logs'} (there: {', '.join(files) or 'none'})")
        files = {name: files[name]}
    elif not files:
        raise LogsError(f"{home / 'logs'} holds no log yet")
    prefix = name is None
    width = max(len(n) for n in files)
    followers = []
    for log_name, path in files.items():
        last, end = tail(path, lines)
        for line in last:
            out.write(f"{log_name:<{width}} | {line}\n" if prefix else line + "\n")
        followers.append(_Follower(log_name, path, end))
    out.flush()
    while follow and not (until and until()):
        wrote = False
        for follower in followers:
            for line in follower.read():
                out.write(f"{follower.name:<{width}} | {line}\n" if prefix else line + "\n")
                wrote = True
        if name is None:  # a process started since (a new node): follow it too
            for log_name, path in log_files(home).items():
                if log_name not in {f.name for f in followers}:
                    followers.append(_Follower(log_name, path, 0))
                    width = max(width, len(log_name))
        if wrote:
            out.flush()
        time.sleep(POLL)


def run_logs(args: argparse.Namespace) -> int:
    try:
        show(home_dir(args.home), args.name, lines=args.lines, follow=args.follow)
    except LogsError as exc:
        print(f"trustmesh logs: {exc}", file=sys.stderr)
        return 2
    except KeyboardInterrupt:
        return 0
    except BrokenPipeError:  # `trustmesh logs | head`
        sys.stderr.close()
        return 0
    return 0


def _lines(text: str) -> int:
    if not text.isdigit():
        raise argparse.ArgumentTypeError(f"expected a number of lines, got {text!r}")
    return int(text)


def register(subparsers) -> argparse.ArgumentParser:
    parser = subparsers.add_parser("logs", help="the local network's process logs (HOME/logs), -f to follow")
    parser.add_argument("name", nargs="?", metavar="NAME",
                        help="one process (validator, processors, redis, couchdb, dashboard, compute-1, iot-3, "
                             "supervisor, …); default: all of them, each line prefixed with its process")
    parser.add_argument("-n", "--lines", type=_lines, default=20, metavar="N",
                        help="last lines of each log to show first (default %(default)s)")
    parser.add_argument("-f", "--follow", action="store_true", help="keep printing new lines until Ctrl-C")
    parser.set_defaults(func=run_logs)
    return parser

"""Files that readers find whole or not at all (write_whole).

The bytes go to a temporary file of the writer's own beside the target, and only then take the
target's name: renamed over it, or, when a file must never be replaced (a key), hard-linked to it,
which fails if the name is taken. So a process reading the file meanwhile (another command of the
same home starting at the same moment, a restarted node) never sees an empty or half-written one,
and two writers never share a temporary.
"""

from __future__ import annotations

import errno
import os
import pathlib
import secrets

# A file system without hard links (some mounted into containers) says so with one of these.
_NO_HARD_LINKS = {errno.EPERM, errno.ENOTSUP, errno.EOPNOTSUPP, errno.ENOSYS}


def write_whole(path: os.PathLike | str, data: bytes | str, *, mode: int = 0o600, exclusive: bool = False,
                durable: bool = True) -> bool:
    """Put `data` under `path` with `mode` (whatever the umask); the folder must exist.

    exclusive: only if nothing is there yet; returns False, writing nothing, if something is (the
    first writer wins, and its file is the one every later reader gets). durable: synced to disk,
    the new name too, before this returns. Returns True once `path` holds `data`."""
    path = pathlib.Path(path)
    if isinstance(data, str):
        data = data.encode()
    temporary = path.with_name(f".{path.name}.{os.getpid()}.{secrets.token_hex(4)}.tmp")
    fd = os.open(temporary, os.O_WRONLY | os.O_CREAT | os.O_EXCL, mode)
    try:
        _fill(fd, data, mode, durable)
        if exclusive:
            try:
                os.link(temporary, path)
            except FileExistsError:
                return False
            except OSError as exc:
                if exc.errno not in _NO_HARD_LINKS:
                    raise
                if not _create_exclusive(path, data, mode, durable):
                    return False
        else:
            os.replace(temporary, path)
    finally:
        temporary.unlink(missing_ok=True)
    if durable:
        folder = os.open(path.parent, os.O_RDONLY)
        try:
            os.fsync(folder)
        finally:
            os.close(folder)
    return True


def _create_exclusive(path: pathlib.Path, data: bytes, mode: int, durable: bool) -> bool:
    """The exclusive write where hard links cannot be made: created in place with O_EXCL (still
    never a replaced file, though a reader could then see it before its bytes are all there)."""
    try:
        fd = os.open(path, os.O_WRONLY | os.O_CREAT | os.O_EXCL, mode)
    except FileExistsError:
        return False
    _fill(fd, data, mode, durable)
    return True


def _fill(fd: int, data: bytes, mode: int, durable: bool) -> None:
    """Write all of data to a new file's fd with mode (whatever the umask), synced if durable; closes it."""
    try:
        os.fchmod(fd, mode)
        unwritten = memoryview(data)
        while unwritten:
            unwritten = unwritten[os.write(fd, unwritten):]
        if durable:
            os.fsync(fd)
    finally:
        os.close(fd)

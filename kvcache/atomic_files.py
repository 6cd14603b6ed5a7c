"""Files written atomically, and the temporaries of writers that died.

A file is written to a temporary beside it, flushed and fsynced, renamed
over the target and the directory fsynced: a crash at any point leaves the
old file or the new one.  A writer killed before its rename (SIGKILL, power
loss, an out-of-memory kill) leaves its temporary behind; in a crash-looping
server those pile up until the disk is full.  So every temporary is named
after its writer, ``.<target>.<host>.<pid>.<random>.tmp``, and each writer
first removes the temporaries of its target left by processes of this host
that no longer run.  A live writer's temporary is never touched (its process
still runs), nor one written from another host sharing the directory (its
process cannot be checked from here).
"""

from __future__ import annotations

import os
import re
import socket
import tempfile

__all__ = ["write_atomically", "clear_dead_temporaries"]

_HOST = re.sub(r"[^A-Za-z0-9_-]", "_", socket.gethostname()) or "host"


def _alive(pid: int) -> bool:
    """Whether process `pid` runs on this host (a zombie counts as running:
    its parent has not collected it yet, so it may be a writer's)."""
    if pid <= 0:
        return False
    try:
        os.kill(pid, 0)
    except ProcessLookupError:
        return False
    except PermissionError:             # another user's process: it runs
        return True
    return True


def clear_dead_temporaries(path) -> list[str]:
    """Remove the temporaries that writers of ``path`` on this host left when
    they died; returns the paths removed.  Safe against other writers: a
    temporary of a running process, or of another host, stays."""
    path = os.fspath(path)
    directory = os.path.dirname(os.path.abspath(path))
    pattern = re.compile(rf"\.{re.escape(os.path.basename(path))}\.{re.escape(_HOST)}"
                         rf"\.(\d+)\.[^.]+\.tmp")
    removed = []
    try:
        names = os.listdir(directory)
    except OSError:
        return removed
    for name in names:
        m = pattern.fullmatch(name)
        if m is None or _alive(int(m.group(1))):
            continue
        try:
            os.unlink(os.path.join(directory, name))
            removed.append(os.path.join(directory, name))
        except FileNotFoundError:       # another writer removed it first
            pass
    return removed


def write_atomically(path, parts) -> None:
    """Write the byte strings ``parts`` to ``path``: to a temporary beside it,
    flushed and fsynced, then renamed over ``path``, and the directory
    fsynced.  A new file is readable by its owner only (it may hold a
    conversation's state); a replaced file keeps its permissions."""
    path = os.fspath(path)
    directory = os.path.dirname(os.path.abspath(path))
    clear_dead_temporaries(path)
    fd, tmp = tempfile.mkstemp(prefix=f".{os.path.basename(path)}.{_HOST}.{os.getpid()}.",
                               suffix=".tmp", dir=directory)
    try:
        try:
            os.chmod(fd, os.stat(path).st_mode & 0o7777)
        except FileNotFoundError:
            pass
        with os.fdopen(fd, "wb") as f:
            for part in parts:
                f.write(part)
            f.flush()
            os.fsync(f.fileno())
        os.replace(tmp, path)
    except BaseException:
        try:
            os.unlink(tmp)
        except FileNotFoundError:
            pass
        raise
    _fsync_dir(directory)


def _fsync_dir(directory: str) -> None:
    # The rename itself is durable only once the directory is synced.
    try:
        dfd = os.open(directory, os.O_RDONLY)
    except OSError:                                 # pragma: no cover - e.g. Windows
        return
    try:
        os.fsync(dfd)
    except OSError:                                 # pragma: no cover - some filesystems
        pass
    finally:
        os.close(dfd)

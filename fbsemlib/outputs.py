"""Where the commands write: one rule for output folders, one writer per folder, atomic files.

* :func:`check_output_folder`: a command writes only into a folder that is new, empty, or
  holds only files of its own kind (a dataset, a training run, an evaluation); anything
  else is refused with a message naming what was found. Whether an own-kind folder is
  *compatible* (same recipe, same configuration) is for the caller to say.
* :class:`FolderLock`: an exclusive ``flock`` on ``<folder>/.lock`` that holds the owner's
  pid. The kernel releases it when the process ends, however it ends, so a killed run
  never leaves its folder locked.
* :func:`atomic_write_bytes` (``_text``, ``_json``, :func:`atomic_write`): temporary file
  in the destination folder, ``fsync``, ``os.replace``, ``fsync`` of the folder. A reader
  sees the old complete file or the new one; a failure (full disk, read-only file system,
  a crash) leaves the old file as it was and removes the temporary one. Files get the
  permissions of the user's umask (``mkstemp`` alone would give 0600).
* :func:`write_error`: the one-line :class:`~fbsemlib.errors.UserError` for a write that
  failed because of the file system (no space, read-only, permissions).
"""

from __future__ import annotations

import errno
import fnmatch
import json
import os
import tempfile
from pathlib import Path
from typing import Any, Callable, Iterable

from fbsemlib.errors import UserError
from fbsemlib.provenance import json_default

__all__ = ["check_output_folder", "FolderLock", "LOCK_NAME", "atomic_write", "atomic_write_bytes",
           "atomic_write_text", "atomic_write_json", "write_error", "ensure_writable", "DISK_ERRNOS", "umask"]

LOCK_NAME = ".lock"
#: temporary files of :func:`atomic_write` (left behind only by a hard kill; no reader opens them)
TEMP_PATTERN = ".*.tmp-*"
#: file-system errors that are the user's to fix, not bugs
DISK_ERRNOS = {errno.ENOSPC: "no space left on the device", errno.EDQUOT: "disk quota exceeded",
               errno.EROFS: "read-only file system", errno.EACCES: "permission denied",
               errno.EPERM: "operation not permitted", errno.EISDIR: "is a folder",
               errno.ENOTDIR: "a parent is not a folder"}


def write_error(e: OSError, what: str) -> UserError:
    """``UserError`` "cannot write <what>: <reason>" for a file-system error (``DISK_ERRNOS``);
    other errors are returned unchanged as a generic one-line message too."""
    reason = DISK_ERRNOS.get(e.errno or -1) or (e.strerror or str(e))
    return UserError(f"cannot write {what}: {reason}; nothing that existed before was changed")


# ----------------------------------------------------------------------------------------
# the output-folder rule
# ----------------------------------------------------------------------------------------
def _matches(name: str, patterns: Iterable[str]) -> bool:
    return any(fnmatch.fnmatchcase(name, p) for p in patterns)


def check_output_folder(path: str | os.PathLike, kind: str, own: Iterable[str], option: str = "--out") -> str:
    """Apply the output-folder rule to ``path`` for a command that writes a ``kind``
    (``"dataset"``, ``"training run"``, ``"evaluation"``) whose files match the glob
    patterns ``own``. Returns ``"new"`` (absent), ``"empty"`` or ``"own"`` (only files of
    its kind); raises :class:`UserError` for a file, or a folder holding anything else."""
    p = Path(path)
    if not p.exists():
        if p.is_symlink():
            raise UserError(f"{option} {str(p)!r} is a broken symbolic link")
        return "new"
    if not p.is_dir():
        raise UserError(f"{option} {str(p)!r} exists and is not a folder; give a folder for the {kind}")
    try:
        names = sorted(e.name for e in p.iterdir())
    except OSError as e:
        raise UserError(f"cannot read the output folder {str(p)!r}: {e.strerror or e}") from None
    if not names:
        return "empty"
    own = tuple(own) + (LOCK_NAME, TEMP_PATTERN)
    foreign = [n for n in names if not _matches(n, own)]
    if foreign:
        shown = ", ".join(repr(n) for n in foreign[:5]) + (f" and {len(foreign) - 5} more" if len(foreign) > 5 else "")
        raise UserError(f"output folder {str(p)!r} is not empty and is not a {kind} (it holds {shown}): refusing "
                        f"to write there; choose another {option}")
    return "own"


def ensure_writable(folder: str | os.PathLike, what: str) -> Path:
    """Create ``folder`` and check that a file can be created in it, before any work is done;
    :class:`UserError` (:func:`write_error`) when it cannot."""
    p = Path(folder)
    try:
        p.mkdir(parents=True, exist_ok=True)
        fd, probe = tempfile.mkstemp(prefix=".probe.tmp-", dir=str(p))
        os.close(fd)
        os.unlink(probe)
    except OSError as e:
        raise write_error(e, f"{what} {str(p)!r}") from None
    return p


class FolderLock:
    """Exclusive lock of ``folder`` for one writing process (``with FolderLock(dir, what):``).

    A second process is refused with :class:`UserError` naming the owner's pid. The lock is
    an ``flock`` on ``folder/.lock``: the kernel drops it when the owner exits or is killed."""

    def __init__(self, folder: str | os.PathLike, what: str = "folder"):
        self.folder = Path(folder)
        self.what = what
        self._fd: int | None = None

    def acquire(self) -> "FolderLock":
        import fcntl

        self.folder.mkdir(parents=True, exist_ok=True)
        path = self.folder / LOCK_NAME
        fd = os.open(str(path), os.O_RDWR | os.O_CREAT, 0o666)
        try:
            fcntl.flock(fd, fcntl.LOCK_EX | fcntl.LOCK_NB)
        except BlockingIOError:
            owner = os.pread(fd, 64, 0).decode("ascii", "replace").strip() or "?"
            os.close(fd)
            raise UserError(f"{self.what} {str(self.folder)!r} is in use by another process (pid {owner}); "
                            "wait for it to finish or choose another --out") from None
        except BaseException:
            os.close(fd)
            raise
        os.ftruncate(fd, 0)
        os.pwrite(fd, f"{os.getpid()}\n".encode(), 0)
        self._fd = fd
        return self

    def release(self) -> None:
        if self._fd is not None:
            os.close(self._fd)  # closing drops the flock
            self._fd = None

    def __enter__(self) -> "FolderLock":
        return self.acquire()

    def __exit__(self, *exc) -> None:
        self.release()


# ----------------------------------------------------------------------------------------
# atomic files
# ----------------------------------------------------------------------------------------
def umask() -> int:
    """The process's umask (read without changing it for longer than the call)."""
    m = os.umask(0o022)
    os.umask(m)
    return m


def _fsync_dir(folder: Path) -> None:
    try:
        fd = os.open(str(folder), os.O_RDONLY)
    except OSError:  # pragma: no cover - e.g. Windows
        return
    try:
        os.fsync(fd)
    except OSError:  # pragma: no cover
        pass
    finally:
        os.close(fd)


def atomic_write(path: str | os.PathLike, write: Callable[[Any], Any]) -> Path:
    """Call ``write(binary file object)`` on a temporary file next to ``path``, give it the
    umask's permissions, fsync, replace ``path`` (see the module docstring)."""
    path = Path(path)
    path.parent.mkdir(parents=True, exist_ok=True)
    fd, tmp = tempfile.mkstemp(prefix=f".{path.name}.tmp-", dir=str(path.parent))
    try:
        os.fchmod(fd, 0o666 & ~umask())
        with os.fdopen(fd, "wb") as f:
            write(f)
            f.flush()
            os.fsync(f.fileno())
        os.replace(tmp, path)
    except BaseException:
        try:
            os.unlink(tmp)
        except OSError:
            pass
        raise
    _fsync_dir(path.parent)
    return path


def atomic_write_bytes(path: str | os.PathLike, data: bytes) -> Path:
    return atomic_write(path, lambda f: f.write(data))


def atomic_write_text(path: str | os.PathLike, text: str) -> Path:
    return atomic_write_bytes(path, text.encode("utf-8"))


def atomic_write_json(path: str | os.PathLike, obj: Any) -> Path:
    return atomic_write_text(path, json.dumps(obj, indent=2, default=json_default) + "\n")

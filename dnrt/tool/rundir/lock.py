"""dnrt.lock: one owner per run folder. A run holds an exclusive `fcntl.flock` on the file for as long as it lives;
the kernel drops it when the process ends however it ends, so a dead run never blocks (the file stays, the lock does
not). The holder writes its host, PID and start time into the file, which a refused process quotes.

flock is honoured across machines on NFSv4 (Linux maps it to a POSIX byte-range lock there), on Lustre mounted with
`-o flock`, and on GPFS/BeeGFS; on Lustre with `localflock` (or NFSv3 without lockd) it only excludes processes on
the same host, and on Lustre with `noflock` it fails, which refuses the run with the reason."""
from __future__ import annotations

import fcntl
import json
import os
import socket
import time
from pathlib import Path
from typing import Any, Optional

from dnrt.errors import DNRTError
from dnrt.tool.rundir.files import LOCK, file_mode, fsync_folder


_HELD: set[int] = set()  # this process's lock descriptors


def _forget_in_child() -> None:
    """A forked child (a data-loader worker) drops its copies of the lock descriptors: closing a copy leaves the
    parent's lock alone, and a child outliving its parent then cannot keep the folder locked."""
    for fd in _HELD:
        try:
            os.close(fd)
        except OSError:
            pass
    _HELD.clear()


os.register_at_fork(after_in_child=_forget_in_child)


class RunLock:
    """The exclusive lock of one run folder, held from `acquire` to `release` (or the process's end)."""

    def __init__(self, folder: str | os.PathLike) -> None:
        self.path = Path(folder) / LOCK
        self.fd: Optional[int] = None

    def acquire(self) -> "RunLock":
        """Take the lock or refuse in one line naming the holder; write this process into the file."""
        created = not self.path.exists()
        fd = self._locked()
        while fd is None:  # the file was unlinked between our open and our lock (a folder given up): lock the new one
            fd = self._locked()
        info = {"host": socket.gethostname(), "pid": os.getpid(),
                "started": time.strftime("%Y-%m-%d %H:%M:%S %Z", time.localtime())}
        os.ftruncate(fd, 0)
        os.pwrite(fd, (json.dumps(info) + "\n").encode(), 0)
        os.fsync(fd)
        if created:
            fsync_folder(self.path.parent)
        self.fd = fd
        _HELD.add(fd)
        return self

    def _locked(self) -> Optional[int]:
        """A descriptor of the lock file, flocked; None when the file we locked is no longer the one at the path."""
        try:
            fd = os.open(self.path, os.O_RDWR | os.O_CREAT | os.O_CLOEXEC, file_mode())
        except OSError as e:
            raise DNRTError(f"cannot create the run folder's lock {self.path}: {e.strerror or e}") from None
        try:
            fcntl.flock(fd, fcntl.LOCK_EX | fcntl.LOCK_NB)
        except OSError as e:
            os.close(fd)
            if e.errno in (11, 13):  # EAGAIN/EWOULDBLOCK (EACCES on some file systems): another process holds it
                raise DNRTError(f"{self.path.parent} is in use by another run ({holder(self.path)}); wait for it to "
                                f"end, or choose another output_dir") from None
            raise DNRTError(f"cannot lock {self.path}: {e.strerror or e} (the file system refuses flock; for "
                            f"Lustre mount with -o flock)") from None
        try:
            same = os.stat(self.path).st_ino == os.fstat(fd).st_ino
        except FileNotFoundError:
            same = False
        if not same:
            os.close(fd)
            return None
        return fd

    def discard_folder(self) -> None:
        """Remove the lock file and its folder when the lock is all the folder holds (a run that stopped before
        writing anything leaves no folder behind); called while holding the lock."""
        folder = self.path.parent
        if self.fd is not None and [p.name for p in folder.iterdir()] == [LOCK]:
            self.path.unlink()
            folder.rmdir()

    def release(self) -> None:
        if self.fd is not None:
            _HELD.discard(self.fd)
            os.close(self.fd)  # closing the last descriptor drops the flock
            self.fd = None

    def __enter__(self) -> "RunLock":
        return self.acquire()

    def __exit__(self, *exc: Any) -> None:
        self.release()


def holder(path: Path) -> str:
    """`host H, PID P, started T` from a held lock file (its holder may still be writing it: retry for a second)."""
    for _ in range(20):
        try:
            info = json.loads(path.read_text())
            return f"host {info['host']}, PID {info['pid']}, started {info['started']}"
        except (OSError, ValueError, KeyError, TypeError):
            time.sleep(0.05)
    return "its holder is still starting"

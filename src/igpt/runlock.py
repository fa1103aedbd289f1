"""The claim on a run folder: one process writes a run, and a second one is refused at once, naming the holder.

RUN_DIR/.lock is flock-ed by the process writing the run and holds its PID and command. The kernel
drops a flock when its process dies, so a lock left by a killed run never blocks; its PID, still in
the file, counts only while that process is alive.
"""

from __future__ import annotations

import fcntl
import os
import sys
import time
import weakref
from pathlib import Path

from igpt.errors import IgptError

LOCK = ".lock"


class RunLock:
    """The exclusive flock on `folder`/.lock, held from `claim` until `release` (also on garbage collection and
    at exit)."""

    def __init__(self, folder: Path):
        self.folder = folder
        self._fd = None
        self._close = None  # finalizer closing the locked descriptor
        self._is_new = False  # no earlier run had written into the lock file

    @property
    def held(self) -> bool:
        return self._close is not None

    def claim(self) -> None:
        """Make the folder and lock it, or refuse naming the process that holds it.

        A lock file that a failed run removed after we opened it is no claim, so that case tries again.
        """
        path = self.folder / LOCK
        while True:
            try:
                self.folder.mkdir(parents=True, exist_ok=True)
                fd = os.open(path, os.O_RDWR | os.O_CREAT, 0o644)
            except OSError as err:
                raise IgptError(f"cannot write to --out {self.folder}: {err.strerror or err}") from None
            try:
                fcntl.flock(fd, fcntl.LOCK_EX | fcntl.LOCK_NB)
            except BlockingIOError:
                os.close(fd)
                raise IgptError(f"--out {self.folder} is in use by {self._holder()}; "
                                "wait for it to finish or choose another folder") from None
            try:
                if os.path.samestat(os.fstat(fd), os.stat(path)):
                    break
            except FileNotFoundError:
                pass
            os.close(fd)
        self._is_new = os.fstat(fd).st_size == 0
        self._fd, self._close = fd, weakref.finalize(self, os.close, fd)

    def sign(self) -> None:
        """Write this process's PID and command into the lock, for the message a second run gets."""
        os.ftruncate(self._fd, 0)
        os.write(self._fd, f"{os.getpid()}\n{_command()}\n".encode())

    def discard(self) -> None:
        """The run failed before writing anything: remove a lock file this claim created, and release it."""
        if self.held and self._is_new:
            (self.folder / LOCK).unlink(missing_ok=True)  # while still locked, so no other run holds this file
        self.release()

    def release(self) -> None:
        if self._close is not None:
            self._close()
            self._fd = self._close = None

    def _holder(self) -> str:
        """The process holding the lock, from the PID it writes once it has checked the folder."""
        for _ in range(20):  # the holder may still be checking the folder, before writing its PID
            try:
                pid, _, command = (self.folder / LOCK).read_text(errors="replace").partition("\n")
            except OSError:
                break
            if pid.strip().isdigit() and _alive(int(pid)):
                return f"process {pid.strip()}" + (f" ({command.strip()})" if command.strip() else "")
            time.sleep(0.05)
        return "another process"


def _alive(pid: int) -> bool:
    """Whether process `pid` exists (signal 0 asks without sending anything)."""
    if pid <= 0:
        return False
    try:
        os.kill(pid, 0)
    except ProcessLookupError:
        return False
    except PermissionError:  # alive, another user's
        pass
    return True


def _command() -> str:
    """What this process is, for the message a second run on its folder gets: `igpt train` and the like."""
    main = getattr(sys.modules.get("__main__"), "__spec__", None)
    if Path(sys.argv[0]).name == "igpt" or getattr(main, "name", None) == "igpt.cli":
        return " ".join(["igpt", *sys.argv[1:2]])
    return ""

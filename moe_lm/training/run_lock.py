"""One run per run directory: an exclusive `flock` on `<run>/.lock`, held for the whole run.

Two runs writing one directory interleave their metrics and checkpoints; the second is refused at
once instead, with the holder's pid, host and start time. The lock is the kernel's (`flock(2)`),
so it goes away with the process however it ends (kill -9 included): the file left behind by a dead
run names it but does not block. Under torchrun the job's rank 0 holds the lock for the job (the
other ranks end with it); the lock file descriptor is not inherited by child processes.
"""

from __future__ import annotations

import contextlib
import fcntl
import json
import os
import socket
import sys
import time
from pathlib import Path
from typing import Iterator, Optional

from moe_lm.errors import ConfigError, RunLockedError

LOCK_FILE = ".lock"


class RunLock:
    """The lock of one run directory; `acquire` raises RunLockedError if another run holds it."""

    def __init__(self, run_dir: Path):
        self.run_dir = Path(run_dir)
        self.path = self.run_dir / LOCK_FILE
        self._fd: Optional[int] = None

    def acquire(self) -> None:
        """Takes the lock without waiting and records this process as its holder."""
        try:
            self.run_dir.mkdir(parents=True, exist_ok=True)
            fd = os.open(self.path, os.O_RDWR | os.O_CREAT, 0o644)
        except OSError as err:
            raise ConfigError(
                f"Cannot use {self.run_dir} as the run directory ({err.strerror}): it must be a "
                "writable directory. Choose another one with hydra.run.dir=...") from None
        try:
            fcntl.flock(fd, fcntl.LOCK_EX | fcntl.LOCK_NB)
        except BlockingIOError:
            holder = _describe_holder(self.path)
            os.close(fd)
            raise RunLockedError(
                f"The run directory {self.run_dir} is in use by another run ({holder}); two runs "
                "in one directory would mix their metrics and checkpoints. Wait for that run to "
                "end (or stop it), or start this one elsewhere with hydra.run.dir=...") from None
        info = {"pid": os.getpid(), "host": socket.gethostname(), "started": time.time(),
                "argv": sys.argv}
        os.ftruncate(fd, 0)
        os.pwrite(fd, (json.dumps(info) + "\n").encode(), 0)
        self._fd = fd

    def release(self) -> None:
        """Lets the lock go (the file stays: it is the run directory's lock file)."""
        if self._fd is not None:
            fcntl.flock(self._fd, fcntl.LOCK_UN)
            os.close(self._fd)
            self._fd = None


def check_run_dir_arg(argv: list[str]) -> None:
    """Refuses a `hydra.run.dir=...` that cannot be a run directory (a file, or under a file or
    an unwritable directory) before Hydra tries to create it (which fails with a traceback)."""
    given = [a.split("=", 1)[1] for a in argv if a.lstrip("+").startswith("hydra.run.dir=")]
    if not given or "${" in given[-1]:
        return
    path = Path(given[-1]).expanduser()
    existing = path
    while not existing.exists() and existing != existing.parent:
        existing = existing.parent
    if existing.exists() and not existing.is_dir():
        what = "is a file" if existing == path else f"is under {existing}, which is a file"
    elif existing.exists() and not os.access(existing, os.W_OK | os.X_OK):
        what = f"cannot be written ({existing} is read-only for this user)"
    else:
        return
    raise ConfigError(f"hydra.run.dir={given[-1]} {what}: a run directory must be a writable "
                      "directory. Choose another path.")


def _describe_holder(path: Path) -> str:
    try:
        info = json.loads(path.read_text())
        started = time.strftime("%Y-%m-%d %H:%M:%S", time.localtime(info["started"]))
        return f"pid {info['pid']} on host {info['host']}, started {started}"
    except (OSError, ValueError, KeyError, TypeError):
        return "a process that has not yet recorded its pid"


@contextlib.contextmanager
def hold_run_lock(run_dir: Path, enabled: bool = True) -> Iterator[Optional[RunLock]]:
    """Holds the run directory's lock for the block (`enabled=False`: a rank other than 0)."""
    if not enabled:
        yield None
        return
    lock = RunLock(run_dir)
    lock.acquire()
    try:
        yield lock
    finally:
        lock.release()

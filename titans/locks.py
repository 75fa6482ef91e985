"""An advisory lock on a directory, so that two jobs never write into one workdir at once.

    with WorkdirLock(workdir, "training"):
        ...                       # a second job on the same workdir fails at once, naming the holder

The lock is `fcntl.flock` on WORKDIR/.titans.lock, whose content names the holder (host, pid, what,
since). The kernel releases a flock when its process dies, however it dies, so a lock left by a
killed job is never stale in the kernel's eyes: the next job takes it and says whose it was. Several
processes of one multi-host run share a workdir on purpose; only process 0 locks it.
"""

from __future__ import annotations

import fcntl
import json
import logging
import os
import socket
import time


class WorkdirLockedError(RuntimeError):
    """Another live job holds the workdir."""


LOCK_NAME = ".titans.lock"


class WorkdirLock:
    """A context manager holding the advisory lock of `directory` for `what` (e.g. "training")."""

    def __init__(self, directory: str, what: str, *, enabled: bool = True):
        self.directory = os.path.abspath(directory)
        self.path = os.path.join(self.directory, LOCK_NAME)
        self.what = what
        self.enabled = enabled
        self._file = None

    def _holder(self) -> dict:
        try:
            with open(self.path) as f:
                return json.loads(f.read() or "{}")
        except (OSError, ValueError):
            return {}

    def acquire(self) -> WorkdirLock:
        if not self.enabled:
            return self
        os.makedirs(self.directory, exist_ok=True)
        previous = self._holder()
        f = open(self.path, "a+")  # noqa: SIM115  (held open while locked; closed in release())
        try:
            fcntl.flock(f, fcntl.LOCK_EX | fcntl.LOCK_NB)
        except BlockingIOError:
            f.close()
            h = self._holder()
            raise WorkdirLockedError(
                f"{self.directory} is in use by another job ({h.get('what', '?')} on host {h.get('host', '?')}, "
                f"pid {h.get('pid', '?')}, since {h.get('since', '?')}). Wait for it to finish or stop it; two "
                f"jobs writing one workdir would overwrite each other's checkpoints."
            ) from None
        if previous.get("pid") and previous.get("pid") != os.getpid():
            logging.warning(
                "Took over the lock of %s from a job that is gone (%s, host %s, pid %s, since %s).",
                self.directory,
                previous.get("what"),
                previous.get("host"),
                previous.get("pid"),
                previous.get("since"),
            )
        f.seek(0)
        f.truncate()
        f.write(
            json.dumps(
                {
                    "what": self.what,
                    "host": socket.gethostname(),
                    "pid": os.getpid(),
                    "since": time.strftime("%Y-%m-%d %H:%M:%S %Z"),
                }
            )
        )
        f.flush()
        self._file = f
        return self

    def release(self) -> None:
        if self._file is None:
            return
        try:
            self._file.seek(0)
            self._file.truncate()
            fcntl.flock(self._file, fcntl.LOCK_UN)
        finally:
            self._file.close()
            self._file = None

    def __enter__(self) -> WorkdirLock:
        return self.acquire()

    def __exit__(self, *exc) -> bool:
        self.release()
        return False

"""An advisory lock on a directory, so that two jobs never write into one workdir at once.

    with WorkdirLock(workdir, "training"):
        ...                       # a second job on the same workdir fails at once, naming the holder

The lock is `fcntl.flock` on the workdir itself (a directory cannot be deleted while it holds a run),
and WORKDIR/.titans.lock names the holder (host, pid, what, since). Deleting that file therefore frees
nothing: a second job still fails, and the holder writes the file again when it checks (`check`). The
kernel releases a flock when its process dies, however it dies, so a lock left by a killed job is never
stale in the kernel's eyes: the next job takes it and says whose it was. Several processes of one
multi-host run share a workdir on purpose; only process 0 locks it.

A workdir in a bucket (gs://...) cannot be flocked: its lock is taken on a local stand-in,
~/.cache/titans/locks/<SHA-256 of the URL>, which keeps two jobs of this machine apart (the usual
TPU-VM case: worker 0 of one job) but not two machines; the holder file in the bucket names the last
holder.
"""

from __future__ import annotations

import fcntl
import hashlib
import json
import logging
import os
import socket
import time

from titans import paths


class WorkdirLockedError(RuntimeError):
    """Another live job holds the workdir."""


LOCK_NAME = ".titans.lock"


class WorkdirLock:
    """A context manager holding the advisory lock of `directory` for `what` (e.g. "training")."""

    def __init__(self, directory, what: str, *, enabled: bool = True):
        self.directory = paths.text(directory)
        self.path = paths.join(self.directory, LOCK_NAME)
        self.remote = paths.is_remote(self.directory)
        self.what = what
        self.enabled = enabled
        self._fd: int | None = None

    def _holder(self) -> dict:
        try:
            return json.loads(paths.read_text(self.path) or "{}")
        except (OSError, ValueError):
            return {}

    def _lock_target(self) -> str:
        """What is flocked: the workdir, or for a bucket a local stand-in named by the URL's hash."""
        if not self.remote:
            return self.directory
        local = os.path.expanduser("~/.cache/titans/locks")
        os.makedirs(local, exist_ok=True)
        name = os.path.join(local, hashlib.sha256(self.directory.encode()).hexdigest()[:32])
        with open(name, "a"):
            pass
        return name

    def acquire(self) -> WorkdirLock:
        if not self.enabled:
            return self
        paths.makedirs(self.directory)
        fd = os.open(self._lock_target(), os.O_RDONLY)
        try:
            fcntl.flock(fd, fcntl.LOCK_EX | fcntl.LOCK_NB)
        except BlockingIOError:
            os.close(fd)
            h = self._holder()
            raise WorkdirLockedError(
                f"{self.directory} is in use by another job ({h.get('what', '?')} on host {h.get('host', '?')}, "
                f"pid {h.get('pid', '?')}, since {h.get('since', '?')}). Wait for it to finish or stop it; two "
                f"jobs writing one workdir would overwrite each other's checkpoints."
            ) from None
        self._fd = fd
        previous = self._holder()
        if previous.get("pid") and (previous.get("pid"), previous.get("host")) != (os.getpid(), socket.gethostname()):
            logging.warning(
                "Took over the lock of %s from a job that is gone (%s, host %s, pid %s, since %s).",
                self.directory,
                previous.get("what"),
                previous.get("host"),
                previous.get("pid"),
                previous.get("since"),
            )
        self._write_holder()
        return self

    def _me(self) -> dict:
        return {"what": self.what, "host": socket.gethostname(), "pid": os.getpid()}

    def _write_holder(self) -> None:
        paths.write_text(self.path, json.dumps({**self._me(), "since": time.strftime("%Y-%m-%d %H:%M:%S %Z")}))

    def check(self) -> None:
        """Re-checks, while held, that the holder file at the path still names this job, and writes it
        again (with a warning) when someone deleted or replaced it."""
        if self._fd is None:
            return
        holder = self._holder()
        if {k: holder.get(k) for k in ("what", "host", "pid")} != self._me():
            logging.warning("%s was deleted or changed while this job held the lock; written again.", self.path)
            self._write_holder()

    def release(self) -> None:
        if self._fd is None:
            return
        try:
            if {k: self._holder().get(k) for k in ("what", "host", "pid")} == self._me():
                paths.write_text(self.path, "")
            fcntl.flock(self._fd, fcntl.LOCK_UN)
        finally:
            os.close(self._fd)
            self._fd = None

    def __enter__(self) -> WorkdirLock:
        return self.acquire()

    def __exit__(self, *exc) -> bool:
        self.release()
        return False

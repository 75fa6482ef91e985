"""Paths that may be local or remote (`gs://bucket/run`): the one way Titans names and touches a file.

    d = paths.resolve("gs://bucket/run")     # an etils epath.Path; a local path is made absolute
    paths.write_text(d / "config.json", text)  # atomic on a local disk, one upload on a bucket
    paths.sha256(d / "checkpoints/10/model/manifest.ocdbt")

Orbax and TFDS name their files with `etils.epath`, so a workdir stays an `epath.Path` from the flag to
the write. `os.path.abspath("gs://b/x")` would turn a bucket into the local directory `./gs:/b/x`: this
module is where that can no longer happen. `open()` and `os.path` are for paths known to be local.
"""

from __future__ import annotations

import hashlib
import os
import re
import time

from etils import epath

_URL = re.compile(r"^[A-Za-z][A-Za-z0-9+.-]*://")


def is_remote(path) -> bool:
    """True for a URL such as `gs://bucket/dir` (anything with a scheme), False for a local path."""
    return bool(_URL.match(os.fspath(path)))


def resolve(path) -> epath.Path:
    """`path` as an epath.Path: a URL kept as it is (trailing slashes dropped), a local path made absolute
    with `~` expanded."""
    text = os.fspath(path)
    if not text:
        raise ValueError("an empty path")
    if is_remote(text):
        return epath.Path(text.rstrip("/"))
    return epath.Path(os.path.abspath(os.path.expanduser(text)))


def text(path) -> str:
    """The canonical string of a path: a URL as it is, a local path absolute."""
    return os.fspath(resolve(path))


def join(base, *parts: str) -> str:
    """`base`/`parts` as a string, for local paths and URLs alike."""
    return os.fspath(resolve(base).joinpath(*parts))


def exists(path) -> bool:
    return resolve(path).exists()


def makedirs(path) -> epath.Path:
    p = resolve(path)
    p.mkdir(parents=True, exist_ok=True)
    return p


def read_text(path, default: str | None = None) -> str | None:
    """The file's text, or `default` when it does not exist."""
    p = resolve(path)
    if not p.exists():
        return default
    return p.read_text()


def write_text(path, content: str) -> None:
    """Writes `content` so that a reader sees the old file or the new one, never half of one
    (see `write_bytes`)."""
    write_bytes(path, content.encode())


def write_bytes(path, content: bytes) -> None:
    """Writes `content` atomically. Local: a temp file beside it, then a rename (a process killed
    mid-write leaves the previous file). Remote: one object upload, which object stores make visible
    all at once."""
    p = resolve(path)
    if is_remote(p):
        p.write_bytes(content)
        return
    tmp = p.with_name(f"{p.name}.tmp{os.getpid()}")
    try:
        tmp.write_bytes(content)
        os.replace(tmp, p)
    finally:
        if tmp.exists():
            tmp.unlink()


def append_text(path, content: str) -> None:
    """Appends to a file (a log). Object stores cannot append: the object is rewritten with the new tail."""
    p = resolve(path)
    if is_remote(p):
        p.write_text((p.read_text() if p.exists() else "") + content)
        return
    with open(p, "a") as f:
        f.write(content)


def sha256(path) -> str:
    """SHA-256 of a file's bytes, read in 1 MiB blocks."""
    h = hashlib.sha256()
    with resolve(path).open("rb") as f:
        for block in iter(lambda: f.read(1 << 20), b""):
            h.update(block)
    return h.hexdigest()


def files_under(directory) -> list[str]:
    """Every file under `directory`, by its path relative to it ("/"-separated), sorted.

    Walked with `iterdir` (epath's `walk` drops the gs:// scheme of the paths it yields)."""
    root = resolve(directory)
    out, todo = [], [(root, "")]
    while todo:
        here, prefix = todo.pop()
        for child in here.iterdir():
            rel = f"{prefix}{child.name}"
            if child.is_dir():
                todo.append((child, rel + "/"))
            else:
                out.append(rel)
    return sorted(out)


def tree_sha256(directory) -> dict[str, str]:
    """SHA-256 of every file under `directory`, by its path relative to it ("/"-separated), sorted."""
    root = resolve(directory)
    return {rel: sha256(root / rel) for rel in files_under(root)}


class AppendFile:
    """A log file that only grows (metrics.jsonl, TensorBoard events), local or remote.

    Local: an ordinary file opened for appending, flushed after each write, so a reader sees every
    line at once. Remote: object stores cannot append, so the content is kept in memory and the whole
    object is uploaded again at most every `upload_every_s` seconds, on `flush()` and on `close()`;
    what a killed process had not uploaded yet is lost (a resumed run rewrites it from its checkpoint).
    """

    def __init__(self, path, *, binary: bool = False, upload_every_s: float = 30.0):
        self.path = resolve(path)
        self.binary = binary
        self.remote = is_remote(self.path)
        self.upload_every_s = upload_every_s
        self._last_upload = 0.0
        self._file = None
        if self.remote:
            old = self.path.read_bytes() if self.path.exists() else b""
            self._buffer = bytearray(old)
        else:
            self._file = open(self.path, "ab" if binary else "a")  # noqa: SIM115  (closed in close())

    def write(self, data) -> None:
        if self._file is not None:
            self._file.write(data)
            self._file.flush()
            return
        self._buffer += data if self.binary else data.encode()
        if time.monotonic() - self._last_upload >= self.upload_every_s:
            self.flush()

    def flush(self) -> None:
        if self._file is not None:
            self._file.flush()
        elif self.remote:
            self.path.write_bytes(bytes(self._buffer))
            self._last_upload = time.monotonic()

    def close(self) -> None:
        if self._file is not None:
            if not self._file.closed:
                self._file.close()
        elif self.remote and self._buffer is not None:
            self.flush()
            self._buffer = None

    @property
    def closed(self) -> bool:
        return self._file.closed if self._file is not None else self._buffer is None

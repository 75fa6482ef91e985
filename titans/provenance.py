"""What made a raw output: the code revision and the Titans version, recorded next to a run's results.

    provenance() -> {"revision": git commit or None, "dirty": bool or None, "titans_version": str}

`revision` is the commit of the git work tree that holds the imported `titans` package, `dirty` whether
its tracked files differ from that commit (None for both when the package is not in a git work tree, e.g.
installed from a wheel, or git is missing). It imports nothing from Titans but the package itself, so any
layer may call it (a method writing its raw outputs, `titans.results` reading them).
"""

from __future__ import annotations

import os
import subprocess

import titans

_SOURCE = os.path.dirname(os.path.dirname(os.path.abspath(titans.__file__)))


def _git(*args: str) -> str | None:
    try:
        out = subprocess.run(["git", "-C", _SOURCE, *args], capture_output=True, text=True, timeout=20, check=False)
    except (OSError, subprocess.TimeoutExpired):
        return None
    return out.stdout.strip() if out.returncode == 0 else None


def provenance() -> dict:
    """{"revision", "dirty", "titans_version"} of the running code (see the module docstring)."""
    revision = _git("rev-parse", "--verify", "HEAD")
    status = _git("status", "--porcelain", "--untracked-files=no") if revision else None
    return {
        "revision": revision,
        "dirty": None if status is None else bool(status),
        "titans_version": titans.__version__,
    }

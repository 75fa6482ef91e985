"""Helpers shared by the test modules (tests/ is on sys.path under pytest's default import mode)."""

import importlib.util
import json
import os
import subprocess
import sys

from titans import config as config_lib

REPO = os.path.dirname(os.path.dirname(os.path.abspath(__file__)))


def run_probe(code: str, *, drop=(), **env_changes) -> dict:
    """Runs `python -c code` in a fresh process (the repository on its path, the CPU backend, this
    environment without the variables in `drop`, plus `env_changes`) and returns the JSON object on the last
    line of its stdout; a failed process fails the test with its stderr."""
    env = {k: v for k, v in os.environ.items() if k not in drop}
    env.update(PYTHONPATH=REPO, JAX_PLATFORMS="cpu", **env_changes)
    p = subprocess.run([sys.executable, "-c", code], env=env, capture_output=True, text=True, timeout=300)
    assert p.returncode == 0, p.stderr[-3000:]
    return json.loads(p.stdout.strip().splitlines()[-1])


def load_benchmark(script: str):
    """benchmarks/`script` (a standalone script, e.g. serving.py) imported as a module, to test its functions
    directly; benchmarks/ is on sys.path while it loads."""
    where = os.path.join(REPO, "benchmarks")
    sys.path.insert(0, where)
    try:
        spec = importlib.util.spec_from_file_location(f"bench_{script[:-3]}", os.path.join(where, script))
        module = importlib.util.module_from_spec(spec)
        spec.loader.exec_module(module)
    finally:
        sys.path.remove(where)
    return module


def digits_config(data_dir, **overrides):
    """configs/digits.py made small and synchronous; `overrides` maps dotted field names to values."""
    c = config_lib.load_config_file(os.path.join(REPO, "configs", "digits.py"))
    c.dataset.data_dir = data_dir
    c.total_steps = 40
    c.log_every_steps = 10
    c.checkpoint.every_steps = 20
    c.checkpoint.async_save = False
    for key, value in overrides.items():
        node = c
        *path, leaf = key.split(".")
        for p in path:
            node = node[p]
        node[leaf] = value
    return c


def flip_largest_file(directory) -> tuple[str, int]:
    """Flips one bit of the byte in the middle of the largest file under `directory` (a damaged checkpoint);
    returns (the file, the offset). Flipping it again repairs it."""
    victim = max((os.path.join(r, f) for r, _, fs in os.walk(directory) for f in fs), key=os.path.getsize)
    offset = os.path.getsize(victim) // 2
    flip_byte(victim, offset)
    return victim, offset


def flip_byte(path, offset: int) -> None:
    with open(path, "r+b") as f:
        f.seek(offset)
        byte = f.read(1)
        f.seek(offset)
        f.write(bytes([byte[0] ^ 0x01]))

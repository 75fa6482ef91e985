"""Test set-up: 8 simulated CPU devices and the console scripts' XLA:CPU settings (both set before the
JAX backend starts), and shared data directories."""

import os

os.environ["XLA_FLAGS"] = (os.environ.get("XLA_FLAGS", "") + " --xla_force_host_platform_device_count=8").strip()
os.environ.setdefault("JAX_PLATFORMS", "cpu")
# Tests (and the console scripts they start) compile afresh, and write nothing under ~/.cache.
os.environ.setdefault("TITANS_COMPILATION_CACHE", "off")

# after XLA_FLAGS's device count, before the backend starts
from titans import xla_cpu

xla_cpu.tune()

import jax
import pytest


def pytest_configure(config):
    config.addinivalue_line("markers", "gpu: needs a GPU; skipped without one")
    config.addinivalue_line("markers", "slow: runs a subprocess or a multi-step training run")


def pytest_collection_modifyitems(config, items):
    if jax.default_backend() != "gpu":
        skip = pytest.mark.skip(reason="needs a GPU")
        for item in items:
            if "gpu" in item.keywords:
                item.add_marker(skip)


@pytest.fixture(scope="session")
def data_dir(tmp_path_factory):
    """One TFDS data dir for the whole session, so offline datasets are prepared once."""
    path = os.environ.get("TITANS_TEST_DATA_DIR") or str(tmp_path_factory.mktemp("tfds"))
    return path

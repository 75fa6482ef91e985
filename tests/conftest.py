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


@pytest.fixture(scope="session")
def text_teacher(data_dir, tmp_path_factory):
    """A small text CNN trained on WordNet's train[:2000] (configs/wordnet_smoke.py with another model) and its
    teacher cache: the teacher of the text methods' tests, trained once per session."""
    from titans.config import load_config_file
    from titans.data import text
    from titans.teachers import cache as cache_lib
    from titans.train import train_and_evaluate

    if not text.wordnet_available():
        pytest.skip("needs `apt-get install wordnet-base`")
    root = tmp_path_factory.mktemp("text_teacher")
    config = load_config_file(os.path.join(os.path.dirname(os.path.dirname(__file__)), "configs", "wordnet_smoke.py"))
    config.dataset.data_dir = data_dir
    config.model.name = "text_cnn"
    config.model.kwargs = {}
    config.optimizer.learning_rate = 3e-3
    train_and_evaluate(config, str(root / "teacher"))
    args = ["--teacher_workdir", str(root / "teacher"), "--dataset", "wordnet", "--split", "train[:2000]"]
    assert cache_lib.main([*args, "--out", str(root / "cache"), "--data_dir", data_dir]) == 0
    return root

"""Installable beside other packages: pyproject.toml declares ranges, requirements-lock.txt the tested versions
(CONTRIBUTING.md, "Dependencies")."""

import json
import os
import shutil
import subprocess
import sys
import tomllib

import pytest
from helpers import REPO
from packaging.requirements import Requirement
from packaging.utils import canonicalize_name


def _declared() -> list[Requirement]:
    with open(os.path.join(REPO, "pyproject.toml"), "rb") as f:
        project = tomllib.load(f)["project"]
    extras = [r for group in project["optional-dependencies"].values() for r in group]
    return [Requirement(r) for r in project["dependencies"] + extras]


def _lock() -> dict[str, str]:
    pins = {}
    with open(os.path.join(REPO, "requirements-lock.txt")) as f:
        for line in f:
            line = line.split("#")[0].strip()
            if line:
                name, sep, version = line.partition("==")
                assert sep and version, f"requirements-lock.txt: {line!r} is not NAME==VERSION"
                pins[canonicalize_name(name)] = version
    return pins


def test_pyproject_declares_ranges_that_the_lock_satisfies():
    """No dependency of the package or its extras is an exact pin; every one has a lower bound, and the lock
    pins a version of it inside its range."""
    pins = _lock()
    for req in _declared():
        ops = {s.operator for s in req.specifier}
        assert "==" not in ops and "===" not in ops, f"pyproject.toml pins {req}: declare a range"
        assert ">=" in ops, f"pyproject.toml: {req} has no lower bound"
        name = canonicalize_name(req.name)
        assert name in pins, f"requirements-lock.txt lacks {req.name}"
        assert req.specifier.contains(pins[name], prereleases=True), f"lock pins {name}=={pins[name]}, outside {req}"


@pytest.mark.parametrize("name", ["requirements.txt", "requirements-tf.txt", "requirements-bench.txt"])
def test_every_requirements_file_applies_the_lock(name):
    with open(os.path.join(REPO, name)) as f:
        lines = [line.strip() for line in f if line.strip() and not line.startswith("#")]
    assert "-c requirements-lock.txt" in lines, f"{name} does not apply requirements-lock.txt"


def _dry_run(project_dir, *also: str) -> subprocess.CompletedProcess:
    cmd = [sys.executable, "-m", "pip", "install", "--dry-run", "--ignore-installed", "--quiet", "--report", "-"]
    env = {**os.environ, "PIP_DISABLE_PIP_VERSION_CHECK": "1"}
    return subprocess.run([*cmd, str(project_dir), *also], capture_output=True, text=True, timeout=600, env=env)


def _project_copy(path, pyproject_text: str):
    (path / "titans").mkdir(parents=True)
    (path / "titans" / "__init__.py").write_text("")
    shutil.copy(os.path.join(REPO, "README.md"), path)
    (path / "pyproject.toml").write_text(pyproject_text)
    return path


@pytest.mark.slow
def test_ranges_resolve_beside_another_packages_pins(tmp_path):
    """A real resolve against the package index (skipped without one): Titans' ranges install beside a
    package that needs numpy 2.3, which the former exact pins (numpy==2.4.6 and the rest) refused."""
    probe = subprocess.run(
        [sys.executable, "-m", "pip", "index", "versions", "numpy"], capture_output=True, text=True, timeout=120
    )
    if probe.returncode != 0 or "2.3." not in probe.stdout:
        pytest.skip("no package index with numpy 2.3 is reachable")
    with open(os.path.join(REPO, "pyproject.toml")) as f:
        ranges = f.read()
    got = _dry_run(_project_copy(tmp_path / "ranges", ranges), "numpy==2.3.*")
    assert got.returncode == 0, got.stderr[-3000:]
    resolved = {i["metadata"]["name"].lower(): i["metadata"]["version"] for i in json.loads(got.stdout)["install"]}
    assert resolved["numpy"].startswith("2.3.") and resolved["titans"] and resolved["jax"].startswith("0.10.")
    pinned = ranges.replace('"numpy>=2,<3"', '"numpy==2.4.6"')
    refused = _dry_run(_project_copy(tmp_path / "pinned", pinned), "numpy==2.3.*")
    assert refused.returncode != 0 and "ResolutionImpossible" in refused.stderr

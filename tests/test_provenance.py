"""titans.provenance: the git revision of the work tree that holds the package, its dirty flag, and
the version; None for both without git or outside a work tree. The repository is a real one made in
tmp_path (`provenance._SOURCE`, the directory it inspects, pointed at it)."""

import subprocess

import pytest

import titans
from titans import provenance

GIT = ["git", "-c", "user.name=t", "-c", "user.email=t@example.com", "-c", "commit.gpgsign=false"]


@pytest.fixture
def repo(tmp_path, monkeypatch):
    """A git repository in tmp_path/repo with one committed file, inspected by provenance()."""
    monkeypatch.setenv("GIT_CEILING_DIRECTORIES", str(tmp_path))  # never the repository around tmp_path
    root = tmp_path / "repo"
    root.mkdir()
    (root / "a.py").write_text("x = 1\n")
    subprocess.run([*GIT, "init", "-q"], cwd=root, check=True)
    subprocess.run([*GIT, "add", "."], cwd=root, check=True)
    subprocess.run([*GIT, "commit", "-q", "-m", "first"], cwd=root, check=True)
    monkeypatch.setattr(provenance, "_SOURCE", str(root))
    return root


def _head(root):
    return subprocess.run(["git", "rev-parse", "HEAD"], cwd=root, capture_output=True, text=True).stdout.strip()


def test_revision_and_dirty_flag(repo):
    got = provenance.provenance()
    assert got == {"revision": _head(repo), "dirty": False, "titans_version": titans.__version__}
    assert len(got["revision"]) == 40
    (repo / "new.py").write_text("untracked\n")  # an untracked file is not a change to the code
    assert provenance.provenance()["dirty"] is False
    (repo / "a.py").write_text("x = 2\n")
    assert provenance.provenance()["dirty"] is True
    subprocess.run([*GIT, "add", "a.py"], cwd=repo, check=True)  # staged is still uncommitted
    assert provenance.provenance()["dirty"] is True
    subprocess.run([*GIT, "commit", "-q", "-m", "second"], cwd=repo, check=True)
    assert provenance.provenance() == {"revision": _head(repo), "dirty": False, "titans_version": titans.__version__}


def test_no_work_tree_or_no_git(tmp_path, monkeypatch, repo):
    plain = tmp_path / "plain"
    plain.mkdir()
    monkeypatch.setattr(provenance, "_SOURCE", str(plain))
    assert provenance.provenance() == {"revision": None, "dirty": None, "titans_version": titans.__version__}
    monkeypatch.setattr(provenance, "_SOURCE", str(repo))
    monkeypatch.setenv("PATH", "")  # git not installed
    assert provenance.provenance()["revision"] is None and provenance.provenance()["dirty"] is None

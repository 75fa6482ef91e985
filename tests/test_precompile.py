"""titans.train.precompile: a run's train and eval steps compiled in a child process, which the run then loads
from the compilation cache; a failed or hung child costs the run nothing but the time it took."""

import logging
import os
import subprocess
import sys

import ml_collections
import pytest
from helpers import REPO, run_probe

from titans import host_malloc
from titans.train import precompile

# A teacher and an online-KD student trained in one fresh process through process_setup (the compilation
# cache on), recording which programs JAX loaded from the persistent cache.
_PROBE = r"""
import json, logging, sys
sys.path.insert(0, {tests!r})
from titans import logs
logs.process_setup()
hits = []
class Hits(logging.Handler):
    def emit(self, record):
        message = record.getMessage()
        if message.startswith("Persistent compilation cache hit for"):
            hits.append(message.split("'")[1])
compiler_log = logging.getLogger("jax._src.compiler")
compiler_log.setLevel(logging.DEBUG)
compiler_log.addHandler(Hits())
from helpers import digits_config
from titans.train import train_and_evaluate
teacher = train_and_evaluate(digits_config({data!r}, total_steps=20), {work!r} + "/teacher")
c = digits_config({data!r}, total_steps=20)
c.model.kwargs.hidden = (16,)
c.distill.teacher_workdir = {work!r} + "/teacher"
student = train_and_evaluate(c, {work!r} + "/student")
print(json.dumps({{"hits": hits, "teacher": teacher["accuracy"], "student": student["accuracy"],
                  "student_loss": student["loss"]}}))
"""


def _run(tmp_path, data_dir, name: str, mode: str) -> dict:
    code = _PROBE.format(tests=os.path.join(REPO, "tests"), data=data_dir, work=str(tmp_path / name))
    return run_probe(
        code,
        drop=("JAX_COMPILATION_CACHE_DIR",),
        TITANS_COMPILATION_CACHE=str(tmp_path / f"cache_{name}"),
        TITANS_COMPILE_IN_CHILD=mode,
    )


@pytest.mark.slow
def test_the_run_loads_the_steps_its_child_compiled(tmp_path, data_dir):
    child = _run(tmp_path, data_dir, "child", "on")
    # Both stages' train and eval steps came from the cache: the child compiled them, the run did not.
    assert child["hits"].count("jit_train_step") == 2, child["hits"]
    assert child["hits"].count("jit_eval_step") == 2, child["hits"]
    here = _run(tmp_path, data_dir, "here", "off")
    assert "jit_train_step" not in here["hits"] and "jit_eval_step" not in here["hits"]
    # The same programs: the same results to the last bit.
    assert (child["teacher"], child["student"], child["student_loss"]) == (
        here["teacher"],
        here["student"],
        here["student_loss"],
    )


def test_when_it_applies(monkeypatch):
    monkeypatch.delenv(precompile.ENV, raising=False)

    c = ml_collections.ConfigDict({"distill": {"teacher_workdir": "", "teacher_mode": "online"}})
    monkeypatch.setattr(precompile, "_titans_cache_on", lambda: False)
    assert precompile.applies(c, None) == f"{precompile.ENV}=off (the default)"
    monkeypatch.setenv(precompile.ENV, "on")
    assert precompile.applies(c, None) == "Titans' compilation cache is off"
    monkeypatch.setattr(precompile, "_titans_cache_on", lambda: True)
    assert precompile.applies(c, None) is None
    assert precompile.applies(c, object()) == "a method object was passed in"
    c.distill.teacher_workdir = "/runs/teacher"
    c.distill.teacher_mode = "cache"
    assert precompile.applies(c, None) == "distill.teacher_mode=cache"
    monkeypatch.setenv(precompile.ENV, "sometimes")
    with pytest.raises(ValueError, match="expected 'off'"):
        precompile.applies(c, None)


def _child(tmp_path, code: str) -> precompile.Child:
    log = tmp_path / "child.log"
    config = tmp_path / "config.pkl"
    config.write_bytes(b"")
    with open(log, "w") as out:
        proc = subprocess.Popen([sys.executable, "-c", code], stdout=out, stderr=subprocess.STDOUT)
    return precompile.Child(proc, str(log), str(config), "run")


def test_a_failed_child_is_reported_and_cleaned_up(tmp_path, caplog):
    child = _child(tmp_path, "import sys; print('no such dataset split'); sys.exit(3)")
    with caplog.at_level(logging.WARNING):
        assert child.wait() is False
    assert "failed (exit 3)" in caplog.text and "no such dataset split" in caplog.text
    child.stop()
    assert not os.path.exists(child.log_path) and not os.path.exists(child.config_path)


def test_a_hung_child_is_killed_at_its_timeout(tmp_path, caplog):
    child = _child(tmp_path, "import time; time.sleep(120)")
    with caplog.at_level(logging.WARNING):
        assert child.wait(timeout_s=1.0) is False
    assert "ran past 1 s" in caplog.text
    assert child.proc.poll() is not None  # killed, not left running


def test_the_child_entry_point_checks_its_arguments():
    out = subprocess.run(
        [sys.executable, "-c", precompile.CHILD_CODE],
        capture_output=True,
        text=True,
        env={**os.environ, "PYTHONPATH": REPO},
        timeout=120,
    )
    assert out.returncode == 2 and "usage" in out.stderr


@pytest.mark.slow
def test_compile_in_child_benchmark_runs_both_ways(tmp_path, data_dir, monkeypatch):
    """benchmarks/compile_in_child.py (two pairs of a short digits run): every `on` run had its steps compiled
    by a child and no `off` run did; the pair order alternates; both ways train the same programs."""
    from helpers import run_benchmark

    monkeypatch.setenv("TFDS_DATA_DIR", data_dir)
    args = ("--config", "configs/digits.py", "--set", "total_steps=20", "--set", "log_every_steps=10", "--pairs", "2")
    _, result = run_benchmark("compile_in_child.py", *args, out=tmp_path / "cic.json")
    assert [q["order"] for q in result["pairs"]] == [["off", "on"], ["on", "off"]]
    for q in result["pairs"]:
        assert q["on"]["children_compiled"] == 1 and q["off"]["children_compiled"] == 0
        assert q["on"]["stages"]["run"]["accuracy"] == q["off"]["stages"]["run"]["accuracy"]
    ratio = result["on_over_off"]["wall"]
    assert ratio["n"] == 2 and ratio["low"] <= ratio["geomean"] <= ratio["high"]
    run = result["pairs"][0]["off"]
    assert run["process_settings"].startswith("host_malloc ") and run["peak_rss_mb"] > 100 and run["minor_faults"] > 0


@pytest.mark.slow
@pytest.mark.skipif(host_malloc.find_jemalloc() is None, reason="libjemalloc2 is not installed (CI installs it)")
def test_compile_in_child_benchmark_compares_the_allocators(tmp_path, data_dir, monkeypatch):
    """`--compare jemalloc` (one pair of a short digits run): the `on` run ran under jemalloc and the `off` run
    under glibc's reuse settings, as each says on its first line; same accuracy; no child in either."""
    from helpers import run_benchmark

    monkeypatch.setenv("TFDS_DATA_DIR", data_dir)
    args = ("--config", "configs/digits.py", "--set", "total_steps=10", "--pairs", "1", "--compare", "jemalloc")
    _, result = run_benchmark("compile_in_child.py", *args, out=tmp_path / "je.json")
    (q,) = result["pairs"]
    assert q["on"]["process_settings"].startswith("host_malloc jemalloc (MALLOC_CONF=dirty_decay_ms:-1")
    assert q["off"]["process_settings"].startswith("host_malloc tuned;")
    assert q["on"]["children_compiled"] == q["off"]["children_compiled"] == 0
    assert q["on"]["stages"]["run"]["accuracy"] == q["off"]["stages"]["run"]["accuracy"]


def test_compile_in_child_extracts_a_revision_and_refuses_what_is_not_one(tmp_path):
    """`--compare revision`'s off side: `titans/` and `configs/` of the commit, as committed; an option-like
    or unknown revision is refused before git sees it as anything but a revision."""
    from helpers import load_benchmark

    cic = load_benchmark("compile_in_child.py")
    head = subprocess.run(["git", "rev-parse", "HEAD"], cwd=REPO, capture_output=True, text=True, check=True)
    assert cic.extract_revision("HEAD", str(tmp_path)) == head.stdout.strip()
    committed = subprocess.run(
        ["git", "show", "HEAD:titans/runs.py"], cwd=REPO, capture_output=True, text=True, check=True
    ).stdout
    assert (tmp_path / "titans" / "runs.py").read_text() == committed
    assert (tmp_path / "configs" / "quickstart.py").is_file() and not (tmp_path / "tests").exists()
    for bad in ("--output=/tmp/x", "no-such-revision"):
        with pytest.raises(SystemExit, match="not a commit"):
            cic.extract_revision(bad, str(tmp_path / "bad"))

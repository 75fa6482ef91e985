"""The console scripts' command line (titans.cli) and the process settings (titans.host): every script of
pyproject's [project.scripts] answers `--help` with its flags (exit 0) and a bad flag with one line (exit 2);
importing titans, or any of its modules, changes nothing about the process."""

import contextlib
import importlib
import io
import json
import os
import subprocess
import sys
import tomllib

import pytest

REPO = os.path.dirname(os.path.dirname(os.path.abspath(__file__)))
with open(os.path.join(REPO, "pyproject.toml"), "rb") as _f:
    SCRIPTS = tomllib.load(_f)["project"]["scripts"]

# The flags each script's help must name (its users' commands rely on them).
FLAGS = {
    "titans-train": ("--config", "--workdir", "--config.FIELD=VALUE"),
    "titans-sweep": ("--config", "--workdir", "--parallel", "--set", "--dry_run", "--tpu", "--zone"),
    "titans-analyze": ("workdirs", "--split", "--step", "--compare", "--inspect", "--out"),
    "titans-cascade": ("--stages", "--gate", "--rates", "--val_split", "--split", "--batch_size", "--out"),
    "titans-active": ("--config", "--workdir", "--config.FIELD=VALUE"),
    "titans-cache": ("--config", "--teacher_workdir", "--split", "--out", "--topk", "--dtype", "--shard_size"),
    "titans-prepare": ("--data_dir", "--manual_dir", "fashion_mnist"),
    "titans-export": ("--stages", "--gate", "--rates", "--out"),
    "titans-serve": ("--export", "--host", "--port"),
    "titans-results": ("collect", "rebuild"),
}
# Their entry parses its flags inside logs.run_cli, which ends the process on a non-zero code: run in a
# subprocess. The others parse before anything runs, so they are called in this process.
IN_SUBPROCESS = ("titans-export", "titans-serve")
# Their owners have not moved them to titans.cli.parser yet: argparse's usage lines come before the error.


def test_every_console_script_is_checked():
    assert set(FLAGS) == set(SCRIPTS)


def _entry(name):
    module, function = SCRIPTS[name].split(":")
    return getattr(importlib.import_module(module), function)


def _call(name, *args) -> tuple[int, str, str]:
    """(exit code, stdout, stderr) of the console script's entry called in this process with `args`."""
    out, err = io.StringIO(), io.StringIO()
    argv = sys.argv
    sys.argv = [name, *args]
    try:
        with contextlib.redirect_stdout(out), contextlib.redirect_stderr(err):
            code = _entry(name)()
    except SystemExit as e:
        code = e.code
    finally:
        sys.argv = argv
    return int(code or 0), out.getvalue(), err.getvalue()


# In a subprocess: --help (output captured, its exit caught), printed as JSON; then the bad flag, whose
# exit ends the process.
_BOTH = r"""
import contextlib, io, json, sys
from {module} import {function} as entry
out, err = io.StringIO(), io.StringIO()
sys.argv = [{name!r}, "--help"]
try:
    with contextlib.redirect_stdout(out), contextlib.redirect_stderr(err):
        entry()
    code = 0
except SystemExit as e:
    code = e.code
print(json.dumps({{"code": code, "out": out.getvalue(), "err": err.getvalue()}}), flush=True)
sys.argv = [{name!r}, "--no_such_flag=1"]
sys.exit(entry())
"""


@pytest.fixture(scope="module")
def subprocess_results():
    """{name: ((help code, out, err), (bad flag code, stderr))} of the IN_SUBPROCESS scripts, run in parallel."""
    procs = {}
    for name in IN_SUBPROCESS:
        module, function = SCRIPTS[name].split(":")
        code = _BOTH.format(module=module, function=function, name=name)
        env = dict(os.environ, PYTHONPATH=REPO, JAX_PLATFORMS="cpu")
        procs[name] = subprocess.Popen(
            [sys.executable, "-c", code], env=env, stdout=subprocess.PIPE, stderr=subprocess.PIPE, text=True
        )
    results = {}
    for name, p in procs.items():
        stdout, stderr = p.communicate(timeout=300)
        first = json.loads(stdout.splitlines()[0])
        results[name] = ((int(first["code"] or 0), first["out"], first["err"]), (p.returncode, stderr))
    return results


def _help(name, subprocess_results):
    return subprocess_results[name][0] if name in IN_SUBPROCESS else _call(name, "--help")


def _bad_flag(name, subprocess_results):
    if name in IN_SUBPROCESS:
        return subprocess_results[name][1]
    code, _, err = _call(name, "--no_such_flag=1")
    return code, err


@pytest.mark.slow
@pytest.mark.parametrize("name", sorted(FLAGS))
def test_help_exits_0_and_names_the_flags(name, subprocess_results):
    code, out, _ = _help(name, subprocess_results)
    assert code == 0
    missing = [flag for flag in FLAGS[name] if flag not in out]
    assert not missing, f"{name} --help does not name {missing}:\n{out}"


@pytest.mark.slow
@pytest.mark.parametrize(
    "name",
    sorted(FLAGS),
)
def test_a_bad_flag_exits_2_with_one_line(name, subprocess_results):
    code, err = _bad_flag(name, subprocess_results)
    assert code == 2 and "Traceback" not in err, err
    lines = err.strip().splitlines()
    assert len(lines) == 1 and lines[0].startswith(f"{name}: error: "), err


def test_an_unknown_flag_or_bad_value_is_named():
    code, _, err = _call("titans-cache", "--no_such_flag=1")
    assert code == 2 and "unrecognized arguments: --no_such_flag=1" in err
    code, _, err = _call("titans-train", "--config=configs/digits.py", "--workdir=w", "--no_such_flag=1")
    assert code == 2 and "unrecognized arguments: --no_such_flag=1" in err
    code, _, err = _call("titans-train", "--config=configs/nowhere.py", "--workdir=w")
    assert code == 2 and "no such file 'configs/nowhere.py'" in err
    code, _, err = _call("titans-sweep", "--config=configs/digits.py", "--workdir=w", "--parallel=two")
    assert code == 2 and "argument --parallel: invalid int value: 'two'" in err
    code, _, err = _call("titans-active", "--config=configs/digits.py", "--workdir=w", "--work=x")
    assert code == 2 and "unrecognized arguments: --work=x" in err  # no abbreviations


def test_config_overrides_are_parsed_by_field_type():
    """`--config.FIELD=VALUE` as ml_collections' config flag parsed it: by the field's type, in order."""
    from titans import cli

    p = cli.parser("titans-train", None)
    cli.config_arguments(p, "c", "w")
    args = cli.parse_with_overrides(
        p,
        [
            "--config=configs/digits.py",
            "--workdir=w",
            "--config.total_steps=7",
            "--config.checkpoint.async_save=false",
            "--config.optimizer.learning_rate=0.25",
            "--config.total_steps=9",
        ],
    )
    assert args.workdir == "w" and cli.override_fields(args.overrides)[0] == "total_steps"
    c = cli.load_config(args.config, args.overrides)
    assert (c.total_steps, c.checkpoint.async_save, c.optimizer.learning_rate) == (9, False, 0.25)
    with pytest.raises(ValueError, match="invalid literal for int"):
        cli.load_config("configs/digits.py", ["--config.total_steps=many"])


# Records what a process is and runs with, imports titans and every titans module, and records it again.
_UNCHANGED = r"""
import ctypes, importlib, json, os, pkgutil, resource, sys, threading

def allocator_faults():  # glibc's defaults remap an 80 MiB buffer freed by a thread (titans.host_malloc)
    libc = ctypes.CDLL(None)
    libc.malloc.restype, libc.malloc.argtypes = ctypes.c_void_p, (ctypes.c_size_t,)
    libc.free.argtypes = (ctypes.c_void_p,)
    out = []
    def work():
        before = resource.getrusage(resource.RUSAGE_THREAD).ru_minflt
        for _ in range(3):
            p = libc.malloc(80 << 20); ctypes.memset(p, 1, 80 << 20); libc.free(p)
        out.append(resource.getrusage(resource.RUSAGE_THREAD).ru_minflt - before)
    t = threading.Thread(target=work); t.start(); t.join()
    return out[0]

def state():
    with open("/proc/self/maps") as f:
        jemalloc = any("libjemalloc" in line for line in f)
    return {"environ": dict(os.environ), "pid": os.getpid(), "argv": sys.orig_argv, "jemalloc": jemalloc}

if sys.argv[1:] == ["baseline"]:  # a fresh process that imports no titans module
    print(json.dumps(allocator_faults()))
    sys.exit(0)
print("start", flush=True)
for name in ("ray", "ray.serve"):  # a third-party import's own settings (ray sets RAY_CLIENT_MODE) are not titans'
    try:
        importlib.import_module(name)
    except ImportError:
        pass
before = state()
import titans
failed = {}
for m in pkgutil.walk_packages(titans.__path__, "titans."):
    try:
        importlib.import_module(m.name)
    except ImportError as e:  # an optional dependency that is not installed
        failed[m.name] = str(e)
after = state()
after["faults"] = allocator_faults()  # the first thread started after the imports
import jax
after["cache_dir"] = jax.config.jax_compilation_cache_dir
print(json.dumps({"before": before, "after": after, "failed": failed}))
"""


@pytest.mark.slow
@pytest.mark.skipif(not sys.platform.startswith("linux"), reason="glibc's allocator and /proc")
def test_importing_every_titans_module_changes_nothing_about_the_process():
    """No re-execution (one start, same pid and command line), no environment variable, XLA flag or
    allocator setting changed, no compilation cache configured: by `import titans` and every titans module."""
    env = {k: v for k, v in os.environ.items() if k not in ("LD_PRELOAD", "MALLOC_CONF", "XLA_FLAGS")}
    env = {k: v for k, v in env.items() if not k.startswith("TITANS_")}
    env.update(PYTHONPATH=REPO, JAX_PLATFORMS="cpu")
    base = subprocess.run([sys.executable, "-c", _UNCHANGED, "baseline"], env=env, capture_output=True, text=True)
    pages = 3 * (80 << 20) // 4096
    if int(base.stdout) < pages // 2:
        pytest.skip("this C library does not remap a large buffer freed by a thread")
    p = subprocess.run([sys.executable, "-c", _UNCHANGED], env=env, capture_output=True, text=True, timeout=600)
    assert p.returncode == 0, p.stderr[-3000:]
    lines = p.stdout.strip().splitlines()
    assert lines.count("start") == 1, "the process was re-executed"
    out = json.loads(lines[-1])
    assert not out["failed"], out["failed"]
    before, after = out["before"], out["after"]
    assert after.pop("faults") >= pages // 2, "the allocator's settings changed: a freed buffer is reused"
    assert after["cache_dir"] in (None, "")
    after.pop("cache_dir")
    changed = {k: (before["environ"].get(k), v) for k, v in after["environ"].items() if before["environ"].get(k) != v}
    changed.update({k: None for k in before["environ"] if k not in after["environ"]})
    assert not changed, f"environment variables set by importing titans: {changed}"
    assert after == before

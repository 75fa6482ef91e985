"""JAX's persistent compilation cache (titans.compile_cache): a console script's second process loads what
the first compiled; `off` and a user's own cache directory are respected. Each case runs in fresh processes
(the cache is configured once per process)."""

import pytest
from helpers import run_probe

# Through a console script's entry point: what enable() did, and JAX's own cache events while one small
# program (below JAX's default 1 s threshold) compiles.
_PROBE = r"""
import json
import jax
from titans import compile_cache, logs
events = []
jax.monitoring.register_event_listener(lambda name, **kw: events.append(name))
def entry():
    import jax.numpy as jnp
    jax.jit(lambda x: jnp.tanh(x) @ x.T)(jnp.ones((4, 4))).block_until_ready()
    print(json.dumps({"applied": compile_cache._applied, "dir": jax.config.jax_compilation_cache_dir,
                      "hits": events.count("/jax/compilation_cache/cache_hits"),
                      "misses": events.count("/jax/compilation_cache/cache_misses")}))
logs.run_cli(entry)
"""


def _probe(**env_changes) -> dict:
    return run_probe(_PROBE, drop=("TITANS_COMPILATION_CACHE", "JAX_COMPILATION_CACHE_DIR"), **env_changes)


@pytest.mark.slow
def test_second_process_loads_what_the_first_compiled(tmp_path):
    cache = tmp_path / "cache"
    first = _probe(TITANS_COMPILATION_CACHE=str(cache))
    assert first["applied"] == f"on: {cache}" and first["dir"] == str(cache)
    assert first["misses"] >= 1 and first["hits"] == 0
    assert any(cache.iterdir())
    second = _probe(TITANS_COMPILATION_CACHE=str(cache))
    assert second["hits"] >= 1 and second["misses"] == 0


@pytest.mark.slow
def test_off_and_a_users_own_directory_are_respected(tmp_path):
    off = _probe(TITANS_COMPILATION_CACHE="off")
    assert off["applied"].startswith("off") and not off["dir"]
    assert off["hits"] == off["misses"] == 0
    mine = tmp_path / "mine"
    own = _probe(JAX_COMPILATION_CACHE_DIR=str(mine), TITANS_COMPILATION_CACHE=str(tmp_path / "titans"))
    assert own["applied"] == f"left as configured: {mine}" and own["dir"] == str(mine)
    assert not (tmp_path / "titans").exists()


@pytest.mark.slow
def test_default_directory_is_under_the_users_cache(tmp_path):
    got = _probe(XDG_CACHE_HOME=str(tmp_path))
    assert got["applied"] == f"on: {tmp_path / 'titans' / 'jax'}"
    assert any((tmp_path / "titans" / "jax").iterdir())


@pytest.mark.slow
def test_compile_after_effect_benchmark_compiles_in_one_child_only(tmp_path):
    """benchmarks/compile_after_effect.py (two pairs, one short round): the `compiled` child of each pair
    misses the persistent cache and the `loaded` child only hits it, in both pair orders; both time their
    steps and report the ratio with an interval."""
    from helpers import run_benchmark

    args = ("--kind", "student", "--pairs", "2", "--steps", "3", "--rounds", "1")
    _, result = run_benchmark("compile_after_effect.py", *args, out=tmp_path / "cae.json")
    assert [q["order"] for q in result["pairs"]] == ["compiled first", "loaded first"]
    for q in result["pairs"]:
        assert q["compiled"]["cache_misses"] > 0
        assert q["loaded"]["cache_misses"] == 0 and q["loaded"]["cache_hits"] > 0
        assert all(len(q[side]["ms_per_step"]) == 1 and q[side]["median_ms"] > 0 for side in ("compiled", "loaded"))
    ratio = result["compiled_over_loaded"]
    assert ratio["n"] == 2 and ratio["low"] <= ratio["geomean"] <= ratio["high"]

"""JAX's persistent compilation cache (titans.compile_cache): a console script's second process loads what
the first compiled; `off` and a user's own cache directory are respected. Each case runs in fresh processes
(the cache is configured once per process)."""

import pytest
from helpers import run_probe

# After the training commands' set-up (titans.host.apply): what enable() did, and JAX's own cache events while one small
# program (below JAX's default 1 s threshold) compiles.
_PROBE = r"""
import json
import jax
from titans import compile_cache, host
host.apply()
events = []
jax.monitoring.register_event_listener(lambda name, **kw: events.append(name))
def entry():
    import jax.numpy as jnp
    jax.jit(lambda x: jnp.tanh(x) @ x.T)(jnp.ones((4, 4))).block_until_ready()
    print(json.dumps({"applied": compile_cache._applied, "dir": jax.config.jax_compilation_cache_dir,
                      "hits": events.count("/jax/compilation_cache/cache_hits"),
                      "misses": events.count("/jax/compilation_cache/cache_misses")}))
entry()
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

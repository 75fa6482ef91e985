"""XLA:CPU's convolution kernels (titans.xla_cpu): with the setting, a compiled convolution is XLA's own
(Eigen), not a YNNPACK fusion; XLA's defaults, a user's own flag and unchecked jaxlib versions are left
alone. Each case runs in a fresh process, since XLA reads XLA_FLAGS once, when the backend starts."""

import os

import pytest
from helpers import run_probe

from titans import xla_cpu

# Runs after the training commands' set-up (titans.host.apply) and prints, as JSON, what tune() did, the
# XLA_FLAGS the backend started with and whether the compiled convolutions of a 32 -> 64 conv layer (forward
# and both gradients) went to YNNPACK.
_PROBE = r"""
import json, os, sys
from titans import host, xla_cpu
host.apply()
def entry():
    import jax, jax.numpy as jnp
    conv = lambda x, k: jax.lax.conv_general_dilated(x, k, (1, 1), "SAME", dimension_numbers=("NHWC", "HWIO", "NHWC"))
    loss = lambda x, k: jnp.sum(conv(x, k) ** 2)
    hlo = jax.jit(jax.grad(loss, argnums=(0, 1))).lower(jnp.ones((2, 14, 14, 32)), jnp.ones((3, 3, 32, 64))).compile().as_text()
    print(json.dumps({"applied": xla_cpu._applied, "flags": os.environ.get("XLA_FLAGS", ""),
                      "convolutions": hlo.count(" convolution("), "ynn_convolution_fusions": xla_cpu.ynn_convolutions(hlo)}))
entry()
"""


def _probe(**env_changes) -> dict:
    return run_probe(_PROBE, drop=("XLA_FLAGS", "TITANS_XLA_CPU"), **env_changes)


checked = pytest.mark.skipif(
    (xla_cpu._jaxlib_version() or ())[:2] not in xla_cpu.CHECKED_JAXLIB, reason="jaxlib is not a checked version"
)


@pytest.mark.slow
@checked
def test_console_scripts_take_convolutions_off_ynnpack():
    tuned = _probe()
    assert tuned["applied"] == "tuned"
    assert f"{xla_cpu.FLAG}={xla_cpu.VALUE}" in tuned["flags"].split()
    assert tuned["convolutions"] >= 3  # forward, input gradient, kernel gradient: XLA's own
    assert tuned["ynn_convolution_fusions"] == 0
    # XLA's defaults (what every process got before): the same convolutions are YNNPACK fusions.
    default = _probe(TITANS_XLA_CPU="default")
    assert default["applied"].startswith("left at XLA's defaults")
    assert xla_cpu.FLAG not in default["flags"]
    assert default["ynn_convolution_fusions"] >= 3


@pytest.mark.slow
@checked
def test_a_users_own_flag_stands():
    mine = f"{xla_cpu.FLAG}=-reduce"
    got = _probe(XLA_FLAGS=mine)
    assert got["applied"].startswith("left as set in XLA_FLAGS")
    assert got["flags"] == mine
    assert got["ynn_convolution_fusions"] >= 3  # only reductions were taken out


def _fresh(monkeypatch, **env):
    monkeypatch.setattr(xla_cpu, "_applied", None)
    monkeypatch.delenv("TITANS_XLA_CPU", raising=False)
    monkeypatch.setenv("XLA_FLAGS", "--xla_force_host_platform_device_count=8")
    for key, value in env.items():
        monkeypatch.setenv(key, value)


def test_unchecked_jaxlib_gets_no_flag(monkeypatch):
    # XLA aborts the process on a fusion type it does not know: an unchecked version is left alone.
    _fresh(monkeypatch)
    monkeypatch.setattr(xla_cpu, "_jaxlib_version", lambda: (0, 99, 0))
    monkeypatch.setattr(xla_cpu, "_backend_started", lambda: False)
    assert xla_cpu.tune() == "not set: jaxlib 0.99.0 is not a checked version"
    assert os.environ["XLA_FLAGS"] == "--xla_force_host_platform_device_count=8"


def test_after_the_backend_started_it_reports_instead_of_setting(monkeypatch):
    import jax

    jax.devices()  # this test process's backend runs
    _fresh(monkeypatch)
    monkeypatch.setattr(xla_cpu, "_jaxlib_version", lambda: (0, 10, 2))
    assert xla_cpu.tune() == "not set: the JAX backend had already started"
    assert os.environ["XLA_FLAGS"] == "--xla_force_host_platform_device_count=8"


def test_appends_to_existing_flags(monkeypatch):
    _fresh(monkeypatch)
    monkeypatch.setattr(xla_cpu, "_jaxlib_version", lambda: (0, 10, 2))
    monkeypatch.setattr(xla_cpu, "_backend_started", lambda: False)
    assert xla_cpu.tune() == "tuned"
    assert os.environ["XLA_FLAGS"].split() == [
        "--xla_force_host_platform_device_count=8",
        f"{xla_cpu.FLAG}={xla_cpu.VALUE}",
    ]
    # once per process: a second call changes nothing
    assert xla_cpu.tune() == "tuned"
    assert os.environ["XLA_FLAGS"].count(xla_cpu.FLAG) == 1


def test_bad_setting_is_named(monkeypatch):
    _fresh(monkeypatch, TITANS_XLA_CPU="fast")
    with pytest.raises(ValueError, match=r"TITANS_XLA_CPU='fast'.*'tuned'.*'default'"):
        xla_cpu.tune()


def test_version_parsing(monkeypatch):
    import importlib.metadata

    for text, want in (("0.10.2", (0, 10, 2)), ("0.10.2.dev20261201", (0, 10, 2)), ("0.11.0rc1", (0, 11, 0))):
        monkeypatch.setattr(importlib.metadata, "version", lambda name, text=text: text)
        assert xla_cpu._jaxlib_version() == want


def test_ynn_convolutions_counts_only_convolutions_inside_ynn_fusions():
    hlo = """HloModule m

%fused_computation.1 (p0: f32[2,4,4,8], p1: f32[3,3,8,8]) -> f32[2,4,4,8] {
  %p0 = f32[2,4,4,8]{3,2,1,0} parameter(0)
  %p1 = f32[3,3,8,8]{3,2,1,0} parameter(1)
  ROOT %c = f32[2,4,4,8]{3,2,1,0} convolution(%p0, %p1), window={size=3x3 pad=1_1x1_1}, dim_labels=b01f_01io->b01f
}

%fused_computation.2 (p0: f32[2,4,4,8]) -> f32[2,4,4,8] {
  %p0 = f32[2,4,4,8]{3,2,1,0} parameter(0)
  ROOT %n = f32[2,4,4,8]{3,2,1,0} negate(%p0)
}

ENTRY %main (x: f32[2,4,4,8], k: f32[3,3,8,8]) -> f32[2,4,4,8] {
  %x = f32[2,4,4,8]{3,2,1,0} parameter(0)
  %k = f32[3,3,8,8]{3,2,1,0} parameter(1)
  %plain = f32[2,4,4,8]{3,2,1,0} convolution(%x, %k), window={size=3x3 pad=1_1x1_1}, dim_labels=b01f_01io->b01f
  %ynn = f32[2,4,4,8]{3,2,1,0} fusion(%plain, %k), kind=kCustom, calls=%fused_computation.1, backend_config={"fusion_config":{"kind":"__ynn_fusion"}}
  ROOT %loop = f32[2,4,4,8]{3,2,1,0} fusion(%ynn), kind=kLoop, calls=%fused_computation.2
}
"""
    assert xla_cpu.ynn_convolutions(hlo) == 1  # the entry's own convolution and the loop fusion do not count
    assert xla_cpu.ynn_convolutions(hlo.replace("__ynn_fusion", "__other")) == 0

"""benchmarks/: the registry, the harness (interleaving, steal screen, paired ratios, records), the generated
docs/benchmarks.md, and one tiny benchmark end to end through `python -m benchmarks`."""

import argparse
import importlib.util
import json
import math
import os
import shutil
import subprocess
import sys

import numpy as np
import pytest
from helpers import REPO
from scipy import stats as sp_stats

sys.path.insert(0, REPO)
from benchmarks import harness, pool_speed, report
from benchmarks.harness import Comparison


def test_the_registry_holds_every_kept_benchmark_and_refuses_a_second_one_by_the_same_name():
    names = set(harness.load_all())
    assert names == {
        "step_speed",
        "transformer_step",
        "quickstart_recipe",
        "cascade_speed",
        "pool_speed",
        "selection_speed",
    }
    for bench in harness.REGISTRY.values():
        assert bench.doc and all(a.help for a in bench.args), bench.name
    with pytest.raises(ValueError, match="registered twice"):
        harness.register("step_speed")(lambda args: None)


def test_interleave_times_the_sides_in_turn_and_replaces_a_stolen_round():
    """A, B, A, B, ...; a round in which the (stubbed) hypervisor clock advanced more than max_steal is kept but
    marked, and one more round runs in its place."""
    calls = []
    sides = {"A": lambda: calls.append("A") or 1.0, "B": lambda: calls.append("B") or {"s": 2.0, "acc": 0.5}}
    steal = iter([0.0, 0.0, 0.0, 9.0, 9.0, 9.5, 9.5, 9.5])  # round 2 loses 9 s
    rounds = harness.interleave(sides, 3, max_steal=5.0, clock=lambda: next(steal))
    assert calls == ["A", "B"] * 4
    assert [r["kept"] for r in rounds] == [True, False, True, True]
    assert [r["steal_s"] for r in rounds] == [0.0, 9.0, 0.5, 0.0]
    assert rounds[0]["s"] == {"A": 1.0, "B": 2.0} and rounds[0]["details"] == {"B": {"acc": 0.5}}
    assert all(r["kept"] for r in harness.interleave(sides, 2, max_steal=-1, clock=lambda: next(steal, 1e9)))


def test_a_shuffled_plan_records_a_new_order_every_round():
    calls = []
    sides = {k: (lambda k=k: calls.append(k) or 1.0) for k in "ABCD"}
    rounds = harness.interleave(sides, 4, clock=lambda: None, shuffle=True)
    orders = [r["order"] for r in rounds]
    assert calls == [k for o in orders for k in o] and all(sorted(o) == list("ABCD") for o in orders)
    assert len({tuple(o) for o in orders}) > 1 and list(rounds[0]["s"]) == list("ABCD")


def rounds_of(**times):
    n = len(next(iter(times.values())))
    return [{"s": {k: v[i] for k, v in times.items()}, "kept": True} for i in range(n)]


def test_the_paired_ratio_is_the_t_interval_of_the_log_ratios():
    """Closed form: exp(mean(log r) +- t_{0.975, n-1} sd / sqrt(n)) over the rounds' ratios r; a summed
    denominator and a scale enter per round; a stolen round is left out."""
    a, b, c = [2.0, 2.2, 1.9, 2.5], [1.0, 1.0, 1.1, 1.2], [0.5, 0.4, 0.5, 0.6]
    rounds = rounds_of(a=a, b=b, c=c)
    rounds.append({"s": {"a": 100.0, "b": 1.0, "c": 1.0}, "kept": False})
    logs = np.log(np.array(a) / (np.array(b) + np.array(c)) * 0.5)
    half = sp_stats.t.ppf(0.975, len(logs) - 1) * logs.std(ddof=1) / math.sqrt(len(logs))
    (row,) = harness.summarise(rounds, [Comparison("a / (b + c) x 0.5", ("a",), ("b", "c"), 0.5)])
    want = np.exp([logs.mean(), logs.mean() - half, logs.mean() + half])
    assert (row["ratio"], row["low"], row["high"]) == pytest.approx(tuple(want), rel=1e-12) and row["n"] == 4


def test_a_comparison_on_a_field_reads_each_sides_details():
    rounds = rounds_of(x=[1.0, 1.0], y=[1.0, 1.0])
    for r, (u, v) in zip(rounds, [(4.0, 2.0), (6.0, 3.0)]):
        r["details"] = {"x": {"stage": {"s": u}}, "y": {"stage": {"s": v}}}
    (row,) = harness.summarise(rounds, [Comparison("x / y, stage", ("x",), ("y",), field="stage.s")])
    assert row["ratio"] == pytest.approx(2.0) and row["n"] == 2


@pytest.mark.parametrize(
    ("low", "high", "target", "better", "want"),
    [
        (1.1, 1.3, 1.0, "higher", "met"),
        (0.7, 0.9, 1.0, "higher", "not met"),
        (0.9, 1.1, 1.0, "higher", "unresolved"),
        (2.0, 2.9, 3.0, "lower", "met"),
        (3.1, 3.5, 3.0, "lower", "not met"),
        (2.9, 3.5, 3.0, "lower", "unresolved"),
        (1.1, 1.3, None, "higher", "above 1"),
        (0.5, 0.9, None, "higher", "below 1"),
    ],
)
def test_verdicts_need_the_whole_interval_on_one_side(low, high, target, better, want):
    ratio = harness.stats.TimeRatio(math.sqrt(low * high), low, high, 5, None)
    assert harness.verdict(ratio, Comparison("r", ("a",), ("b",), target=target, better=better)) == want


def toy_record(tmp_path):
    @harness.register("toy_for_tests", harness.Arg("size", 3, "rows", int))
    def toy(args):
        """A toy benchmark."""
        return harness.Plan({"a": lambda: 0.002, "b": lambda: 0.001}, [Comparison("a / b", ("a",), ("b",))])

    try:
        args = argparse.Namespace(size=3, repeats=2, max_steal=5.0, results_dir=str(tmp_path))
        plan = toy(args)
        rounds = harness.interleave(plan.sides, 2, clock=lambda: None)
        return harness.build_record("toy_for_tests", args, ["--repeats", "2"], plan, rounds, [0.0, 0.0], {})
    finally:
        del harness.REGISTRY["toy_for_tests"]


def test_a_record_round_trips_and_a_broken_one_names_its_file_and_field(tmp_path):
    record = toy_record(tmp_path)
    path = harness.write_record(record, str(tmp_path))
    assert path == str(tmp_path / "toy_for_tests" / f"{record['device']['slug']}.json")
    assert harness.read_record(path) == json.loads(json.dumps(record))
    assert record["arguments"] == {"size": 3, "repeats": 2, "max_steal": 5.0}
    assert record["command"] == "python -m benchmarks run toy_for_tests --repeats 2"
    assert record["summary"][0]["ratio"] == pytest.approx(2.0) and "\n" not in open(path).read().rstrip("\n")
    del record["rounds"]
    with open(path, "w") as f:
        json.dump(record, f)
    with pytest.raises(ValueError, match=f"{path}: record has no field 'rounds'"):
        harness.read_record(path)


def test_the_committed_page_is_the_generated_one_and_an_edited_page_fails_the_check(tmp_path, capsys):
    """docs/benchmarks.md is what the committed records give; a changed figure on the page, or a changed
    record, makes `report --check` fail."""
    assert report.main(True, harness.RESULTS, report.PAGE) == 0
    page = tmp_path / "benchmarks.md"
    text = open(report.PAGE).read()
    page.write_text(text.replace("| 4 | ", "| 5 | ", 1))
    assert page.read_text() != text and report.main(True, harness.RESULTS, str(page)) == 1
    results = tmp_path / "results"
    shutil.copytree(harness.RESULTS, results)
    path = results / "step_speed" / "cpu-2core.json"
    record = json.loads(path.read_text())
    record["summary"][0]["ratio"] *= 1.01
    path.write_text(json.dumps(record))
    assert report.main(True, str(results), report.PAGE) == 1
    assert report.main(False, str(results), str(page)) == 0 and report.main(True, str(results), str(page)) == 0


def test_every_flag_has_help():
    from benchmarks import __main__ as cli

    p = cli.parser()
    subs = [a for a in p._actions if isinstance(a, argparse._SubParsersAction)]
    parsers = [*subs[0].choices.values()]
    parsers += [*next(a for a in parsers[1]._actions if isinstance(a, argparse._SubParsersAction)).choices.values()]
    for sub in parsers:
        for action in sub._actions:
            assert action.help, f"{sub.prog} {action.option_strings}"


def test_pool_speed_counts_the_kernels_of_the_entry_computation_only():
    """pool_speed.entry_ops counts the top-level instructions of ENTRY by opcode (a fusion once, not the ops
    inside it), and compiled_summary leaves out the instructions that launch nothing."""
    hlo = """HloModule m, entry_computation_layout={(f32[2]{0})->(f32[2]{0}, f32[2]{0})}

%fused (p: f32[2]) -> f32[2] {
  %p = f32[2]{0} parameter(0)
  ROOT %a = f32[2]{0} add(f32[2]{0} %p, f32[2]{0} %p)
}

ENTRY %main (x: f32[2]) -> (f32[2], f32[2]) {
  %x = f32[2]{0} parameter(0)
  %f = f32[2]{0} fusion(f32[2]{0} %x), kind=kLoop, calls=%fused
  %c = (f32[2]{0}, s8[16]{0}) custom-call(f32[2]{0} %f), custom_call_target="__cublas$gemm"
  %g = f32[2]{0} get-tuple-element((f32[2]{0}, s8[16]{0}) %c), index=0
  ROOT %t = (f32[2]{0}, f32[2]{0}) tuple(f32[2]{0} %f, f32[2]{0} %g)
}
"""
    assert pool_speed.entry_ops(hlo) == {
        "parameter": 1,
        "fusion": 1,
        "custom-call": 1,
        "get-tuple-element": 1,
        "tuple": 1,
    }

    class Compiled:  # what compiled_summary reads of a jax Compiled
        def cost_analysis(self):
            return {"flops": 6.0, "bytes accessed": 24.0}

        def as_text(self):
            return hlo

    summary = pool_speed.compiled_summary(Compiled())
    assert summary == {"flops": 6.0, "bytes_accessed": 24.0, "kernels": 2, "ops": {"custom-call": 1, "fusion": 1}}


@pytest.mark.slow
def test_a_tiny_benchmark_runs_end_to_end_into_its_own_results_dir(tmp_path):
    """`python -m benchmarks run selection_speed --repeats 2` on tiny pools writes one record under
    --results_dir (never the committed ones) with two kept rounds, every side timed, and the growth ratios."""
    cmd = [sys.executable, "-m", "benchmarks", "run", "selection_speed", "--repeats", "2", "--max_steal", "-1"]
    cmd += ["--pools", "500,1000", "--b", "8", "--dim", "4", "--centres", "8", "--results_dir", str(tmp_path)]
    env = {**os.environ, "JAX_PLATFORMS": "cpu"}
    p = subprocess.run(cmd, cwd=REPO, env=env, capture_output=True, text=True, timeout=600)
    assert p.returncode in (0, 3), p.stderr[-3000:]  # 3: a loaded machine's record ("not a result")
    (slug,) = [f[:-5] for f in os.listdir(tmp_path / "selection_speed")]
    record = harness.read_record(str(tmp_path / "selection_speed" / f"{slug}.json"))
    assert [r["kept"] for r in record["rounds"]] == [True, True]
    assert set(record["rounds"][0]["s"]) == {f"{s} @ {n:,}" for s in harness_strategies() for n in (500, 1000)}
    assert [r["comparison"] for r in record["summary"]][0] == "random: pool 1,000 / pool 500"
    assert (p.returncode == 3) == record["verdict"].startswith("not a result")


def harness_strategies():
    from benchmarks import selection_speed

    return selection_speed.STRATEGIES


# ---------------------------------------------------------------------------------------------- transformer_step

TINY_TEACHER = {"depth": 2, "width": 32, "heads": 4, "mlp_ratio": 2.0}
TINY_STUDENT = {"depth": 1, "width": 16, "heads": 2}


# The PyTorch twin's tests need the optional `bench` extra (torch); the README's set-up does not install it.
needs_torch = pytest.mark.skipif(
    importlib.util.find_spec("torch") is None, reason="torch is not installed: pip install -r requirements-bench.txt"
)


def tiny_transformer_args(**changes):
    """transformer_step's arguments at test sizes (8 rows: one per simulated device)."""
    from benchmarks import transformer_step

    bench = harness.load_all()["transformer_step"]
    args = argparse.Namespace(**{a.name: a.default for a in bench.args}, repeats=2, max_steal=-1.0)
    args.__dict__.update(batch_size=8, max_tokens=16, min_len=2, vocab=64, classes=5, steps=1, warmup=1)
    args.__dict__.update(teacher_kwargs=json.dumps(TINY_TEACHER), student_kwargs=json.dumps(TINY_STUDENT))
    args.__dict__.update(changes)
    transformer_step.resolve_args(args)
    return args


def flax_text_model(name, kwargs, dtype, max_tokens=16, vocab=64, classes=5):
    import jax.numpy as jnp
    import ml_collections

    from benchmarks import transformer_step
    from titans import models

    args = argparse.Namespace(classes=classes, max_tokens=max_tokens, vocab=vocab)
    cfg = ml_collections.ConfigDict({"name": name, "kwargs": kwargs})
    return models.build_model(cfg, transformer_step.text_info(args), seed=3, dtype=jnp.dtype(dtype))


@needs_torch
@pytest.mark.parametrize(
    ("name", "kwargs", "dtype", "tol"),
    [
        ("transformer", TINY_TEACHER, "float32", 1e-4),
        ("transformer_small", {}, "float32", 1e-4),
        ("transformer", TINY_TEACHER, "bfloat16", 3e-2),  # the GPU path's autocast, run on the CPU
    ],
)
def test_the_torch_twin_gives_the_flax_transformers_logits(name, kwargs, dtype, tol):
    """The PyTorch Transformer, loaded with the Flax model's initial parameters, gives its logits on token
    rows of every length (padding after them, one row a single token); bfloat16 within bfloat16's rounding."""
    import torch
    from flax import nnx

    from benchmarks import torch_transformer, transformer_step

    flax_model = flax_text_model(name, kwargs, dtype)
    desc = transformer_step.model_desc(flax_model)
    twin = torch_transformer.build(desc)
    _, params, _ = nnx.split(flax_model, nnx.Param, ...)
    n = torch_transformer.load_flax_weights(twin, nnx.to_pure_dict(params))
    assert n == len(list(twin.parameters())) == 6 + 12 * desc["depth"]  # embedding, positions, final LN, classifier
    rng = np.random.default_rng(0)
    tokens = rng.integers(1, 64, size=(6, 16)).astype(np.int32)
    tokens[np.arange(16)[None, :] >= np.array([16, 1, 5, 9, 12, 3])[:, None]] = 0
    want = np.asarray(flax_model(tokens), np.float64)
    with torch.no_grad(), torch.autocast("cpu", dtype=torch.bfloat16, enabled=dtype == "bfloat16"):
        got = twin(torch.from_numpy(tokens.astype(np.int64))).float().numpy()
    assert np.abs(got - want).max() <= tol * max(1.0, np.abs(want).max()), np.abs(got - want).max()


@needs_torch
def test_loading_flax_weights_refuses_a_missing_or_misshaped_parameter():
    from flax import nnx

    from benchmarks import torch_transformer, transformer_step

    flax_model = flax_text_model("transformer", TINY_TEACHER, "float32")
    _, params, _ = nnx.split(flax_model, nnx.Param, ...)
    pure = nnx.to_pure_dict(params)
    twin = torch_transformer.build(transformer_step.model_desc(flax_model))
    del pure["encoder"]["blocks"][1]["fc2"]["bias"]
    with pytest.raises(ValueError, match=r"not loaded from the Flax model: \['encoder.blocks.1.fc2.bias'\]"):
        torch_transformer.load_flax_weights(twin, pure)
    pure["encoder"]["pos"] = np.zeros((8, 32), np.float32)
    with pytest.raises(ValueError, match=r"encoder.pos: torch \(16, 32\) vs Flax \(8, 32\)"):
        torch_transformer.load_flax_weights(twin, pure)
    with pytest.raises(NotImplementedError, match="pool='cls'"):
        torch_transformer.build({**transformer_step.model_desc(flax_model), "pool": "cls"})


def test_synthetic_token_batches_are_padded_rows_of_the_asked_lengths():
    from benchmarks import transformer_step

    args = argparse.Namespace(num_batches=3, batch_size=256, max_tokens=16, min_len=4, vocab=50, classes=5)
    tokens, labels = transformer_step.token_batches(args, np.random.default_rng(0))
    for t, y in zip(tokens, labels):
        assert t.shape == (256, 16) and t.dtype == np.int32 and y.shape == (256,) and 0 <= y.min() <= y.max() < 5
        lengths = (t != 0).sum(1)
        assert (t[np.arange(16)[None, :] < lengths[:, None]] != 0).all()  # real tokens first, padding after
        assert lengths.min() == 4 and lengths.max() == 16 and t.max() < 50


def test_model_flops_count_every_matmul_of_the_step():
    """Closed form for a 1-block, width-8, MLP-16 model on 2 rows of 4 tokens and 3 classes: q,k,v and the
    output projection 2*4*(4*8*8), the MLP 2*4*(2*8*16), scores and mixing 2*2*4*4*8, the classifier 2*8*3;
    a training step is 3 forwards, the KD step adds the teacher's forward."""
    from benchmarks import transformer_step

    desc = {"width": 8, "mlp_dim": 16, "depth": 1, "num_classes": 3}
    one_row = 2 * 4 * 4 * 8 * 8 + 2 * 4 * 2 * 8 * 16 + 2 * 2 * 4 * 4 * 8 + 2 * 8 * 3
    assert transformer_step.model_flops(desc, 2, 4) == 2 * one_row
    student = {**desc, "width": 4, "mlp_dim": 8}
    descs = {"teacher": desc, "student": student}
    assert transformer_step.step_model_flops(descs, "teacher", 2, 4) == 3 * 2 * one_row
    kd = transformer_step.step_model_flops(descs, "kd", 2, 4)
    assert kd == 3 * transformer_step.model_flops(student, 2, 4) + 2 * one_row


def test_the_gpu_path_is_guarded_and_its_peak_known():
    from benchmarks import transformer_step

    assert transformer_step.peak_flops("NVIDIA H100 80GB HBM3") == 989e12
    assert transformer_step.peak_flops("NVIDIA H200") == 989e12
    assert transformer_step.peak_flops("NVIDIA H100 PCIe") == 756e12
    assert transformer_step.peak_flops("NVIDIA A100-SXM4-40GB") == 312e12
    assert transformer_step.peak_flops("NVIDIA L40S") is None and transformer_step.peak_flops("Tesla T4") is None
    with pytest.raises(SystemExit, match="JAX sees no GPU"):
        transformer_step.require_gpu(["cpu"], None)
    with pytest.raises(SystemExit, match="torch sees no CUDA device"):
        transformer_step.require_gpu(["gpu"], False)
    transformer_step.require_gpu(["gpu"], True)
    transformer_step.require_gpu(["gpu"], None)  # --skip_torch


def test_numerics_pass_uses_the_dtypes_tolerance():
    from benchmarks import transformer_step

    def out(dtype, logit_diff, step1, step2):
        steps = {k: {"jax": [2.0, 1.0], "step1_abs_diff": step1, "step2_rel_diff": step2} for k in ("teacher", "kd")}
        logits = {f"{r}_logits_max_abs_diff": logit_diff for r in ("teacher", "student")}
        return {"dtype": dtype, **steps, **logits, **{f"{r}_logits_max_abs": 1.0 for r in ("teacher", "student")}}

    assert transformer_step.numerics_pass(out("float32", 5e-5, 1e-4, 1e-4))
    assert not transformer_step.numerics_pass(out("float32", 5e-3, 1e-4, 1e-4))
    assert not transformer_step.numerics_pass(out("float32", 5e-5, 5e-4, 1e-4))  # 2.5e-4 relative to |loss| 2
    assert not transformer_step.numerics_pass(out("float32", 5e-5, 1e-4, 2e-3))
    assert transformer_step.numerics_pass(out("bfloat16", 5e-3, 1e-2, 2e-2))


@needs_torch
def test_the_transformer_plan_times_titans_and_torch_steps_that_agree(tmp_path):
    """At test sizes, without torch.compile, with a weight decay large enough to show in one step: the plan's
    numerics check passes (the same logits, and the same losses over two AdamW steps of each kind), XLA's FLOPs
    of each compiled step (summed over the devices) are at least the model's matmul FLOPs and not far above,
    every side runs and reports its FLOP/s, and the ratios pair each PyTorch step with the Titans step of its
    kind."""
    from benchmarks import transformer_step

    args = tiny_transformer_args(skip_compile=True, learning_rate=0.01, weight_decay=0.5)
    plan = transformer_step.transformer_step(args)
    numerics = plan.facts["numerics"]
    assert numerics["pass"], numerics
    assert numerics["teacher"]["jax"][1] != numerics["teacher"]["jax"][0]  # the update changed the loss
    for kind in ("teacher", "kd"):
        xla, model = plan.facts["xla_flops_per_step"][kind], plan.facts["model_flops_per_step"][kind]
        assert model <= xla <= 2 * model, (kind, xla, model)  # 8 devices: the optimizer's update counts 8 times
    assert set(plan.sides) == {"titans teacher", "eager teacher", "titans kd", "eager kd"}
    for name, side in plan.sides.items():
        out = side()
        assert out["s"] > 0 and out["xla_gflop_per_s"] > 0 and "mfu" not in out, name
    assert [(c.num, c.den, c.target) for c in plan.comparisons] == [
        (("eager teacher",), ("titans teacher",), 1.0),
        (("eager kd",), ("titans kd",), 1.0),
    ]
    assert plan.variant == "custom" and plan.facts["models"]["student"]["width"] == 16

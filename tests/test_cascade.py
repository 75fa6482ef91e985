"""Tests of titans.cascade: gates against numpy, sweeps against loops, and the runner against a naive cascade.

The runner tests use real small titans.models networks on 8x8x1 inputs and check, besides the
answers, that each later stage ran exactly on the examples deferred to it: by the runner's counters
and by a wrapper around the stage that records every row it is given (from inside the jitted call).
"""

from __future__ import annotations

import json
import os
import subprocess
import sys

import jax
import jax.numpy as jnp
import numpy as np
import pytest
from flax import nnx
from helpers import REPO, digits_config

from titans import cascade, models, parallel
from titans.cascade import runner as runner_lib
from titans.runs import FrozenModel as Teacher

C = 10
SHAPE = (8, 8, 1)


# ----------------------------------------------------------------------------------------------
# Gates


def _np_softmax(z):
    z = z - z.max(-1, keepdims=True)
    e = np.exp(z)
    return e / e.sum(-1, keepdims=True)


@pytest.fixture(scope="module")
def logits():
    rng = np.random.RandomState(0)
    return (rng.randn(64, C + 1) * rng.uniform(0.1, 4.0, (64, 1))).astype(np.float32)


def test_gates_match_numpy(logits):
    p = _np_softmax(logits[:, :C].astype(np.float64))
    ps = np.sort(p, -1)
    ref = {"msp": 1 - p.max(-1), "margin": -(ps[:, -1] - ps[:, -2]), "entropy": -(p * np.log(p)).sum(-1)}
    for name, want in ref.items():
        gate = cascade.get_gate(name, num_classes=C)
        # The same gate on (C,) rows and on (C+1,) rows of a defer student reads the first C logits.
        np.testing.assert_allclose(jax.jit(jax.vmap(gate))(logits), want, rtol=1e-5, atol=1e-6, err_msg=name)
        np.testing.assert_allclose(jax.vmap(gate)(logits[:, :C]), want, rtol=1e-5, atol=1e-6, err_msg=name)
        np.testing.assert_allclose(jax.vmap(cascade.GATES[name])(logits[:, :C]), want, rtol=1e-5, atol=1e-6)
    p_all = _np_softmax(logits.astype(np.float64))
    want = np.log(p_all[:, -1] / p_all[:, :C].max(-1))  # the rule "defer iff p_defer > max_k p_k"
    np.testing.assert_allclose(
        jax.vmap(cascade.get_gate("defer_output", num_classes=C))(logits), want, rtol=1e-5, atol=1e-5
    )
    np.testing.assert_allclose(jax.vmap(cascade.defer_output)(logits), want, rtol=1e-5, atol=1e-5)


def test_gate_errors_and_flops():
    with pytest.raises(ValueError, match="msp, margin, entropy, defer_output"):
        cascade.get_gate("maxprob")
    with pytest.raises(ValueError, match="Did you mean 'margin'"):
        cascade.get_gate("margins")
    with pytest.raises(ValueError, match="C|outputs"):
        jax.vmap(cascade.get_gate("defer_output", num_classes=C))(jnp.zeros((2, C)))
    with pytest.raises(ValueError, match="vmap"):
        cascade.msp(jnp.zeros((2, C)))
    for name in cascade.GATES:
        width = C + 1 if name == "defer_output" else C
        f = cascade.gate_flops(cascade.get_gate(name, num_classes=C), width)
        assert 0 < f < 1000, (name, f)


def test_learned_gate_predicts_where_teacher_wins():
    """Synthetic task: the student is wrong mostly where its margin is small; the teacher is always right."""
    rng = np.random.RandomState(0)
    n = 4000
    s = (rng.randn(n, C) * rng.uniform(0.2, 3.0, (n, 1))).astype(np.float32)
    p = np.sort(_np_softmax(s), -1)
    m = p[:, -1] - p[:, -2]
    student_right = rng.rand(n) < 1 / (1 + np.exp(-(m - 0.15) * 30))
    top = s.argmax(-1)
    labels = np.where(student_right, top, (top + 1 + rng.randint(0, C - 1, n)) % C)
    t = np.eye(C, dtype=np.float32)[labels] * 5.0
    tr, te = slice(0, n // 2), slice(n // 2, n)
    gate = cascade.train_learned_gate(s[tr], t[tr], labels[tr], hidden=16, steps=300, seed=0)
    scores = jax.jit(jax.vmap(gate.score))(s[te])
    target = cascade.deferral_targets(s[te], t[te], labels[te])
    assert cascade.auroc(np.asarray(scores), target) > 0.8
    assert gate.flops_per_example(C) > 0

    # The other target, the penultimate-features input, and a C+1-output student.
    feats = rng.randn(n, 4).astype(np.float32)
    s1 = np.concatenate([s, rng.randn(n, 1).astype(np.float32)], -1)
    g2 = cascade.train_learned_gate(
        s1[tr], t[tr], labels[tr], student_features=feats[tr], steps=20, target="teacher_lower_loss"
    )
    assert jax.vmap(g2.score)(s1[te], feats[te]).shape == (n // 2,)
    assert g2.flops_per_example(C + 1) > 0
    with pytest.raises(ValueError, match="features"):
        g2.score(s1[0])


def test_auroc_reference():
    rng = np.random.RandomState(1)
    scores, targets = rng.randint(0, 5, 300).astype(float), rng.rand(300) < 0.4
    pos, neg = scores[targets], scores[~targets]
    want = np.mean((pos[:, None] > neg[None]) + 0.5 * (pos[:, None] == neg[None]))
    assert cascade.auroc(scores, targets) == pytest.approx(want)


# ----------------------------------------------------------------------------------------------
# Sweeps, thresholds, cost


def test_sweep_equals_python_loop():
    rng = np.random.RandomState(2)
    n = 500
    scores = rng.rand(n).astype(np.float32)
    labels = rng.randint(0, C, n)
    s_pred = np.where(rng.rand(n) < 0.6, labels, rng.randint(0, C, n))
    t_pred = np.where(rng.rand(n) < 0.9, labels, rng.randint(0, C, n))
    thresholds = np.concatenate([[-1.0], np.sort(rng.rand(20)), [2.0]]).astype(np.float32)
    out = cascade.sweep(scores, s_pred, t_pred, labels, thresholds, num_classes=C)
    for j, thr in enumerate(thresholds):
        defer = scores > thr
        pred = np.where(defer, t_pred, s_pred)
        assert out["accuracy"][j] == pytest.approx(np.mean(pred == labels))
        assert out["deferral_rate"][j] == pytest.approx(np.mean(defer))
        per_class = [defer[labels == c].mean() for c in range(C)]
        np.testing.assert_allclose(out["per_class_deferral_rate"][j], per_class, rtol=1e-6)
    assert out["per_class_deferral_rate"].shape == (len(thresholds), C)


@pytest.mark.parametrize("n", [7, 100, 1001])
def test_threshold_for_rate(n):
    scores = np.random.RandomState(n).randn(n).astype(np.float32)
    for rate in (0.0, 0.05, 0.1, 0.3, 0.5, 0.77, 1.0):
        thr = cascade.threshold_for_rate(scores, rate)
        achieved = np.mean(scores > np.float32(thr))
        assert rate - 1.0 / n - 1e-12 <= achieved <= rate + 1e-12, (rate, achieved)
    # Ties at the cut defer fewer, never more.
    tied = np.array([0.5] * 10 + [0.1] * 10, np.float32)
    assert np.mean(tied > cascade.threshold_for_rate(tied, 0.3)) == 0.0
    assert np.mean(tied > cascade.threshold_for_rate(tied, 0.5)) == 0.5
    with pytest.raises(ValueError):
        cascade.threshold_for_rate(scores, 1.5)


def test_threshold_for_cost_and_amortized_cost():
    scores = np.random.RandomState(3).rand(1000)
    thr = cascade.threshold_for_cost(scores, 10.0, 1.0, 100.0, 41.0)  # rate 0.3
    assert np.mean(scores > thr) == pytest.approx(0.3, abs=1e-3)
    assert cascade.amortized_cost(10.0, 1.0, 100.0, np.mean(scores > thr)) <= 41.0 + 1e-9
    with pytest.raises(ValueError, match="below the student"):
        cascade.threshold_for_cost(scores, 10.0, 1.0, 100.0, 5.0)
    np.testing.assert_allclose(cascade.amortized_cost(1.0, 0.5, 10.0, np.array([0.0, 0.5])), [1.5, 6.5])
    # k stages: reach fractions weight each stage and the gate after it.
    assert cascade.amortized_cost_k([1, 10, 100], [0.5, 0.5], [1.0, 0.4, 0.1]) == pytest.approx(1.5 + 4.2 + 10)


def _naive_cascade(stage_scores, stage_preds, thresholds):
    n, k = len(stage_preds[0]), len(stage_preds)
    preds, by = np.zeros(n, int), np.zeros(n, int)
    for e in range(n):
        for i in range(k):
            if i == k - 1 or not stage_scores[i][e] > thresholds[i]:
                preds[e], by[e] = stage_preds[i][e], i
                break
    return preds, by


def test_cascade_predictions_match_naive_loop():
    rng = np.random.RandomState(4)
    n, k = 200, 4
    scores = [rng.rand(n).astype(np.float32) for _ in range(k - 1)]
    preds = [rng.randint(0, C, n) for _ in range(k)]
    labels = rng.randint(0, C, n)
    grid = rng.rand(30, k - 1).astype(np.float32)
    vp, vb = jax.jit(jax.vmap(lambda t: cascade.cascade_predictions(scores, preds, t)))(grid)
    res = cascade.cascade_sweep(scores, preds, labels, grid)
    for g in range(len(grid)):
        p, b = _naive_cascade(scores, preds, grid[g])
        np.testing.assert_array_equal(vp[g], p)
        np.testing.assert_array_equal(vb[g], b)
        assert res["accuracy"][g] == pytest.approx(np.mean(p == labels))
        np.testing.assert_allclose(res["reach_fraction"][g], [np.mean(b >= i) for i in range(k)], rtol=1e-6)
    p, b = cascade.cascade_predictions(scores, preds, list(grid[0]))  # plain lists work too
    np.testing.assert_array_equal(b, vb[0])


def test_plan_buffers():
    assert runner_lib.plan_buffers(0, (4, 8)) == []
    assert runner_lib.plan_buffers(3, (4, 8)) == [(4, 3)]
    assert runner_lib.plan_buffers(5, (4, 8)) == [(8, 5)]
    assert runner_lib.plan_buffers(8, (8, 4)) == [(8, 8)]
    assert runner_lib.plan_buffers(19, (4, 8)) == [(8, 8), (8, 8), (4, 3)]
    assert runner_lib.plan_buffers(21, (4, 8)) == [(8, 8), (8, 8), (8, 5)]
    assert cascade.pow2_capacities(512) == (64, 128, 256, 512)
    assert cascade.pow2_capacities(20, 8) == (8, 16, 24)
    ladder = cascade.capacity_ladder(512, 8, 0.125)
    assert ladder[-1] == 512 and all(c % 8 == 0 for c in ladder)
    for n in range(1, 513):
        cap = runner_lib.plan_buffers(n, ladder)[0][0]
        assert cap - (-(-n // 8) * 8) <= 0.125 * n + 1e-9


# ----------------------------------------------------------------------------------------------
# Runner


def _model(name, seed, num_classes=C, **kw):
    """A titans.models network with He-normal weights drawn by numpy.

    Built abstractly and filled from numpy: XLA's compile of the random initialiser alone takes
    seconds here, and the tests only need distinct, reasonably scaled networks.
    """
    abstract = nnx.eval_shape(
        lambda: models.create_model(name, num_classes=num_classes, input_shape=SHAPE, rngs=nnx.Rngs(seed), **kw)
    )
    graphdef, state = nnx.split(abstract)
    rng = np.random.default_rng(seed)

    def fill(path, leaf):
        name = [p.key for p in path if isinstance(p, jax.tree_util.DictKey)][-1]
        if jax.dtypes.issubdtype(leaf.dtype, jax.dtypes.prng_key):
            return jax.random.key(seed)
        if name in ("scale", "var"):
            value = rng.uniform(0.5, 1.5, leaf.shape)
        elif name in ("bias", "mean"):
            value = rng.normal(0.0, 0.1, leaf.shape)
        elif name == "count":
            value = np.zeros(leaf.shape)
        else:
            value = rng.standard_normal(leaf.shape) * np.sqrt(2.0 / np.prod(leaf.shape[:-1]))
        return jnp.asarray(value.astype(leaf.dtype))

    return nnx.merge(graphdef, jax.tree_util.tree_map_with_path(fill, state))


@pytest.fixture(scope="module")
def nets():
    tiny = _model("mlp", 0, hidden=(16,))
    student = _model("cnn", 1, channels=(4,), dense=16)
    teacher = _model("cnn", 2, channels=(8, 16), dense=32)
    graphdef, params, rest = nnx.split(teacher, nnx.Param, ...)
    return {
        "tiny": tiny,
        "student": student,
        "teacher": teacher,
        "teacher_struct": Teacher(graphdef=graphdef, params=params, model_state=rest),
    }


class RowRecorder:
    """Wraps a stage; records, from inside the jitted call, every buffer of rows the stage is given."""

    def __init__(self, fn):
        self.fn, self.buffers = fn, []

    def __call__(self, x):
        jax.debug.callback(lambda b: self.buffers.append(np.array(b)), x)
        return self.fn(x)

    def rows_seen(self, images):
        """Per buffer: the batch indices of its distinct rows, and its size."""
        jax.effects_barrier()
        key = {images[i].tobytes(): i for i in range(len(images))}
        return [([key[r.tobytes()] for r in np.unique(b.reshape(len(b), -1), axis=0)], len(b)) for b in self.buffers]


def _logits(model, x):
    graphdef, state = nnx.split(model)
    return np.asarray(jax.jit(lambda st, x: nnx.merge(graphdef, st)(x, train=False))(state, x))


def _images(seed, n):
    return np.random.RandomState(seed).randn(n, *SHAPE).astype(np.float32)


@pytest.mark.parametrize(
    "capacities,rate", [((4, 8, 16, 32), 0.3), ((8,), 0.7), ((3, 5), 0.45), (None, 0.1), ((16, 32), 1.0), ((4, 8), 0.0)]
)
def test_runner_two_stages_matches_naive(nets, capacities, rate):
    """Student where kept, teacher where deferred; the teacher sees each deferred row once, nothing else."""
    x = _images(5, 32)
    gate = cascade.get_gate("msp", num_classes=C)
    s_logits, t_logits = _logits(nets["student"], x), _logits(nets["teacher"], x)
    scores = np.asarray(jax.vmap(gate)(s_logits))
    thr = cascade.threshold_for_rate(scores, rate)
    defer = scores > thr
    teacher = RowRecorder(nets["teacher_struct"].apply)
    runner = cascade.CascadeRunner([nets["student"], teacher], [gate], [thr], capacities=capacities)
    runner.warmup(x)
    teacher.buffers.clear()
    traces = runner.trace_counts.copy()
    out = runner(x)

    np.testing.assert_array_equal(out.predictions, np.where(defer, t_logits.argmax(-1), s_logits.argmax(-1)))
    np.testing.assert_allclose(out.logits, np.where(defer[:, None], t_logits, s_logits), rtol=1e-5, atol=1e-5)
    np.testing.assert_array_equal(out.answered_by, defer.astype(int))
    n_def = int(defer.sum())
    assert list(out.ran) == [32, n_def] and list(runner.counters["ran"]) == [32, n_def]
    caps = runner.capacities_for(32)
    expected_rows = sum(c for c, _ in runner_lib.plan_buffers(n_def, caps))
    assert runner.counters["padded"][1] == expected_rows - n_def
    seen = teacher.rows_seen(x)
    got = sorted(i for rows, _ in seen for i in rows)
    assert got == sorted(np.nonzero(defer)[0].tolist())  # each deferred row exactly once, no other row
    assert sum(size for _, size in seen) == n_def + runner.counters["padded"][1]
    assert all(size in caps for _, size in seen)
    np.testing.assert_array_equal(runner.trace_counts, traces)  # warmup compiled every capacity


def test_runner_overflow_many_batches_no_recompile(nets):
    """Several batches at different deferral counts, beyond the largest capacity: one compile per capacity."""
    gate = cascade.get_gate("entropy", num_classes=C)
    runner = cascade.CascadeRunner([nets["student"], nets["teacher_struct"].apply], [gate], [0.0], capacities=(4, 8))
    x0 = _images(6, 40)
    runner.warmup(x0)
    traces = runner.trace_counts.copy()
    assert list(traces) == [1, 2]
    total_def = 0
    for seed, rate in zip(range(7, 12), (0.0, 0.12, 0.5, 0.8, 1.0)):
        x = _images(seed, 40)
        s_logits, t_logits = _logits(nets["student"], x), _logits(nets["teacher"], x)
        scores = np.asarray(jax.vmap(gate)(s_logits))
        runner.thresholds = [cascade.threshold_for_rate(scores, rate)]
        defer = scores > runner.thresholds[0]
        out = runner(x)
        np.testing.assert_array_equal(out.predictions, np.where(defer, t_logits.argmax(-1), s_logits.argmax(-1)))
        total_def += int(defer.sum())
    np.testing.assert_array_equal(runner.trace_counts, traces)
    assert runner.counters["ran"][1] == total_def and runner.counters["batches"] == 5


def test_runner_three_stages_matches_naive(nets):
    x = _images(12, 48)
    gate = cascade.get_gate("margin", num_classes=C)
    logit = [_logits(nets[n], x) for n in ("tiny", "student", "teacher")]
    scores = [np.asarray(jax.vmap(gate)(lg)) for lg in logit[:2]]
    thr = [cascade.threshold_for_rate(scores[0], 0.6), cascade.threshold_for_rate(scores[1], 0.5)]
    want_pred, want_by = _naive_cascade(scores, [lg.argmax(-1) for lg in logit], thr)
    recorders = [RowRecorder(lambda x, m=nets[n]: m(x, train=False)) for n in ("student", "teacher")]
    runner = cascade.CascadeRunner([nets["tiny"], *recorders], [gate, gate], thr, capacities=(4, 8, 16))
    out = runner(x)
    np.testing.assert_array_equal(out.predictions, want_pred)
    np.testing.assert_array_equal(out.answered_by, want_by)
    want_logits = np.choose(want_by[:, None], logit)
    np.testing.assert_allclose(out.logits, want_logits, rtol=1e-5, atol=1e-5)
    for stage, rec in zip((1, 2), recorders):
        got = sorted(i for rows, _ in rec.rows_seen(x) for i in rows)
        assert got == np.nonzero(want_by >= stage)[0].tolist()
        assert out.ran[stage] == len(got)
    assert (want_by == 2).sum() > 0 and (want_by == 1).sum() > 0  # every stage answered something


def test_runner_defer_output_student(nets):
    """A C+1-output student: gate on the defer output, answers and output logits on its first C."""
    x = _images(13, 24)
    student = _model("cnn", 3, num_classes=C + 1, channels=(4,), dense=16)
    s_logits, t_logits = _logits(student, x), _logits(nets["teacher"], x)
    scores = np.asarray(jax.vmap(cascade.defer_output)(s_logits))
    thr = cascade.threshold_for_rate(scores, 0.4)
    defer = scores > thr
    runner = cascade.CascadeRunner(
        [student, nets["teacher"]], [cascade.get_gate("defer_output", num_classes=C)], [thr], capacities=(8, 16)
    )
    out = runner(x)
    assert out.logits.shape == (24, C)
    np.testing.assert_array_equal(out.predictions, np.where(defer, t_logits.argmax(-1), s_logits[:, :C].argmax(-1)))


def test_runner_on_mesh_equals_single_device(nets):
    mesh = parallel.make_mesh()
    assert mesh.devices.size == 8
    x = _images(14, 64)
    gate = cascade.get_gate("msp", num_classes=C)
    scores = np.asarray(jax.vmap(gate)(_logits(nets["student"], x)))
    thr = [cascade.threshold_for_rate(scores, 0.6)]  # 38 deferred > 32: two buffers
    stages = [nets["student"], nets["teacher_struct"].apply]
    ref = cascade.CascadeRunner(stages, [gate], thr, capacities=(8, 16, 32))(x)
    runner = cascade.CascadeRunner(stages, [gate], thr, capacities=(8, 16, 32), mesh=mesh)
    out = runner(x)
    np.testing.assert_array_equal(out.predictions, ref.predictions)
    np.testing.assert_array_equal(out.answered_by, ref.answered_by)
    np.testing.assert_allclose(out.logits, ref.logits, rtol=1e-5, atol=1e-5)
    np.testing.assert_array_equal(out.ran, ref.ran)
    assert out.logits.sharding.spec == jax.sharding.PartitionSpec("data")
    with pytest.raises(ValueError, match="multiples of the 8 devices"):
        cascade.CascadeRunner(stages, [gate], thr, capacities=(4, 8), mesh=mesh)
    with pytest.raises(ValueError, match="not divisible"):
        runner(x[:60])


def test_runner_argument_errors(nets):
    gate = cascade.get_gate("msp")
    with pytest.raises(ValueError, match="2 stages need 1 gates"):
        cascade.CascadeRunner([nets["student"], nets["teacher"]], [], [0.1])
    with pytest.raises(ValueError, match="thresholds"):
        cascade.CascadeRunner([nets["student"], nets["teacher"]], [gate], [0.1, 0.2])
    with pytest.raises(ValueError, match="positive"):
        cascade.CascadeRunner([nets["student"], nets["teacher"]], [gate], [0.1], capacities=(0, 4))


# ----------------------------------------------------------------------------------------------
# End to end on digits: a pipeline with a cascade section, then the runner's command line.


@pytest.fixture(scope="module")
def digits_cascade(data_dir, tmp_path_factory):
    import ml_collections

    from titans import experiment

    workdir = str(tmp_path_factory.mktemp("cascade"))
    c = ml_collections.ConfigDict()
    c.stage_order = ("teacher", "tiny", "tiny_defer")
    c.stages = ml_collections.ConfigDict()
    c.stages.teacher = digits_config(data_dir, total_steps=150, **{"dataset.train_split": "train[:80%]"})
    for name, objective in (("tiny", "easy_weighted"), ("tiny_defer", "defer")):
        s = digits_config(data_dir, total_steps=60, **{"dataset.train_split": "train[:80%]"})
        s.model.kwargs.hidden = (8,)
        s.distill.teacher_workdir = "@teacher"
        s.distill.objective = objective
        s.distill.allow_in_sample_teacher = True  # the defer target reads the teacher's own training rows
        c.stages[name] = s
    c.cascade = ml_collections.ConfigDict(
        dict(
            teacher="teacher",
            students=("tiny", "tiny_defer"),
            val_split="train[80%:]",
            test_split="test",
            gates=("msp", "defer_output", "learned"),
            runner_gates=("msp", "defer_output"),
            num_thresholds=21,
            batch_size=60,
            target_deferral_rates=(0.2, 0.5),
        )
    )
    return workdir, experiment.run_experiment(c, workdir)


def test_cascade_evaluation_outputs(digits_cascade):
    workdir, out = digits_cascade
    res = json.load(open(os.path.join(workdir, "cascade.json")))
    assert res["batch_size"] == 64 and res["test_examples"] == 360  # 60 rounded up to the 8 devices
    assert set(res["students"]["tiny"]["gates"]) == {"msp", "learned"}  # no defer output without the objective
    assert set(res["students"]["tiny_defer"]["gates"]) == {"msp", "defer_output", "learned"}
    # The raw output carries the whole pipeline config and the code revision that evaluated it.
    assert res["config"]["cascade"]["students"] == ["tiny", "tiny_defer"] and "tiny_defer" in res["config"]["stages"]
    assert {"revision", "dirty", "titans_version"} <= set(res)
    t = res["teacher"]
    for name, s in res["students"].items():
        assert s["flops_per_example"] < t["flops_per_example"]
        for gate, g in s["gates"].items():
            curve = g["curve"]
            acc = np.array(curve["test_accuracy"])
            # Ends of the curve: nothing deferred is the student, everything deferred is the teacher.
            assert acc[0] == pytest.approx(s["test_accuracy"]) and acc[-1] == pytest.approx(t["test_accuracy"])
            assert curve["test_deferral_rate"][0] == 0.0 and curve["test_deferral_rate"][-1] == 1.0
            np.testing.assert_allclose(
                curve["amortized_flops"],
                s["flops_per_example"]
                + g["gate_flops_per_example"]
                + np.array(curve["test_deferral_rate"]) * t["flops_per_example"],
                rtol=1e-6,
            )
            # The real runner is checked at both target rates for the runner gates, and only for them.
            assert len(g["at_deferral_rate"]) == (2 if gate in ("msp", "defer_output") else 0), (name, gate)
            for r, p in g["at_deferral_rate"].items():
                # The real runner's answers are the offline sweep's.
                assert p["runner_disagreements_with_sweep"] == 0, (name, gate, r)
                assert p["runner_test_accuracy"] == pytest.approx(p["test_accuracy"])
                assert p["runner_test_deferral_rate"] == pytest.approx(p["test_deferral_rate"])
                assert len(p["per_class_test_deferral_rate"]) == 10
            # The budget holds on the validation split, where the threshold was chosen.
            p = g["at_cost_fraction"]["0.5"]
            val_cost = (
                s["flops_per_example"] + g["gate_flops_per_example"] + p["val_deferral_rate"] * t["flops_per_example"]
            )
            assert val_cost <= 0.5 * t["flops_per_example"] + 1e-6
    for tag in ("deferral", "flops", "time"):
        assert os.path.getsize(os.path.join(workdir, f"cascade_accuracy_vs_{tag}.png")) > 1000
    assert out["cascade"]["students"].keys() == res["students"].keys()


def test_thresholds_come_from_the_validation_split_only(digits_cascade):
    """Every operating point defers the target fraction of the *validation* split, recomputed here in numpy
    from the logits the evaluation saved: a threshold chosen on the test scores would miss it by the
    sampling noise between the splits (about 0.02 here, against a tolerance of one or two examples)."""
    workdir, _ = digits_cascade
    res = json.load(open(os.path.join(workdir, "cascade.json")))
    raw = np.load(os.path.join(workdir, "cascade_logits.npz"))
    checked = 0
    for name, s in res["students"].items():
        z = raw[f"val/{name}"][:, :10].astype(np.float64)
        p_val = np.exp(z - z.max(-1, keepdims=True))
        v = 1.0 - (p_val / p_val.sum(-1, keepdims=True)).max(-1)  # the msp gate's score, in numpy
        n = len(v)
        for r, p in s["gates"]["msp"]["at_deferral_rate"].items():
            assert abs(p["val_deferral_rate"] - float(r)) <= 1 / n + 1e-9
            assert abs(np.mean(v > p["threshold"]) - float(r)) <= 2 / n + 1e-9  # float16 logits: a tie may move
            checked += 1
    assert checked == 4


def test_cascade_cli_three_stages(digits_cascade, tmp_path):
    workdir, _ = digits_cascade
    stages = ",".join(os.path.join(workdir, n) for n in ("tiny", "tiny_defer", "teacher"))
    out_file = tmp_path / "run.json"
    env = dict(os.environ, XLA_FLAGS="--xla_force_host_platform_device_count=2", JAX_PLATFORMS="cpu")
    proc = subprocess.run(
        [
            sys.executable,
            "-m",
            "titans.cascade.apply",
            f"--stages={stages}",
            "--rates=0.5,0.5",
            "--val_split=train[80%:]",
            "--batch_size=64",
            f"--out={out_file}",
        ],
        cwd=REPO,
        env=env,
        capture_output=True,
        text=True,
        timeout=600,
    )
    assert proc.returncode == 0, proc.stderr[-3000:]
    assert "accuracy" in proc.stdout
    res = json.load(open(out_file))
    assert res["num_devices"] == 2 and len(res["thresholds"]) == 2
    assert sum(res["answered_fraction"]) == pytest.approx(1.0)
    assert 0.2 < res["reach_fraction"][1] < 0.8 and 0.0 < res["reach_fraction"][2] < res["reach_fraction"][1]
    flops = res["flops_per_example"]
    assert res["amortized_flops_per_example"] < flops[0] + flops[1] + flops[2]
    # Bad input: a wrong number of rates is named.
    bad = subprocess.run(
        [sys.executable, "-m", "titans.cascade.apply", f"--stages={stages}", "--rates=0.5"],
        cwd=REPO,
        env=env,
        capture_output=True,
        text=True,
        timeout=600,
    )
    assert bad.returncode != 0 and "3 stages need 2 --rates" in bad.stderr

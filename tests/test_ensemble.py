"""B-DISTIL (titans/ensemble): the weight player, the barrier, summed logits, the connection,
anytime inference, the run with FIND-WL and its baselines, resume, and the speech path."""

import json
import logging
import os

import jax
import jax.numpy as jnp
import ml_collections
import numpy as np
import pytest
from flax import nnx
from helpers import digits_config

from titans import config as config_lib
from titans import data, experiment, losses, models, train
from titans.ensemble import anytime, members, weights
from titans.ensemble import config as ens_config

# ----------------------------------------------------------------------------- weight player


def _np_update(w, s, eta, mix):
    s = np.minimum(s / np.quantile(s, 0.99), 1.0)
    w = w * np.exp(eta * s)
    w = w / w.mean()
    return (1 - mix) * w + mix


@pytest.mark.parametrize("mode", ["example", "example_class"])
def test_weight_update_matches_numpy(mode):
    rng = np.random.default_rng(0)
    n, k = 50, 4
    f, g = rng.normal(size=(n, k)) * 2, rng.normal(size=(n, k)) * 2
    w = weights.initial_weights(n, k, mode)
    assert w.shape == ((n,) if mode == "example" else (n, k)) and np.allclose(w, 1)
    scores = weights.residual_scores(f, g, mode, temperature=2.0)
    if mode == "example":  # T^2 KL(softmax(g/T) || softmax(f/T))
        pt = np.exp(g / 2) / np.exp(g / 2).sum(-1, keepdims=True)
        pf = np.exp(f / 2) / np.exp(f / 2).sum(-1, keepdims=True)
        ref = 4 * np.sum(pt * (np.log(pt) - np.log(pf)), -1)
    else:
        ref = np.abs((g - g.mean(-1, keepdims=True)) - (f - f.mean(-1, keepdims=True)))
    np.testing.assert_allclose(scores, ref, rtol=1e-4, atol=1e-5)
    # Two rounds of the multiplicative update, against numpy.
    w_np = w.astype(np.float64)
    for _ in range(2):
        w = weights.update_weights(w, scores, eta=0.7, mix=0.2)
        w_np = _np_update(w_np, scores.astype(np.float64), 0.7, 0.2)
    np.testing.assert_allclose(w, w_np, rtol=1e-4)
    assert abs(w.mean() - 1) < 1e-5 and w.min() >= 0.2 - 1e-6
    assert w.max() / w.min() <= np.exp(2 * 0.7) + 1e-3  # at most exp(eta) per round
    # Worse-fitted examples (pairs) gain more weight: weights are monotone in the residual.
    order = np.argsort(scores.reshape(-1), kind="stable")
    assert np.all(np.diff(w.reshape(-1)[order]) >= -1e-6)


def test_weight_player_refuses_bad_input():
    with pytest.raises(ValueError, match="weight mode"):
        weights.initial_weights(3, 2, "class")
    with pytest.raises(ValueError, match="shape"):
        weights.update_weights(np.ones(3), np.ones(4), eta=1.0)
    with pytest.raises(ValueError, match="eta"):
        weights.update_weights(np.ones(3), np.ones(3), eta=-1.0)


# ------------------------------------------------------------------------ weak-learner loss


def test_log_barrier_extension_matches_numpy_and_is_smooth():
    t = 5.0
    z = np.array([-2.0, -0.5, -1 / t**2 - 1e-4, -1 / t**2 + 1e-4, 0.0, 0.3, 3.0])
    ref = np.where(z <= -1 / t**2, -np.log(-np.minimum(z, -1 / t**2)) / t, t * z - np.log(1 / t**2) / t + 1 / t)
    np.testing.assert_allclose(losses.log_barrier_extension(z, t), ref, rtol=1e-5)
    # Continuous with a continuous slope at the joint: the slope there is t from both sides.
    grad = jax.vmap(jax.grad(lambda v: losses.log_barrier_extension(v, t)))(jnp.asarray(z[2:4], jnp.float32))
    np.testing.assert_allclose(grad, [t, t], rtol=1e-2)


def _np_barrier(z, t):
    edge = -1.0 / t**2
    return -np.log(-min(z, edge)) / t if z <= edge else t * z - np.log(1.0 / t**2) / t + 1.0 / t


@pytest.mark.parametrize("scale", [0.3, 1.0, 1.5])
def test_weak_learning_barrier_is_on_the_weighted_aggregate(scale):
    """The barrier sees the batch's weighted condition sum w l(F_w) <= (1 - gamma) sum w l(F_{w-1}),
    not each row's: every row carries the same barrier value, equal to the numpy closed form; a
    batch that meets the condition pays less than one that breaks it; the example weights matter."""
    rng = np.random.default_rng(2)
    g = jnp.asarray(rng.normal(size=(8, 5)) * 2, jnp.float32)
    y = jnp.asarray(rng.integers(0, 5, 8))
    f_prev = jnp.asarray(rng.normal(size=(8, 5)), jnp.float32)
    f_w = f_prev + scale * (g - f_prev)  # scale < 1: moves toward the teacher; > 1 overshoots
    w = jnp.asarray(rng.uniform(0.2, 3.0, size=8), jnp.float32)
    per = losses.weak_learner_loss(f_w, f_prev, g, y, example_weights=w, gamma=0.1, barrier_weight=0.5, barrier_t=5.0)
    loss = np.asarray(losses.distillation_loss(f_w, g, y), np.float64)
    before = np.asarray(losses.distillation_loss(f_prev, g, y), np.float64)
    wn = np.asarray(w, np.float64)
    z = ((wn * loss).sum() - 0.9 * (wn * before).sum()) / (wn * before).sum()
    np.testing.assert_allclose(np.asarray(per) - loss, 0.5 * _np_barrier(z, 5.0), rtol=1e-4, atol=1e-5)
    other = losses.weak_learner_loss(f_w, f_prev, g, y, example_weights=w[::-1], gamma=0.1, barrier_weight=0.5)
    assert not np.allclose(np.asarray(other), np.asarray(per))  # the weights reach the condition


def test_member_method_passes_the_weight_players_weights():
    """In example mode the member's Method returns the weight player's weights for the batch's rows
    (the trainer weights the rows by them); in example-class mode they weight the residual inside."""
    from titans.ensemble import runner

    class Ctx:
        class e:
            gamma, barrier_weight, barrier_t = 0.1, 0.0, 5.0

        class member:
            class distill:
                loss, alpha, temperature = "kd", 0.9, 4.0

    table = np.linspace(0.5, 2.0, 20).astype(np.float32)
    spec = {"model": {"name": "mlp", "kwargs": {}}, "connected": False}
    method = runner._member_method(False, spec, None, table, Ctx)
    rng = np.random.default_rng(0)
    logits, g = (jnp.asarray(rng.normal(size=(4, 10)), jnp.float32) for _ in range(2))
    batch = {"index": jnp.asarray([3, 7, 11, 19]), "label": jnp.asarray([1, 2, 3, 4])}
    frozen = method.frozen
    per, weights = method.loss(logits, {"base": jnp.zeros_like(logits)}, g, batch, frozen, 0)
    np.testing.assert_array_equal(np.asarray(weights), table[[3, 7, 11, 19]])
    # With the barrier on, the weights also reach the batch's weak-learning condition.
    Ctx.e.barrier_weight = 0.5
    try:
        barred = runner._member_method(False, spec, None, table, Ctx)
        per_b, _ = barred.loss(logits, {"base": jnp.zeros_like(logits)}, g, batch, barred.frozen, 0)
    finally:
        Ctx.e.barrier_weight = 0.0
    want_b = losses.weak_learner_loss(
        logits,
        jnp.zeros_like(logits),
        g,
        batch["label"],
        gamma=0.1,
        barrier_weight=0.5,
        barrier_t=5.0,
        example_weights=jnp.asarray(table[[3, 7, 11, 19]]),
    )
    np.testing.assert_allclose(np.asarray(per_b), np.asarray(want_b), rtol=1e-6)
    pair_table = np.asarray(rng.uniform(0.1, 3.0, size=(20, 10)), np.float32)
    pair = runner._member_method(False, spec, None, pair_table, Ctx)
    per2, ones = pair.loss(logits, {"base": jnp.zeros_like(logits)}, g, batch, pair.frozen, 0)
    np.testing.assert_array_equal(np.asarray(ones), 1.0)
    want = losses.boosting_residual_loss(
        logits, g, batch["label"], pair_weights=jnp.asarray(pair_table[[3, 7, 11, 19]])
    )
    np.testing.assert_allclose(np.asarray(per2), np.asarray(want), rtol=1e-6)


def test_weak_learner_loss():
    rng = np.random.default_rng(1)
    f_prev, f_new, g = (jnp.asarray(rng.normal(size=(6, 5)), jnp.float32) for _ in range(3))
    y = jnp.asarray(rng.integers(0, 5, 6))
    plain = losses.weak_learner_loss(f_prev + f_new, f_prev, g, y, barrier_weight=0.0)
    np.testing.assert_allclose(plain, losses.distillation_loss(f_prev + f_new, g, y), rtol=1e-6)
    with_barrier = losses.weak_learner_loss(f_prev + f_new, f_prev, g, y, barrier_weight=0.3, gamma=0.1)
    assert np.all(np.asarray(with_barrier) > np.asarray(plain) - 1.0)
    # The previous members and the teacher get no gradient through it.
    gp, gg = jax.grad(
        lambda p, t: (
            losses.weak_learner_loss(p + f_new, p, t, y).sum() * 0
            + losses.weak_learner_loss(jax.lax.stop_gradient(p) + f_new, p, t, y).sum()
        ),
        argnums=(0, 1),
    )(f_prev, g)
    assert float(jnp.abs(gp).max()) == 0.0 and float(jnp.abs(gg).max()) == 0.0
    pw = jnp.asarray(rng.uniform(0.5, 2, size=(6, 5)), jnp.float32)
    r = losses.centred(g) - losses.centred(f_prev + f_new)
    np.testing.assert_allclose(
        losses.boosting_residual_loss(f_prev + f_new, g, y, pair_weights=pw),
        np.mean(np.asarray(pw) * np.asarray(r) ** 2, -1),
        rtol=1e-5,
    )


# ----------------------------------------------------------------- members and the connection


def _cnn(seed, channels=(4, 8), dense=8):
    return models.create_model(
        "cnn", num_classes=10, input_shape=(8, 8, 1), rngs=nnx.Rngs(seed), channels=channels, dense=dense
    )


def _x(n=4, seed=0):
    return jnp.asarray(np.random.default_rng(seed).normal(size=(n, 8, 8, 1)), jnp.float32)


def test_ensemble_logits_are_the_sum_of_members():
    m1, m2 = _cnn(1), _cnn(2, channels=(2, 4))
    m3 = members.ConnectedMember(_cnn(3), prev_dim=8, join="add", width=0, num_classes=10, rngs=nnx.Rngs(4))
    ens = members.Ensemble([m1, m2, m3], connected=(False, False, True), layer="features")
    x = _x()
    _, a2 = m2(x, capture=True)
    own = [m1(x), m2(x), m3(x, prev=a2["features"])]
    np.testing.assert_allclose(ens.member_logits(x), jnp.stack(own), atol=1e-5)
    np.testing.assert_allclose(ens(x), own[0] + own[1] + own[2], atol=1e-5)
    ens.active = 2
    np.testing.assert_allclose(ens(x), own[0] + own[1], atol=1e-5)
    ens.active = 3
    frozen_own, last = ens.frozen().apply(x)
    np.testing.assert_allclose(frozen_own, ens.member_logits(x), atol=1e-5)
    assert last.shape == (4, 8)
    flops = members.cumulative_flops(ens, (8, 8, 1))
    assert len(flops) == 3 and flops[0] < flops[1] < flops[2]
    assert flops[0] == pytest.approx(models.flops_per_example(m1, (8, 8, 1)), rel=0.05)


@pytest.mark.parametrize("join,width,feat", [("concat", 6, 8 + 6), ("add", 0, 8)])
def test_connection_shapes_and_frozen_previous_member(join, width, feat):
    prev = members.Ensemble([_cnn(1, dense=12)], connected=(False,), layer="features").frozen()
    assert members.activation_dim(prev, (8, 8, 1)) == 12
    new = members.ConnectedMember(_cnn(2), prev_dim=12, join=join, width=width, num_classes=10, rngs=nnx.Rngs(5))
    x = _x()
    _, acts_prev = prev.apply(x)
    logits, acts = new(x, capture=True, prev=acts_prev)
    assert logits.shape == (4, 10) and acts["features"].shape == (4, feat)
    with pytest.raises(ValueError, match="previous activations"):
        new(x, prev=jnp.zeros((4, 5)))
    with pytest.raises(ValueError, match="join"):
        members.ConnectedMember(_cnn(2), prev_dim=12, join="mul", width=4, num_classes=10, rngs=nnx.Rngs(5))
    g_new, p_new, r_new = nnx.split(new, nnx.Param, ...)

    def loss(new_params, frozen):
        own, a = frozen.apply(x)
        f = nnx.merge(g_new, new_params, r_new)(x, prev=a)
        return jnp.sum((own.sum(0) + f) ** 2)

    g_params, g_frozen = jax.grad(loss, argnums=(0, 1))(p_new, prev)
    # The earlier member is frozen: no gradient reaches it, through its logits or its activations.
    assert max(float(jnp.abs(v).max()) for v in jax.tree.leaves(g_frozen)) == 0.0
    assert float(jnp.abs(g_params["proj"]["kernel"].get_value()).max()) > 0  # the connection itself learns


# ----------------------------------------------------------------------------------- anytime


@pytest.mark.parametrize("budget", [float("inf"), 2.5])
def test_anytime_sweep_equals_naive_loop(budget):
    rng = np.random.default_rng(3)
    own = rng.normal(size=(200, 4, 5)).astype(np.float32) * 1.5
    labels = rng.integers(0, 5, 200)
    cost = np.array([1.0, 2.0, 3.0, 4.0])
    thresholds = np.array([0.0, 0.3, 0.55, 0.8, 0.95, 1.01])
    out = anytime.sweep(own, labels, cost, thresholds, budget=budget)
    for i, thr in enumerate(thresholds):
        pred, used, spent = anytime.predict_loop(own, cost, thr, budget=budget)
        assert out["accuracy"][i] == pytest.approx(np.mean(pred == labels), abs=1e-6)
        assert out["mean_members"][i] == pytest.approx(used.mean(), abs=1e-5)
        assert out["mean_cost"][i] == pytest.approx(spent.mean(), rel=1e-5)
    # Threshold 0 stops after the first member; above 1, all affordable members run.
    assert out["mean_members"][0] == 1.0
    assert out["mean_members"][-1] == (4.0 if budget == float("inf") else 2.0)
    np.testing.assert_allclose(
        out["accuracy"][-1], anytime.accuracy_by_members(own, labels)[int(out["mean_members"][-1]) - 1]
    )
    with pytest.raises(ValueError, match="one entry per member"):
        anytime.sweep(own, labels, cost[:3], thresholds)


def test_train_loader_gives_example_indices(data_dir):
    info = data.dataset_info("digits")
    src = data.get_source("digits", "train", data_dir=data_dir)
    loader = data.TrainLoader(src, info, global_batch_size=32, seed=3, with_index=True)
    for step in range(2):
        batch = next(loader)
        np.testing.assert_array_equal(batch["index"], loader.global_indices(step))
        np.testing.assert_array_equal(batch["label"], [src[int(i)]["label"] for i in batch["index"]])


# --------------------------------------------------------------------------- the B-DISTIL run


@pytest.fixture(scope="module")
def digits_teacher(data_dir, tmp_path_factory):
    workdir = str(tmp_path_factory.mktemp("bdistil_teacher"))
    train.train_and_evaluate(
        digits_config(data_dir, **{"dataset.train_split": "train[:90%]", "total_steps": 60}), workdir
    )
    return workdir


def ensemble_config(data_dir, teacher, **fields):
    c = ml_collections.ConfigDict()
    c.stages = ml_collections.ConfigDict()
    c.stage_order = ()
    e = ens_config.defaults()
    m = digits_config(
        data_dir,
        **{"dataset.train_split": "train[:90%]", "total_steps": 12, "checkpoint.every_steps": 6, "log_every_steps": 6},
    )
    m.distill.teacher_workdir = teacher
    e.member = m
    e.candidates = ml_collections.ConfigDict(
        {"wide": ens_config.model_entry("mlp", hidden=(16,)), "narrow": ens_config.model_entry("mlp", hidden=(8,))}
    )
    e.no_resched = ml_collections.ConfigDict(
        {
            "n8": ens_config.model_entry("mlp", hidden=(8,)),
            "n16": ens_config.model_entry("mlp", hidden=(16,)),
            "n64": ens_config.model_entry("mlp", hidden=(64,)),
        }
    )
    e.rounds = 2
    e.predict_batch_size = 64
    e.connect.width = 4
    e.num_thresholds = 11
    for key, value in fields.items():
        e[key] = value
    c.ensemble = e
    return c


@pytest.fixture(scope="module")
def ensemble_run(data_dir, digits_teacher, tmp_path_factory):
    workdir = str(tmp_path_factory.mktemp("bdistil"))
    out = experiment.run_experiment(ensemble_config(data_dir, digits_teacher), workdir)
    return workdir, out


def _member_outputs(workdir, variant="bdistil"):
    from titans import ensemble

    ens, _ = ensemble.load(workdir, variant)
    x = jnp.asarray(np.random.default_rng(0).integers(0, 17, size=(16, 8, 8, 1)), jnp.float32)
    return np.asarray(ens.member_logits(x)), ens


def test_bdistil_run_outputs(ensemble_run):
    workdir, out = ensemble_run
    assert not out["preempted"]
    with open(os.path.join(workdir, "ensemble.json")) as f:
        result = json.load(f)
    assert set(result["variants"]) == {"bdistil", "bdistil_noconn", "resched", "no_resched"}
    b = result["variants"]["bdistil"]
    # FIND-WL tries the smallest candidate (by FLOPs) first; "narrow" (8 hidden) meets gamma.
    assert [m["candidate"] for m in b["members"]] == ["narrow", "narrow"]
    assert [r["round"] for r in b["log"]] == [1, 2] and all(r["accepted"] for r in b["log"])
    assert b["members"][1]["connected"] and not b["members"][0]["connected"]
    assert not any(m["connected"] for m in result["variants"]["bdistil_noconn"]["members"])
    for name in ("bdistil", "bdistil_noconn", "resched"):
        v = result["variants"][name]
        assert len(v["accuracy_by_members"]) == 2 and v["cumulative_flops"][0] < v["cumulative_flops"][1]
        curve = v["anytime"]["budget_1"]
        assert len(curve["accuracy"]) == 12 and curve["mean_members"][0] == 1.0
    # resched matches B-DISTIL's sizes. No-resched is a curve: per prefix, the candidate closest in FLOPs:
    # F_1 is one 8-wide MLP (n8 has exactly its FLOPs), F_2 two of them plus the connection (n16 is closest).
    assert [m["model"] for m in result["variants"]["resched"]["members"]] == [m["model"] for m in b["members"]]
    nr = result["variants"]["no_resched"]
    assert nr["picks"] == ["n8", "n16"] and nr["budget_flops"] == b["cumulative_flops"]
    assert nr["cumulative_flops"][0] == pytest.approx(b["cumulative_flops"][0])
    assert len(nr["accuracy_by_members"]) == 2 and [m["candidate"] for m in nr["members"]] == ["n8", "n16"]
    assert result["teacher"]["flops_per_example"] > 0
    # The final member run's own evaluation is of F_2 = f_1 + f_2: its accuracy is the ensemble's.
    with open(os.path.join(b["members"][1]["workdir"], "results.json")) as f:
        assert json.load(f)["accuracy"] == pytest.approx(b["accuracy_by_members"][1], abs=1e-6)
    # The ensemble loads as one module, and its sum equals its members'.
    own, ens = _member_outputs(workdir)
    x = jnp.asarray(np.random.default_rng(0).integers(0, 17, size=(16, 8, 8, 1)), jnp.float32)
    np.testing.assert_allclose(ens(x), own.sum(0), atol=1e-5)
    assert os.path.exists(os.path.join(workdir, "ensemble.md"))
    from titans.ensemble import report

    runs = report.load([workdir])
    assert "| B-DISTIL (connected) | 2 |" in report.members_table(runs)
    assert report.paired_table(runs, "bdistil", "resched").count("\n") == 3  # header, rule, w = 1 and 2
    page = report.render(runs)
    assert "against the no-resched curve" in page and "unresolved" in page  # one seed: nothing is resolved


def test_resume_mid_ensemble_gives_the_same_result(ensemble_run, data_dir, digits_teacher, tmp_path):
    full_dir, _ = ensemble_run
    workdir = str(tmp_path)
    # "Interrupted" after round 1 (the run ends there), then rerun with the full number of rounds.
    experiment.run_experiment(ensemble_config(data_dir, digits_teacher, rounds=1, variants=("bdistil",)), workdir)
    with open(os.path.join(workdir, "bdistil", "state.json")) as f:
        assert len(json.load(f)["members"]) == 1
    round1 = os.path.getmtime(os.path.join(workdir, "bdistil", "round1", "narrow", "results.json"))
    experiment.run_experiment(ensemble_config(data_dir, digits_teacher, variants=("bdistil",)), workdir)
    assert os.path.getmtime(os.path.join(workdir, "bdistil", "round1", "narrow", "results.json")) == round1
    resumed, _ = _member_outputs(workdir)
    full, _ = _member_outputs(full_dir)
    np.testing.assert_allclose(resumed, full, atol=1e-5)
    np.testing.assert_allclose(
        np.load(os.path.join(workdir, "bdistil", "weights_round2.npy")),
        np.load(os.path.join(full_dir, "bdistil", "weights_round2.npy")),
        rtol=1e-6,
    )


def test_find_wl_stops_cleanly_when_no_candidate_meets_the_condition(data_dir, digits_teacher, tmp_path, caplog):
    caplog.set_level(logging.INFO)
    cfg = ensemble_config(data_dir, digits_teacher, rounds=1, gamma=0.999, variants=("bdistil", "resched"))
    out = experiment.run_experiment(cfg, str(tmp_path))
    assert not out["preempted"]
    printed = caplog.text
    assert "no candidate met the weak-learning condition" in printed and "skipped" in printed
    with open(tmp_path / "bdistil" / "state.json") as f:
        state = json.load(f)
    assert state["members"] == [] and "round 1" in state["stopped"]
    assert [r["candidate"] for r in state["log"]] == ["narrow", "wide"]  # both sizes were tried
    assert not any(r["accepted"] for r in state["log"])
    with pytest.raises(ValueError, match="no members"):
        from titans import ensemble

        ensemble.load(str(tmp_path), "bdistil")


def test_example_class_weights_run(data_dir, digits_teacher, tmp_path):
    cfg = ensemble_config(data_dir, digits_teacher, rounds=1, weights="example_class", variants=("bdistil",))
    experiment.run_experiment(cfg, str(tmp_path))
    w2 = np.load(tmp_path / "bdistil" / "weights_round2.npy")
    assert w2.shape == (len(data.get_source("digits", "train[:90%]", data_dir=data_dir)), 10)
    assert abs(w2.mean() - 1) < 1e-4 and w2.std() > 0


def test_ensemble_config_errors(data_dir, digits_teacher):
    cfg = ensemble_config(data_dir, digits_teacher)
    cfg.ensemble.gama = 0.1
    with pytest.raises(config_lib.ConfigError, match="ensemble.gamma"):
        experiment.run_experiment(cfg, "/nonexistent/never")
    cfg = ensemble_config(data_dir, digits_teacher, weights="pairs")
    with pytest.raises(config_lib.ConfigError, match="weights"):
        ens_config.validate(cfg)
    cfg = ensemble_config(data_dir, digits_teacher, variants=("bdistil", "boost"))
    with pytest.raises(config_lib.ConfigError, match="boost"):
        ens_config.validate(cfg)
    cfg = ensemble_config(data_dir, digits_teacher)
    cfg.ensemble.member.distill.teacher_workdir = ""
    with pytest.raises(config_lib.ConfigError, match="teacher_workdir"):
        ens_config.validate(cfg)


def test_fmnist_and_cifar_configs_validate():
    from helpers import REPO

    c = config_lib.load_config_file(os.path.join(REPO, "configs", "bdistil_fmnist.py") + ":seed=1")
    config_lib.validate(c)
    ens_config.validate(c)
    assert c.stage_order == ("teacher",) and c.ensemble.member.distill.teacher_workdir == "@teacher"
    c = config_lib.load_config_file(os.path.join(REPO, "configs", "bdistil_fmnist.py") + ":seed=1,teacher=/t")
    assert c.stage_order == () and c.ensemble.member.distill.teacher_workdir == "/t"
    with pytest.raises(ValueError, match="Unknown argument"):
        config_lib.load_config_file(os.path.join(REPO, "configs", "bdistil_fmnist.py") + ":seeds=1")
    for spec, dataset in (
        ("bdistil_cifar.py:dataset=cifar10", "cifar10"),
        ("bdistil_cifar.py", "cifar100"),
        ("bdistil_speech.py", "speech_commands"),
    ):
        c = config_lib.load_config_file(os.path.join(REPO, "configs", spec))
        config_lib.validate(c)
        ens_config.validate(c)
        assert c.ensemble.member.dataset.name == dataset
        for group in ("candidates", "no_resched"):  # every architecture is a real one, with real arguments
            for entry in c.ensemble[group].values():
                if entry.name == "conv1d":  # the 1-D speech model: built, since its kwargs are free-form
                    members.build_member(
                        {"model": entry.to_dict(), "connected": False},
                        data.dataset_info(dataset),
                        seed=0,
                        dtype=jnp.float32,
                    )
                else:
                    assert set(entry.kwargs) <= set(models.model_kwargs(entry.name))
    with pytest.raises(ValueError, match="cifar10 or cifar100"):
        config_lib.load_config_file(os.path.join(REPO, "configs", "bdistil_cifar.py") + ":dataset=svhn")


# ------------------------------------------------------------------------------- speech path


def _write_wav(path, samples):
    import wave

    os.makedirs(os.path.dirname(path), exist_ok=True)
    with wave.open(path, "wb") as f:
        f.setnchannels(1)
        f.setsampwidth(2)
        f.setframerate(16000)
        f.writeframes(np.asarray(samples, "<i2").tobytes())


def _mock_speech_archive(root):
    """A tiny speech_commands_v0.02 layout: 3 words (one of them "unknown"), noise, the two lists."""
    rng = np.random.default_rng(0)
    t = np.arange(16000) / 16000
    val, test = [], []
    for w, (word, freq) in enumerate((("yes", 440.0), ("no", 1200.0), ("cat", 3000.0))):
        for i in range(16):
            n = int(rng.integers(12000, 16001))  # clips shorter than 1 s are padded
            tone = 8000 * np.sin(2 * np.pi * freq * (1 + 0.05 * rng.normal()) * t[:n]) + 500 * rng.normal(size=n)
            rel = f"{word}/clip{i:02d}_nohash_0.wav"
            _write_wav(os.path.join(root, rel), tone)
            (val if i % 8 == 6 else test if i % 8 == 7 else []).append(rel)
    _write_wav(os.path.join(root, "_background_noise_", "white.wav"), 300 * rng.normal(size=40000))
    with open(os.path.join(root, "validation_list.txt"), "w") as f:
        f.write("\n".join(val) + "\n")
    with open(os.path.join(root, "testing_list.txt"), "w") as f:
        f.write("\n".join(test) + "\n")


def test_speech_path_on_a_mock_archive(tmp_path, monkeypatch):
    from titans.data import speech

    root, data_dir = str(tmp_path / "raw"), str(tmp_path / "tfds")
    _mock_speech_archive(root)
    with pytest.raises(data.DatasetNotFoundError, match="TITANS_SPEECH_DIR"):
        data.get_source("speech_commands", "train", data_dir=data_dir)
    monkeypatch.setenv("TITANS_SPEECH_DIR", root)
    src = data.get_source("speech_commands", "train", data_dir=data_dir)  # prepared here, without TF
    test_src = data.get_source("speech_commands", "test", data_dir=data_dir)
    info = data.dataset_info("speech_commands")
    assert len(src) == 3 * 12 + 48 and len(test_src) == 3 * 2 + 6  # words + silence cuts
    ex = src[0]
    assert ex["image"].shape == info.image_shape and ex["image"].dtype == np.uint8
    labels = {src[i]["label"] for i in range(len(src))}
    assert labels == {speech.LABELS.index(x) for x in ("yes", "no", "_unknown_", "_silence_")}
    # A louder tone gives more energy in its band.
    assert (
        speech.log_mel_uint8(np.zeros(16000, np.int16)).max()
        < speech.log_mel_uint8((8000 * np.sin(np.arange(16000) * 0.2)).astype(np.int16)).max()
    )

    # The 1-D conv student as ensemble members, from a speech config made tiny.
    c = config_lib.load_config_file(os.path.join(os.path.dirname(__file__), "..", "configs", "bdistil_speech.py"))
    teacher = c.stages.teacher
    teacher.dataset.data_dir = data_dir
    teacher.model.kwargs = ml_collections.ConfigDict(dict(channels=(4, 8), dense=16))
    teacher.total_epochs, teacher.total_steps, teacher.batch_size, teacher.eval_batch_size = 0.0, 40, 16, 16
    teacher.schedule.warmup_steps, teacher.optimizer.learning_rate = 0, 0.01
    teacher.checkpoint.async_save = False
    e = c.ensemble
    e.member.dataset.data_dir = data_dir
    e.member.total_epochs, e.member.total_steps = 0.0, 30
    e.member.schedule.warmup_steps, e.member.optimizer.learning_rate = 0, 0.01
    e.member.batch_size, e.member.eval_batch_size = 16, 16
    e.member.checkpoint.async_save = False
    e.candidates = ml_collections.ConfigDict({"c4": ens_config.model_entry("conv1d", channels=(4,), kernel=3, dense=4)})
    e.rounds, e.gamma, e.val_split, e.predict_batch_size = 2, 0.0, "validation", 8
    e.variants = ("bdistil",)
    e.num_thresholds = 5
    out = experiment.run_experiment(c, str(tmp_path / "run"))
    v = out["ensemble"]["variants"]["bdistil"]
    assert len(v["accuracy_by_members"]) == 2 and v["members"][1]["connected"]
    assert v["members"][0]["model"]["name"] == "conv1d"


def test_no_resched_matches_each_budget_in_log_ratio():
    """A known answer: budgets between candidates go to the closer one in log ratio, not in difference."""
    from titans.ensemble.runner import match_budgets

    sized = [(1.0, "a"), (4.0, "b"), (16.0, "c")]
    # 2.1 is nearer 1 in difference (1.1 vs 1.9) but nearer 4 in log ratio (0.74 vs 0.64): b.
    assert match_budgets(sized, [1.0, 2.1, 3.0, 9.0, 100.0]) == ["a", "b", "b", "c", "c"]


def test_pair_mode_member_follows_the_signed_residual_of_each_example_class_pair():
    """In example-class mode the member fits the *signed* residual r = centred(g) - centred(F_{w-1}) of every
    pair: the gradient of its loss at f = 0 is the closed form -(2/K) (W r - mean_k W r) (centring's
    Jacobian), so a gradient step raises class k of example i where the ensemble under-predicts it and
    lowers it where it over-predicts, in proportion to the weight player's W_ik."""
    rng = np.random.default_rng(0)
    B, K = 6, 5
    g = rng.normal(size=(B, K)).astype(np.float32) * 3
    f_prev = rng.normal(size=(B, K)).astype(np.float32)
    W = rng.uniform(0.2, 3.0, size=(B, K)).astype(np.float32)
    y = np.zeros(B, np.int32)

    def loss(f):
        return losses.boosting_residual_loss(f_prev + f, g, y, pair_weights=jnp.asarray(W)).sum()

    grad = np.asarray(jax.grad(loss)(jnp.zeros((B, K))))
    c = lambda z: z - z.mean(-1, keepdims=True)
    r = c(g.astype(np.float64)) - c(f_prev.astype(np.float64))
    wr = W * r
    np.testing.assert_allclose(grad, -(2.0 / K) * (wr - wr.mean(-1, keepdims=True)), rtol=1e-4, atol=1e-5)
    # With uniform weights the step -grad has the residual's sign on every pair.
    g_uniform = np.asarray(
        jax.grad(lambda f: losses.boosting_residual_loss(f_prev + f, g, y, pair_weights=jnp.ones((B, K))).sum())(
            jnp.zeros((B, K))
        )
    )
    assert np.all(np.sign(-g_uniform) == np.sign(r))


def test_weighted_edge_is_the_weighted_fraction_of_residual_removed():
    """A known answer: before (2, 4), after (1, 4); with weights (1, 1) the edge is 1 - 5/6, with weights
    (3, 1) it is 1 - 7/10: the weight player's weights decide which example's progress counts. Pair
    weights (2-D) are inside the losses already, so the edge sums them unweighted."""
    from titans.ensemble.runner import weighted_edge

    before, after = np.array([2.0, 4.0]), np.array([1.0, 4.0])
    assert weighted_edge(before, after, np.ones(2)) == pytest.approx(1 - 5 / 6)
    assert weighted_edge(before, after, np.array([3.0, 1.0])) == pytest.approx(1 - 7 / 10)
    assert weighted_edge(before, after, np.ones((2, 10))) == pytest.approx(1 - 5 / 6)
    assert weighted_edge(before, before, np.ones(2)) == 0.0

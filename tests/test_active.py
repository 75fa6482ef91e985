"""Robust active distillation: DepRound, the game, the baseline strategies, the loop's query counter
and resuming, noisy teachers, config errors."""

import json
import os

import jax
import jax.numpy as jnp
import numpy as np
import pytest
from helpers import digits_config
from scipy.optimize import linprog

from titans import checkpoint, provenance, runs, stats
from titans import config as config_lib
from titans.active import config as active_config
from titans.active import loop, selection, teachers

# ------------------------------------------------------------------------------ DepRound


def _marginals_ok(freq, p, draws, z=4.5):
    """Every empirical frequency within z standard errors (plus a little) of its marginal."""
    se = np.sqrt(np.maximum(p * (1 - p), 1e-12) / draws)
    return bool(np.all(np.abs(freq - p) <= z * se + 1e-3))


def _test_marginals(n=40, b=9, seed=0):
    rng = np.random.default_rng(seed)
    raw = rng.random(n) ** 2
    p = np.asarray(selection.game_probabilities(jnp.asarray(raw, jnp.float32), b, 2.5)[0], np.float64)
    p[:3] = [1.0, 0.0, 0.5]  # integral and half entries, then renormalise the rest to sum b
    rest = slice(3, None)
    p[rest] = np.clip(p[rest] * (b - 1.5) / p[rest].sum(), 0, 1)
    p[rest] *= (b - 1.5) / p[rest].sum()
    assert abs(p.sum() - b) < 1e-5 and p.max() <= 1
    return p.astype(np.float32)


def test_depround_exact_b_distinct_and_marginals():
    p = _test_marginals()
    b = int(round(p.sum()))
    draws = 20000
    keys = jax.random.split(jax.random.key(0), draws)
    chosen = np.asarray(jax.vmap(selection.depround, in_axes=(0, None))(keys, jnp.asarray(p)))
    assert chosen.shape == (draws, len(p))
    assert np.all(chosen.sum(1) == b)  # exactly b (distinct by construction: a 0/1 vector)
    freq = chosen.mean(0)
    assert freq[0] == 1.0 and freq[1] == 0.0
    assert _marginals_ok(freq, p, draws)
    # The check can fail: a sampler that takes the b largest p every time is rejected.
    greedy = np.zeros_like(p)
    greedy[np.argsort(-p)[:b]] = 1.0
    assert not _marginals_ok(greedy, p, draws)
    # ... and so are the right marginals shifted by a small amount on two entries.
    off = freq.copy()
    off[5] += 0.02
    off[6] -= 0.02
    assert not _marginals_ok(off, p, draws)


def test_select_robust_returns_b_distinct_available_points():
    n, b = 5000, 300
    rng = np.random.default_rng(1)
    gain = jnp.asarray(rng.random(n), jnp.float32)
    available = np.ones(n, bool)
    available[:1000] = False
    for s in range(3):
        idx, p = selection.select_robust(jax.random.key(s), gain, jnp.asarray(available), b, m=30.0)
        idx = np.asarray(idx)
        assert len(idx) == b == len(set(idx.tolist()))
        assert available[idx].all()
        assert abs(float(p.sum()) - b) < 1e-2 and float(p[:1000].max()) == 0.0


# ------------------------------------------------------------------------------ the game


def _lp_value(g, b, m):
    """max_p sum(p g) - top_m(p g), as an LP: min -g.p + m t + sum u, u_i >= g_i p_i - t, u >= 0."""
    n = len(g)
    c = np.concatenate([-g, [m], np.ones(n)])
    a_ub = np.zeros((n, 2 * n + 1))
    a_ub[np.arange(n), np.arange(n)] = g
    a_ub[:, n] = -1
    a_ub[np.arange(n), n + 1 + np.arange(n)] = -1
    a_eq = np.concatenate([np.ones(n), [0.0], np.zeros(n)])[None]
    res = linprog(
        c, A_ub=a_ub, b_ub=np.zeros(n), A_eq=a_eq, b_eq=[b], bounds=[(0, 1)] * n + [(0, None)] * (n + 1), method="highs"
    )
    assert res.success
    return -res.fun


@pytest.mark.parametrize("seed", range(4))
def test_game_solution_matches_lp(seed):
    rng = np.random.default_rng(seed)
    n = 12  # one shape: one compilation
    for _ in range(8):
        b = int(rng.integers(1, n))
        m = float(rng.choice([0.0, 0.5, 1.0, 2.0, 3.7, b + 1.0]))
        g = rng.random(n).astype(np.float32)
        if rng.random() < 0.3:
            g[rng.integers(0, n, 2)] = 0.0
        p, _ = selection.game_probabilities(jnp.asarray(g), b, m)
        p = np.asarray(p, np.float64)
        assert abs(p.sum() - b) < 1e-4 and p.min() >= 0 and p.max() <= 1 + 1e-6
        assert selection.game_value(p, g, m) == pytest.approx(_lp_value(g.astype(np.float64), b, m), abs=2e-5)


def test_game_value_against_brute_force_on_vertices():
    """With m = 0 the optimum is the best 0/1 choice of b points (checked over all subsets)."""
    import itertools

    g = np.array([0.3, 0.9, 0.1, 0.7, 0.5], np.float32)
    best = max(sum(g[list(s)]) for s in itertools.combinations(range(5), 2))
    p, _ = selection.game_probabilities(jnp.asarray(g), 2, 0.0)
    np.testing.assert_allclose(np.asarray(p), [0, 1, 0, 1, 0], atol=1e-6)
    assert selection.game_value(np.asarray(p), g, 0.0) == pytest.approx(best)


def test_game_spreads_mass_as_m_grows():
    g = jnp.asarray(np.linspace(1.0, 0.01, 200), jnp.float32)
    supports = []
    for m in (0.0, 2.0, 8.0):
        p = np.asarray(selection.game_probabilities(g, 20, m)[0])
        supports.append(int((p > 1e-6).sum()))
        if m:
            assert p[0] < 1.0  # the most informative point is no longer bought for sure
            assert np.all(np.diff(p[:5] * np.asarray(g)[:5]) >= -1e-6)  # equal p*g at the water level
    assert supports[0] == 20 and supports[0] < supports[1] < supports[2]


def test_estimate_mistakes():
    pred = np.array([0, 1, 2, 3, 4, 5, 6, 7, 8, 9])
    labels = np.array([0, 1, 2, 3, 4, 5, 6, 7, 0, 0])
    assert selection.estimate_mistakes(pred, labels, 100) == pytest.approx(20.0)
    gain = np.array([0, 0, 0, 0, 0, 0, 0, 0, 1, 0.9])
    assert selection.estimate_mistakes(
        pred, labels, 100, student_gain=gain, kind="informative", informative_fraction=0.2
    ) == pytest.approx(100.0)
    assert selection.estimate_mistakes(pred, labels, 100, kind="zero") == 0.0  # the m = 0 ablation
    with pytest.raises(selection.SelectionError, match="empty"):
        selection.estimate_mistakes(pred[:0], labels[:0], 10)


# -------------------------------------------------------------------- baseline strategies


def _probs(n, k=10, seed=0):
    z = np.random.default_rng(seed).normal(size=(n, k)) * 2
    e = np.exp(z - z.max(1, keepdims=True))
    return (e / e.sum(1, keepdims=True)).astype(np.float32)


def test_margin_entropy_random_against_numpy():
    n, b = 3000, 50
    probs = _probs(n)
    available = np.random.default_rng(3).random(n) > 0.3
    s = np.sort(probs, 1)
    np_margin = s[:, -1] - s[:, -2]
    np_entropy = -(probs * np.log(probs)).sum(1)
    ref_margin = np.where(available)[0][np.argsort(np_margin[available])[:b]]
    ref_entropy = np.where(available)[0][np.argsort(-np_entropy[available])[:b]]
    got_margin = np.asarray(selection.select_margin(jnp.asarray(probs), jnp.asarray(available), b))
    got_entropy = np.asarray(selection.select_entropy(jnp.asarray(probs), jnp.asarray(available), b))
    assert set(got_margin.tolist()) == set(ref_margin.tolist())
    assert set(got_entropy.tolist()) == set(ref_entropy.tolist())
    np.testing.assert_allclose(np.asarray(selection.margin(jnp.asarray(probs))), np_margin, atol=1e-6)
    np.testing.assert_allclose(np.asarray(selection.entropy(jnp.asarray(probs))), np_entropy, atol=1e-5)
    key = jax.random.key(7)
    got_random = np.asarray(selection.select_random(key, jnp.asarray(available), b))
    u = np.asarray(jax.random.uniform(key, (n,)))
    ref_random = np.where(available)[0][np.argsort(-u[available])[:b]]
    assert set(got_random.tolist()) == set(ref_random.tolist())
    # Random is uniform over the available points: counts over many draws.
    counts = np.zeros(n)
    for s_ in range(200):
        counts[np.asarray(selection.select_random(jax.random.key(s_), jnp.asarray(available), b))] += 1
    assert counts[~available].sum() == 0
    expected = 200 * b / available.sum()
    assert abs(counts[available].mean() - expected) < 1e-9
    assert counts[available].std() < 3 * np.sqrt(expected)


def _kcenter_numpy(pool, centres, available, b):
    d = np.min(((pool[:, None, :] - centres[None]) ** 2).sum(-1), 1) if len(centres) else np.full(len(pool), np.inf)
    d = np.where(available, d, -np.inf)
    chosen = []
    for _ in range(b):
        j = int(np.argmax(d))
        chosen.append(j)
        d = np.minimum(d, ((pool - pool[j]) ** 2).sum(-1))
        d[j] = -np.inf
    return chosen


def test_kcenter_against_numpy():
    rng = np.random.default_rng(4)
    pool = rng.normal(size=(500, 6)).astype(np.float32)
    centres = rng.normal(size=(37, 6)).astype(np.float32)
    available = rng.random(500) > 0.2
    got = np.asarray(
        selection.select_kcenter(jnp.asarray(pool), jnp.asarray(centres), jnp.asarray(available), 25, chunk=16)
    )
    assert got.tolist() == _kcenter_numpy(pool.astype(np.float64), centres.astype(np.float64), available, 25)


def test_selection_refuses_bad_input():
    av = jnp.ones(10, bool)
    with pytest.raises(selection.SelectionError, match="b=11"):
        selection.select_margin(jnp.asarray(_probs(10)), av, 11)
    with pytest.raises(selection.SelectionError, match="Unknown strategy"):
        selection.select("margins", key=jax.random.key(0), probs=jnp.asarray(_probs(10)), available=av, b=2)
    with pytest.raises(selection.SelectionError, match="m must be"):
        selection.select_robust(jax.random.key(0), jnp.ones(10), av, 2, m=-1.0)


# ------------------------------------------------------------------------- noisy teachers


def test_noisy_labels_change_exactly_the_fraction():
    labels = np.random.default_rng(0).integers(0, 10, 1000)
    noisy = teachers.noisy_labels(labels, 0.3, 10, seed=5)
    assert (noisy != labels).sum() == 300
    np.testing.assert_array_equal(noisy, teachers.noisy_labels(labels, 0.3, 10, seed=5))
    assert np.all((noisy >= 0) & (noisy < 10))
    with pytest.raises(ValueError, match="label noise"):
        teachers.noisy_labels(labels, 1.5, 10, seed=0)


def test_teacher_trained_with_label_noise_learns_the_noisy_labels(data_dir, tmp_path):
    """With 95% of labels moved to another class the teacher learns to avoid the true class."""
    cfg = digits_config(data_dir, total_steps=60)
    res = teachers.train_teacher(cfg, str(tmp_path / "noisy"), label_noise=0.95)
    assert res["accuracy"] < 0.2
    meta = json.load(open(tmp_path / "noisy" / "label_noise.json"))
    assert meta["num_changed"] == round(0.95 * 1437)


def test_noisy_labels_confined_to_classes_move_each_to_the_next_class():
    labels = np.random.default_rng(1).integers(0, 10, 2000)
    noisy = teachers.noisy_labels(labels, 0.5, 10, seed=3, classes=(6, 2, 4))
    changed = noisy != labels
    in_group = np.isin(labels, [6, 2, 4])
    assert not changed[~in_group].any()  # every other class keeps its labels
    assert changed.sum() == round(0.5 * in_group.sum())
    successor = {6: 2, 2: 4, 4: 6}
    assert all(successor[int(a)] == int(b) for a, b in zip(labels[changed], noisy[changed]))
    for c in (6, 2, 4):  # spread over the group's classes, not taken from one of them
        assert 0.35 < changed[labels == c].mean() < 0.65
    with pytest.raises(ValueError, match="noise classes"):
        teachers.noisy_labels(labels, 0.5, 10, seed=3, classes=(6, 12))


def test_teacher_noise_confined_to_classes_puts_its_mistakes_there(data_dir, tmp_path):
    """teacher.noise_classes='3,5,8' with label_noise=0.8 (the active config's option, through the loop's
    teacher training): on the active run's validation split the teacher is wrong mostly on 3, 5 and 8
    (each predicted as the next class of the list), and right on the other classes."""
    cfg = _active_config(data_dir, **{"teacher.label_noise": 0.8, "teacher.noise_classes": "3,5,8"})
    cfg.teacher.workdir = str(tmp_path / "teacher")
    cfg.teacher.train = digits_config(data_dir, total_steps=120)
    cfg = active_config.validate(cfg)
    tdir, info = loop._resolve_teacher(cfg, str(tmp_path), lambda s: None)
    assert info["noise_classes"] == [3, 5, 8] and info["label_noise"] == 0.8
    meta = json.load(open(tmp_path / "teacher" / "label_noise.json"))
    assert [c for c, k in enumerate(meta["num_changed_per_class"]) if k] == [3, 5, 8]
    data = loop.load_data(cfg)
    teacher, _ = runs.load_teacher(tdir, data.info)
    images, labels = data.validation
    pred = np.argmax(loop.teacher_predict_fn(teacher, 256)(images), -1)
    group = np.isin(labels, [3, 5, 8])
    wrong = pred != labels
    assert wrong[group].mean() > 0.6 and wrong[~group].mean() < 0.25
    assert wrong[group].sum() / wrong.sum() > 0.75  # most of its mistakes are in the group
    successor = {3: 5, 5: 8, 8: 3}
    moved = [successor[int(y)] == int(p_) for y, p_ in zip(labels[group & wrong], pred[group & wrong])]
    assert np.mean(moved) > 0.8


def test_active_config_refuses_bad_noise_classes(data_dir):
    for text, match in (("3", "two or more"), ("3,x", "separated by commas"), ("3,3", "distinct")):
        with pytest.raises(config_lib.ConfigError, match=match):
            active_config.validate(_active_config(data_dir, **{"teacher.noise_classes": text}))
    with pytest.raises(config_lib.ConfigError, match="label_noise, which is 0"):
        active_config.validate(_active_config(data_dir, **{"teacher.noise_classes": "3,5"}))


# ----------------------------------------------------------------------------- the loop


def _active_config(data_dir, **over):
    c = active_config.defaults()
    c.dataset.name = "digits"
    c.dataset.data_dir = data_dir
    c.dataset.split = "train"
    c.active.num_labelled = 64
    c.active.num_validation = 100
    c.active.rounds = 2
    c.active.budget_per_round = 40
    c.active.predict_batch_size = 256
    c.teacher.workdir = "unused"
    c.student.model.kwargs.hidden = (16,)
    c.student.batch_size = 32
    c.student.eval_batch_size = 64
    c.student.total_steps = 15
    c.student.optimizer.learning_rate = 3e-3
    for k, v in over.items():
        node = c
        *path, leaf = k.split(".")
        for p_ in path:
            node = node[p_]
        node[leaf] = v
    return c


class _FakeTeacher:
    """A fixed random linear teacher that logs every image it is run on."""

    def __init__(self):
        self.w = np.random.default_rng(0).normal(size=(64, 10)).astype(np.float32)
        self.seen = []

    def __call__(self, images):
        self.seen.append(np.asarray(images).copy())
        return np.asarray(images, np.float32).reshape(len(images), -1) @ self.w / 50.0


def _rows(images):
    return {bytes(x.tobytes()) for x in images}


def test_loop_counts_queries_and_runs_teacher_only_on_bought_points(data_dir, tmp_path):
    cfg = _active_config(data_dir)
    fake = _FakeTeacher()
    out = loop.run_active(cfg, str(tmp_path / "run"), teacher_predict=fake, log=lambda s: None)
    data = loop.load_data(active_config.validate(cfg))
    for name, r in out["strategies"].items():
        assert r["pool_queries"] == 80 and r["queries"] == [0, 40, 80]
        assert r["validation_queries"] == (100 if name == "robust" else 0)
        assert r["teacher_rows_run_this_call"] == r["pool_queries"] + r["validation_queries"]
        assert all(0.0 < a <= 1.0 for a in r["accuracy"])
    seen = np.concatenate(fake.seen)
    assert len(seen) == 5 * 80 + 100
    # Every pool row the teacher saw was bought: compare against the bought indices on disk.
    bought_rows = set()
    for name in out["strategies"]:
        ck = checkpoint.TreeCheckpoints(str(tmp_path / "run" / name / "rounds"))
        step = ck.latest()
        tree = ck.manager.restore(step)
        ck.close()
        bought = np.asarray(tree["bought"])
        assert len(set(bought.tolist())) == 80 and bought.min() >= 0
        bought_rows |= _rows(data.pool_images[bought])
    val_rows = _rows(data.validation[0])
    assert _rows(seen) <= bought_rows | val_rows
    assert os.path.exists(tmp_path / "run" / "active.json") and os.path.exists(tmp_path / "run" / "active.png")
    # The raw output names the code and the settings that made it: the full resolved config and the
    # package's git revision (with its dirty flag), as provenance() reports them for this checkout.
    written = json.load(open(tmp_path / "run" / "active.json"))
    # Each round's per-row test correctness is the student's: its mean is the round's test accuracy.
    assert written["test_rows"] == len(data.test_src)
    for r in written["strategies"].values():
        for acc, bits in zip(r["accuracy"], r["test_correct"]):
            assert stats.unpack_bits(bits, written["test_rows"]).mean() == pytest.approx(acc, abs=1e-6)
    assert written["config"] == json.loads(config_lib.to_json(active_config.validate(cfg)))
    assert written["config"]["active"]["budget_per_round"] == 40
    here = provenance.provenance()
    assert {k: written[k] for k in ("revision", "dirty", "titans_version")} == here
    assert here["revision"] is None or (len(here["revision"]) == 40 and isinstance(here["dirty"], bool))


def test_counting_teacher_refuses_rebuying_and_overspending():
    pool = np.zeros((10, 8, 8, 1), np.uint8)
    t = loop.CountingTeacher(lambda x: np.zeros((len(x), 10)), pool, budget=4)
    t.query_pool([1, 2])
    with pytest.raises(loop.QueryBudgetError, match="bought already"):
        t.query_pool([2, 3])
    with pytest.raises(loop.QueryBudgetError, match="exceed the budget"):
        t.query_pool([3, 4, 5])
    with pytest.raises(loop.QueryBudgetError, match="twice"):
        t.query_pool([6, 6])
    assert t.pool_queries == 2 and t.rows_run == 2


def test_resume_mid_loop_matches_an_uninterrupted_run(data_dir, tmp_path):
    cfg = active_config.validate(_active_config(data_dir, **{"active.strategies": "robust", "active.rounds": 3}))
    data = loop.load_data(cfg)
    trainer = loop.StudentTrainer(cfg.student, data.info, 64 + 3 * 40)
    full_teacher = _FakeTeacher()
    full = loop.run_strategy("robust", cfg, data, full_teacher, trainer, str(tmp_path / "full"), log=lambda s: None)
    part_teacher = _FakeTeacher()
    first = loop.run_strategy(
        "robust", cfg, data, part_teacher, trainer, str(tmp_path / "part"), stop_after_round=1, log=lambda s: None
    )
    assert first == {"stopped_after_round": 1}
    assert sum(len(s) for s in part_teacher.seen) == 100 + 40
    resumed = loop.run_strategy("robust", cfg, data, part_teacher, trainer, str(tmp_path / "part"), log=lambda s: None)
    # The resumed call bought only rounds 2 and 3, and re-ran nothing (validation not re-queried).
    assert resumed["teacher_rows_run_this_call"] == 80
    assert sum(len(s) for s in part_teacher.seen) == 100 + 120
    assert resumed["pool_queries"] == full["pool_queries"] == 120
    assert resumed["queries"] == full["queries"]
    np.testing.assert_allclose(resumed["accuracy"], full["accuracy"], atol=1e-6)
    # A different config in the same workdir is refused.
    other = active_config.validate(
        _active_config(data_dir, **{"active.strategies": "robust", "active.rounds": 3, "active.budget_per_round": 30})
    )
    with pytest.raises(loop.ResumeMismatchError, match="active.budget_per_round: 40 -> 30"):
        loop.run_strategy("robust", other, data, part_teacher, trainer, str(tmp_path / "part"), log=lambda s: None)


def test_resume_ignores_fields_the_run_schema_gained_since():
    fields = {"active.rounds": 3, "student.distill.temperature": 1.0}
    meta = {"strategy": "margin", "config": dict(fields)}
    loop._check_resume(meta, "margin", {**fields, "student.distill.new_field": "x"}, "w")
    with pytest.raises(loop.ResumeMismatchError, match="student.distill.temperature: 1.0 -> 2.0"):
        loop._check_resume(meta, "margin", {**fields, "student.distill.temperature": 2.0}, "w")
    with pytest.raises(loop.ResumeMismatchError, match="strategy 'margin', not 'robust'"):
        loop._check_resume(meta, "robust", fields, "w")


def test_active_config_errors(data_dir):
    c = _active_config(data_dir)
    c.active.budjet_per_round = 3
    with pytest.raises(config_lib.ConfigError, match="active.budget_per_round"):
        active_config.validate(c)
    with pytest.raises(config_lib.ConfigError, match="unknown strategy 'coreset'"):
        active_config.validate(_active_config(data_dir, **{"active.strategies": "random,coreset"}))
    with pytest.raises(
        config_lib.ConfigError, match="'optimizer.lr' in active config 'student'.*optimizer.learning_rate"
    ):
        bad = _active_config(data_dir)
        bad.student.optimizer.lr = 0.1
        active_config.validate(bad)
    with pytest.raises(config_lib.ConfigError, match="label_noise"):
        active_config.validate(_active_config(data_dir, **{"teacher.label_noise": 0.2}))
    with pytest.raises(config_lib.ConfigError, match="needs at least"):
        loop.load_data(active_config.validate(_active_config(data_dir, **{"active.budget_per_round": 900})))


def test_active_fmnist_config_loads_for_both_teachers():
    path = os.path.join(os.path.dirname(os.path.dirname(os.path.abspath(__file__))), "configs", "active_fmnist.py")
    good = active_config.validate(config_lib.load_config_file(path + ":teacher=good,seed=2,strategies=margin+robust"))
    assert good.teacher.workdir.endswith("seed2/teacher") and good.active.strategies == "margin,robust"
    bad = active_config.validate(config_lib.load_config_file(path + ":teacher=imperfect,noise=0.4"))
    assert bad.teacher.label_noise == 0.4 and bad.teacher.train.dataset.train_split == "train[:5%]"
    assert bad.teacher.workdir == "{workdir}/teacher"
    ablation = active_config.validate(
        config_lib.load_config_file(path + ":teacher=imperfect,m=zero,strategies=robust,teacher_dir=/t/teacher")
    )
    assert ablation.active.m_estimate == "zero" and ablation.teacher.workdir == "/t/teacher"
    with pytest.raises(ValueError, match="Unknown argument 'seeds'"):
        config_lib.load_config_file(path + ":seeds=1")
    with pytest.raises(ValueError, match="teacher='best'"):
        config_lib.load_config_file(path + ":teacher=best")


def test_loop_records_selection_statistics_and_the_m_the_game_used(data_dir, tmp_path):
    """Per round: the m the robust game was played with (> 0 with a teacher that errs on the
    validation split; forcing m = 0 in the loop fails this), the support and max inclusion probability
    of the game's solution, and the overlap with margin's top-b (1 for margin itself)."""
    cfg = _active_config(data_dir)
    cfg.active.strategies = "robust,margin"
    out = loop.run_active(cfg, str(tmp_path / "run"), teacher_predict=_FakeTeacher(), log=lambda s: None)
    robust, margin = out["strategies"]["robust"], out["strategies"]["margin"]
    b = cfg.active.budget_per_round
    for r in range(1, cfg.active.rounds + 1):
        assert robust["m"][r] > 0
        assert b <= robust["support"][r] and 0 < robust["max_p"][r] <= 1.0
        assert 0.0 <= robust["overlap_margin"][r] <= 1.0
        assert margin["overlap_margin"][r] == 1.0 and margin["support"][r] is None
    assert robust["m"][0] is None and robust["overlap_margin"][0] is None


def test_m_zero_reaches_the_game_and_makes_robust_plain_top_b(data_dir, tmp_path):
    """m_estimate='zero' plays the game with m = 0, whose solution is the b most informative points:
    robust then buys exactly margin's top-b (overlap 1) each round."""
    cfg = _active_config(data_dir)
    cfg.active.strategies = "robust"
    cfg.active.m_estimate = "zero"
    out = loop.run_active(cfg, str(tmp_path / "run"), teacher_predict=_FakeTeacher(), log=lambda s: None)
    robust = out["strategies"]["robust"]
    for r in range(1, cfg.active.rounds + 1):
        assert robust["m"][r] == 0.0 and robust["overlap_margin"][r] == 1.0


def test_active_fmnist_pool_config_has_a_large_pool_and_a_confused_teacher():
    """The pool is at least 10x the final budget (Fashion-MNIST's train split has 60,000 images; the
    pool is train[50%:] less the labelled and validation images), disjoint from the teacher's data, and
    the confused teacher's label noise is confined to shirt, pullover and coat."""
    path = os.path.join(os.path.dirname(os.path.dirname(os.path.abspath(__file__))), "configs", "active_fmnist_pool.py")
    c = active_config.validate(config_lib.load_config_file(path + ":seed=1"))
    a = c.active
    assert c.dataset.split == "train[50%:]" and c.teacher.train.dataset.train_split == "train[:50%]"
    pool = 30_000 - a.num_labelled - a.num_validation
    assert a.pool_size == 0 and pool >= 10 * a.rounds * a.budget_per_round == 20_000
    assert c.teacher.label_noise == 0.35 and active_config.noise_classes(c) == (6, 2, 4)
    assert c.teacher.workdir == "{workdir}/teacher" and c.teacher.train.seed == 1 and c.seed == 1
    assert c.active.strategies == "random,margin,entropy,kcenter,robust"
    clean = active_config.validate(config_lib.load_config_file(path + ":teacher=clean,m=informative,teacher_dir=/t"))
    assert clean.teacher.label_noise == 0.0 and clean.teacher.noise_classes == "" and clean.teacher.workdir == "/t"
    assert clean.active.m_estimate == "informative" and clean.teacher.train.dataset.train_split == "train[:50%]"
    with pytest.raises(ValueError, match="teacher='good'"):
        config_lib.load_config_file(path + ":teacher=good")


def test_active_cifar100_config_validates_and_needs_its_teacher():
    path = os.path.join(os.path.dirname(os.path.dirname(os.path.abspath(__file__))), "configs", "active_cifar100.py")
    c = active_config.validate(config_lib.load_config_file(path + ":teacher_dir=/t,m=zero,budget=100"))
    assert c.student.model.name == "resnet20" and c.active.budget_per_round == 100 and c.active.m_estimate == "zero"
    with pytest.raises(ValueError, match="needs teacher_dir"):
        config_lib.load_config_file(path)


def test_claims_are_tested_at_the_first_middle_and_last_budget():
    """Robust ahead early and tied at the end (the pool exhausted): the early claim must show."""
    from titans.active import report

    assert (
        report.claim_rounds(4) == [1, 2, 4] and report.claim_rounds(10) == [1, 5, 10] and report.claim_rounds(1) == [1]
    )

    def run(robust_first):
        acc = {"robust": [0.70, robust_first, 0.82, 0.83, 0.84], "margin": [0.70, 0.75, 0.82, 0.83, 0.84]}
        return {
            "strategies": {
                s: {
                    "queries": [0, 250, 500, 750, 1000],
                    "accuracy": a,
                    "teacher_error_bought": [None, 0.1, 0.1, 0.1, 0.1],
                }
                for s, a in acc.items()
            }
        }

    text = report.claims({"good": report.aggregate([run(0.80), run(0.81), run(0.79)])})
    rows = {line.split(" | ")[0].lstrip("| "): line for line in text.splitlines() if "robust beats" in line}
    assert "reproduced" in rows["good teacher: robust beats margin at 250 queries"]
    assert "unresolved" in rows["good teacher: robust beats margin at 500 queries"]
    assert "unresolved" in rows["good teacher: robust beats margin at 1000 queries"]


def test_claims_resample_the_test_rows_and_mark_the_declared_primary():
    """Two strategies 1 point apart on every seed (a t-interval of width 0) but on different test rows: the
    bootstrap over the rows widens the interval to the rows' sampling error; the declared claim is primary."""
    from titans.active import report

    n = 2000
    rng = np.random.default_rng(0)

    def run(seed):
        base = rng.random(n) < 0.8
        other = base.copy()
        flip = rng.choice(n, 200, replace=False)
        other[flip[:120]] = True  # robust right on 120 rows margin misses ...
        base[flip[120:]] = True  # ... and margin right on 80 that robust misses: +2 points net
        other[flip[120:]] = False
        base[flip[:120]] = False
        out = {"test_rows": n, "strategies": {}}
        for name, bits in (("robust", other), ("margin", base)):
            acc = float(bits.mean())
            out["strategies"][name] = {
                "queries": [0, 100],
                "accuracy": [acc, acc],
                "teacher_error_bought": [None, 0.1],
                "test_correct": [stats.pack_bits(bits), stats.pack_bits(bits)],
            }
        return out

    runs = [run(s) for s in range(3)]
    agg = report.aggregate(runs)
    plain = stats.paired_difference(
        [100 * r["strategies"]["robust"]["accuracy"][1] for r in runs],
        [100 * r["strategies"]["margin"]["accuracy"][1] for r in runs],
    )
    wide = report._difference(agg["robust"], agg["margin"], 1)
    assert wide.mean == pytest.approx(plain.mean) and (wide.high - wide.low) > (plain.high - plain.low) + 0.5
    text = report.claims({"good": agg}, primary=("good", "margin", 1))
    row = next(line for line in text.splitlines() if "robust beats margin at 100 queries" in line)
    assert "| primary |" in row and wide.format("{:+.2f}") in row

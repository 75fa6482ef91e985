"""The robust selection as it is made (titans/active/selection.py): what the game against m teacher
mistakes prescribes, checked against an LP of the game on tiny pools; DepRound's sampling law over
4,000 PRNG keys; and, in the loop, that the m estimated from the teacher's validation mistakes is the
m the selection is made with.

Each test looks at what the mechanism decides: the inclusion probabilities and the indices chosen.
Mutations that these tests were run against (each one fails at least one test): m replaced by 0 inside
`select_robust`; DepRound replaced by the top-b of p, or by independent Bernoulli(p) draws (in
`depround`, and inside `_robust`); the loop's m replaced by 0.
"""

import jax
import jax.numpy as jnp
import numpy as np
import pytest
from scipy.optimize import linprog

from titans import checkpoint
from titans.active import config as active_config
from titans.active import loop, selection

DRAWS = 4000
Z = 4.5  # binomial tolerance, in standard errors

# ------------------------------------------------------------------- the game, as an LP


def _game_lp(g, b, m, extra_c=None, floor=None):
    """The game max_p sum(p g) - top_m(p g) over {0 <= p <= 1, sum p = b} as an LP in (p, t, u):
    top_m(v) = min_t m t + sum_i (v_i - t)_+ with u_i >= g_i p_i - t, u >= 0.

    Without `extra_c`: returns (the optimal value, an optimal p). With `extra_c` (a cost on p) and
    `floor` (the optimal value): minimises extra_c . p over the optimal face f(p) >= floor."""
    n = len(g)
    game = np.concatenate([-g, [m], np.ones(n)])  # minimise -f
    a_ub = np.zeros((n, 2 * n + 1))
    a_ub[np.arange(n), np.arange(n)] = g
    a_ub[:, n] = -1
    a_ub[np.arange(n), n + 1 + np.arange(n)] = -1
    b_ub = np.zeros(n)
    c = game
    if extra_c is not None:
        c = np.concatenate([extra_c, np.zeros(n + 1)])
        a_ub = np.vstack([a_ub, game])  # -f <= -floor
        b_ub = np.concatenate([b_ub, [-floor + 1e-9]])
    a_eq = np.concatenate([np.ones(n), [0.0], np.zeros(n)])[None]
    bounds = [(0, 1)] * n + [(0, None)] * (n + 1)
    res = linprog(c, A_ub=a_ub, b_ub=b_ub, A_eq=a_eq, b_eq=[b], bounds=bounds, method="highs")
    assert res.success, res.message
    return -res.fun if extra_c is None else res.fun, res.x[:n]


def _optimal_ranges(g, b, m):
    """The optimal value and, per point, the least and largest p_i over every optimal p (2n LPs)."""
    g = np.asarray(g, np.float64)
    value, _ = _game_lp(g, b, m)
    eye = np.eye(len(g))
    lo = np.array([_game_lp(g, b, m, extra_c=eye[i], floor=value)[0] for i in range(len(g))])
    hi = np.array([-_game_lp(g, b, m, extra_c=-eye[i], floor=value)[0] for i in range(len(g))])
    return value, lo, hi


def _probs_with_gain(gain, k=10):
    """Softmax rows whose informativeness 1 - margin is exactly `gain` (top two classes apart by 1 - gain)."""
    gain = np.asarray(gain, np.float64)
    rest = 0.001
    top2 = 1.0 - rest * (k - 2)
    p1 = (top2 + (1.0 - gain)) / 2
    rows = np.full((len(gain), k), rest)
    rows[:, 0], rows[:, 1] = p1, top2 - p1
    return rows.astype(np.float32)


GAIN = np.array([0.93, 0.81, 0.74, 0.52, 0.47, 0.30, 0.21, 0.12], np.float32)  # one pool, distinct scores


def test_the_score_reaches_the_game_through_probs():
    probs = _probs_with_gain(GAIN)
    np.testing.assert_allclose(np.asarray(selection.informativeness(jnp.asarray(probs))), GAIN, atol=1e-6)


@pytest.mark.parametrize("b", [2, 3, 5])
def test_m_zero_chooses_exactly_the_score_top_b(b):
    """m = 0: the inclusion probabilities are the indicator of the top-b scores, so every draw is
    margin's own top-b (the selection through `select`, from the student's probabilities)."""
    probs = jnp.asarray(_probs_with_gain(GAIN))
    available = jnp.ones(len(GAIN), bool)
    top_b = set(np.asarray(selection.select_margin(probs, available, b)).tolist())
    assert top_b == set(range(b))  # GAIN is sorted, so the top-b are the first b points
    for s in range(20):
        idx, extra = selection.select("robust", key=jax.random.key(s), probs=probs, available=available, b=b, m=0.0)
        assert set(np.asarray(idx).tolist()) == top_b and extra["support"] == b and extra["max_p"] == 1.0
    _, p = selection.select_robust(jax.random.key(0), jnp.asarray(GAIN), available, b, 0.0)
    np.testing.assert_allclose(np.asarray(p), np.arange(len(GAIN)) < b, atol=1e-6)


@pytest.mark.parametrize(("b", "m"), [(1, 1.0), (2, 1.0), (3, 0.5), (3, 1.5), (3, 2.0), (5, 2.5)])
def test_inclusion_probabilities_are_the_games_optimum(b, m):
    """For m > 0 the selection's p lies on the game's optimal face (LP value and, point by point,
    within the least and largest p_i of any optimal solution), and that face is not the top-b: the
    game moves mass off the most informative points onto less informative ones."""
    available = jnp.ones(len(GAIN), bool)
    _, p = selection.select_robust(jax.random.key(0), jnp.asarray(GAIN), available, b, m)
    p = np.asarray(p, np.float64)
    value, lo, hi = _optimal_ranges(GAIN, b, m)
    assert selection.game_value(p, GAIN, m) == pytest.approx(value, abs=2e-5)
    assert np.all(p >= lo - 2e-4) and np.all(p <= hi + 2e-4), (p, lo, hi)
    top_b = (np.arange(len(GAIN)) < b).astype(np.float64)
    assert selection.game_value(top_b, GAIN, m) < value - 1e-3  # the greedy top-b is not optimal
    least_spread = _game_lp(GAIN.astype(np.float64), b, m, extra_c=1.0 - top_b, floor=value)[0]
    assert least_spread > 1e-3 and p[b:].sum() >= least_spread - 2e-4  # mass beyond the top-b
    assert p[0] < 1.0 - 1e-3  # the most informative point is no longer bought for sure


def test_closed_form_two_points():
    """b = 1, m = 1, g = (1, 1/2): the adversary spoils the larger p_i g_i, so the learner equalises
    p_1 = p_2 / 2: p = (1/3, 2/3) -- the *less* informative point is bought twice as often."""
    _, p = selection.select_robust(jax.random.key(0), jnp.asarray([1.0, 0.5]), jnp.ones(2, bool), 1, 1.0)
    np.testing.assert_allclose(np.asarray(p), [1 / 3, 2 / 3], atol=1e-5)


def test_larger_m_spreads_more_mass_beyond_the_top_b():
    b = 3
    available = jnp.ones(len(GAIN), bool)
    beyond = [
        float(np.asarray(selection.select_robust(jax.random.key(0), jnp.asarray(GAIN), available, b, m)[1])[b:].sum())
        for m in (0.0, 0.5, 1.0, 2.0)
    ]
    assert beyond[0] == pytest.approx(0.0, abs=1e-6)
    assert all(x < y - 1e-3 for x, y in zip(beyond, beyond[1:])), beyond


# ---------------------------------------------------------------------------- DepRound


def _binomial_ok(freq, p, draws=DRAWS, z=Z):
    se = np.sqrt(np.maximum(p * (1 - p), 1e-12) / draws)
    return np.abs(freq - p) <= z * se + 1e-6


def _depround_p():
    """Fractional, integral and half entries summing to b = 6 over 13 points (not a power of two)."""
    p = np.array([0.9, 0.75, 0.6, 0.55, 0.5, 0.45, 0.4, 0.3, 0.25, 0.15, 0.1, 1.0, 0.0], np.float64)
    p[:11] *= 5.0 / p[:11].sum()
    assert abs(p.sum() - 6.0) < 1e-9 and p.max() <= 1.0
    return p.astype(np.float32)


def _draws(p, draws=DRAWS):
    keys = jax.random.split(jax.random.key(11), draws)
    return np.asarray(jax.vmap(selection.depround, in_axes=(0, None))(keys, jnp.asarray(p)))


def test_depround_draws_exactly_b_with_the_prescribed_marginals():
    p = _depround_p()
    x = _draws(p)
    b = round(float(p.sum()))
    assert x.shape == (DRAWS, len(p)) and np.all(x.sum(1) == b)  # every draw: exactly b points
    freq = x.mean(0)
    assert freq[11] == 1.0 and freq[12] == 0.0  # integral entries are kept
    ok = _binomial_ok(freq, p.astype(np.float64))
    assert ok.all(), (freq, p)


def test_depround_is_negatively_dependent():
    """P(i and j both chosen) <= p_i p_j for every pair (each rounding step keeps E[x_i] and can only
    lower E[x_i x_j]); with exactly b chosen the pairwise covariances sum to -sum p_i (1 - p_i)."""
    p = _depround_p().astype(np.float64)
    x = _draws(_depround_p()).astype(np.float64)
    joint = x.T @ x / DRAWS
    bound = np.outer(p, p)
    se = np.sqrt(np.maximum(bound * (1 - bound), 1e-12) / DRAWS)
    off = ~np.eye(len(p), dtype=bool)
    assert np.all(joint[off] <= bound[off] + Z * se[off] + 1e-6)
    cov = joint - np.outer(x.mean(0), x.mean(0))
    np.testing.assert_allclose(cov[off].sum(), -np.trace(cov), atol=1e-9)  # Var(sum x) = 0
    assert cov[off].sum() < -0.5  # far from independence, where it would be about 0


def test_the_robust_selection_samples_the_games_probabilities():
    """The whole robust selection (game -> DepRound -> exactly b indices), over 4,000 keys: every draw
    has b distinct available points and each point is chosen with frequency p_i within 4.5 binomial
    standard errors. p has fractional entries, so a top-b sampler fails; an independent Bernoulli
    sampler (trimmed or filled to b) distorts the marginals and fails."""
    gain = np.concatenate([GAIN, [0.05, 0.66, 0.38, 0.27, 0.9, 0.02, 0.5, 0.44]]).astype(np.float32)
    available = np.ones(len(gain), bool)
    available[[13, 14]] = False  # not available: never chosen, whatever their gain
    b, m = 5, 3.0
    keys = jax.random.split(jax.random.key(5), DRAWS)
    idx, p = jax.vmap(lambda k: selection._robust(k, jnp.asarray(gain), jnp.asarray(available), b, jnp.float32(m)))(
        keys
    )
    idx, p = np.asarray(idx), np.asarray(p[0], np.float64)
    assert idx.shape == (DRAWS, b) and all(len(set(r)) == b for r in idx.tolist())
    assert not np.isin(idx, [13, 14]).any()
    frac = (p > 1e-3) & (p < 1 - 1e-3)
    assert frac.sum() >= 6  # enough fractional entries for the sampler to matter
    freq = np.bincount(idx.ravel(), minlength=len(gain)) / DRAWS
    ok = _binomial_ok(freq, p)
    assert ok.all(), (freq, p)


# ----------------------------------------------------------------------------- the loop


def _loop_config(data_dir):
    c = active_config.defaults()
    c.dataset.name = "digits"
    c.dataset.data_dir = data_dir
    c.dataset.split = "train"
    c.active.strategies = "robust"
    c.active.num_labelled = 64
    c.active.num_validation = 100
    c.active.rounds = 1
    c.active.budget_per_round = 40
    c.active.predict_batch_size = 256
    c.teacher.workdir = "unused"
    c.student.model.kwargs.hidden = (16,)
    c.student.batch_size = 32
    c.student.eval_batch_size = 64
    c.student.total_steps = 15
    c.student.optimizer.learning_rate = 3e-3
    return active_config.validate(c)


class _ValidationTeacher:
    """Right on every pool image (its true label, from the hidden pool labels); on the validation split
    right except on its first `wrong` images, which it puts in the next class."""

    def __init__(self, data, wrong: int):
        self.pool = {x.tobytes(): int(y) for x, y in zip(data.pool_images, data.pool_labels)}
        self.val_images, val_labels = data.validation
        self.val_pred = (val_labels + (np.arange(len(val_labels)) < wrong)) % data.info.num_classes

    def __call__(self, images):
        images = np.asarray(images)
        if images.shape == self.val_images.shape and np.array_equal(images, self.val_images):
            y = self.val_pred
        else:
            y = np.array([self.pool[x.tobytes()] for x in images])
        return 8.0 * np.eye(10, dtype=np.float32)[y]


def _round_one(cfg, data, trainer, teacher, workdir):
    """Round 1's bought indices, its m, and the round-0 student's probabilities on the pool."""
    out = loop.run_strategy("robust", cfg, data, teacher, trainer, workdir, log=lambda s: None)
    ck = checkpoint.TreeCheckpoints(f"{workdir}/rounds")
    abstract = trainer.abstract_variables()
    state0 = ck.restore(0, loop._fresh_state(cfg, data, *abstract[:2]))
    bought = np.asarray(ck.manager.restore(1)["bought"])
    ck.close()
    rounds = loop._Rounds("robust", cfg, data, trainer, None, abstract, jax.tree.map(np.asarray, state0))
    probs, _ = trainer.predict(*rounds.student_variables(), data.pool_images, cfg.active.predict_batch_size)
    return bought, out["m"][1], probs


def test_the_teachers_validation_mistakes_decide_the_selection(data_dir, tmp_path):
    """Three teachers that agree on every pool image and differ only in how many validation images
    they get wrong (0, 25, 50 of 100): m = b * error is 0, 10, 20; with m = 0 the loop buys margin's
    top-b, otherwise exactly what the game with that m and DepRound (same key) choose, and the three
    batches differ. A loop that played the game with m = 0 would buy the top-b every time."""
    cfg = _loop_config(data_dir)
    data = loop.load_data(cfg)
    trainer = loop.StudentTrainer(cfg.student, data.info, 64 + 40)
    b, key = cfg.active.budget_per_round, jax.random.fold_in(jax.random.key(cfg.seed), 1)
    chosen = {}
    for wrong in (0, 25, 50):
        teacher = _ValidationTeacher(data, wrong)
        bought, m, probs = _round_one(cfg, data, trainer, teacher, str(tmp_path / f"wrong{wrong}"))
        assert m == pytest.approx(b * wrong / 100)
        gain = selection.informativeness(jnp.asarray(probs))
        available = jnp.ones(len(data.pool_images), bool)
        expected, _ = selection.select_robust(key, gain, available, b, b * wrong / 100)
        assert set(bought.tolist()) == set(np.asarray(expected).tolist())
        chosen[wrong] = set(bought.tolist())
    top_b = set(np.asarray(selection.select_margin(jnp.asarray(probs), available, b)).tolist())
    assert chosen[0] == top_b
    assert chosen[25] != top_b and chosen[50] != top_b and chosen[25] != chosen[50]

"""Losses and calibration against references written independently in numpy."""

import jax
import jax.numpy as jnp
import numpy as np
import pytest

from titans import losses


def np_log_softmax(z):
    z = z - z.max(-1, keepdims=True)
    return z - np.log(np.exp(z).sum(-1, keepdims=True))


@pytest.fixture
def batch():
    rng = np.random.default_rng(0)
    return (
        (rng.normal(size=(16, 10)) * 3).astype(np.float32),
        (rng.normal(size=(16, 10)) * 3).astype(np.float32),
        rng.integers(0, 10, 16),
    )


def test_cross_entropy(batch):
    s, _, y = batch
    ref = -np_log_softmax(s.astype(np.float64))[np.arange(16), y]
    np.testing.assert_allclose(losses.cross_entropy(s, y), ref, rtol=1e-5)


def test_cross_entropy_label_smoothing(batch):
    s, _, y = batch
    eps = 0.1
    target = np.full((16, 10), eps / 10)
    target[np.arange(16), y] += 1 - eps
    ref = -(target * np_log_softmax(s.astype(np.float64))).sum(-1)
    np.testing.assert_allclose(losses.cross_entropy(s, y, eps), ref, rtol=1e-5)


@pytest.mark.parametrize("temperature", [1.0, 4.0])
def test_kd_divergence(batch, temperature):
    s, t, _ = batch
    pt = np.exp(np_log_softmax(t.astype(np.float64) / temperature))
    ref = temperature**2 * (pt * (np.log(pt) - np_log_softmax(s.astype(np.float64) / temperature))).sum(-1)
    np.testing.assert_allclose(losses.kd_divergence(s, t, temperature), ref, rtol=1e-4, atol=1e-6)


def test_kd_is_zero_when_student_equals_teacher(batch):
    _, t, _ = batch
    np.testing.assert_allclose(losses.kd_divergence(t, t, 4.0), 0.0, atol=1e-5)


def test_hard_distillation_and_mix(batch):
    s, t, y = batch
    hard = -np_log_softmax(s.astype(np.float64))[np.arange(16), t.argmax(-1)]
    np.testing.assert_allclose(losses.hard_distillation(s, t), hard, rtol=1e-5)
    ce = -np_log_softmax(s.astype(np.float64))[np.arange(16), y]
    pt = np.exp(np_log_softmax(t.astype(np.float64) / 2.0))
    kd = 4.0 * (pt * (np.log(pt) - np_log_softmax(s.astype(np.float64) / 2.0))).sum(-1)
    np.testing.assert_allclose(
        losses.distillation_loss(s, t, y, kind="kd", alpha=0.7, temperature=2.0), 0.7 * kd + 0.3 * ce, rtol=1e-4
    )
    np.testing.assert_allclose(
        losses.distillation_loss(s, t, y, kind="hard", alpha=0.5), 0.5 * hard + 0.5 * ce, rtol=1e-5
    )


def test_teacher_gets_no_gradient(batch):
    s, t, y = batch
    g = jax.grad(lambda t_: losses.distillation_loss(s, t_, y, alpha=0.5).sum())(jnp.asarray(t))
    assert float(jnp.abs(g).max()) == 0.0


def test_ece_matches_numpy(batch):
    s, _, y = batch
    mask = np.ones(16, bool)
    mask[-3:] = False
    bins = losses.calibration_bins(s, y, mask, 15)
    p = np.exp(np_log_softmax(s.astype(np.float64)))[mask]
    conf, pred, yy = p.max(-1), p.argmax(-1), y[mask]
    ece = 0.0
    for b in range(15):
        lo, hi = b / 15, (b + 1) / 15
        sel = (conf >= lo) & ((conf < hi) if b < 14 else (conf <= hi))
        if sel.any():
            ece += sel.sum() / len(conf) * abs((pred[sel] == yy[sel]).mean() - conf[sel].mean())
    assert losses.expected_calibration_error(bins) == pytest.approx(ece, abs=1e-5)
    assert float(bins[0].sum()) == 13


def np_softmax(z):
    return np.exp(np_log_softmax(z))


@pytest.mark.parametrize("rule", ["confidence", "margin", "correctness", "agreement"])
def test_easy_weights(batch, rule):
    s, t, y = batch
    pt, ps = np_softmax(t.astype(np.float64)), np_softmax(s.astype(np.float64))
    srt = np.sort(pt, -1)
    easiness = {
        "confidence": pt.max(-1),
        "margin": srt[:, -1] - srt[:, -2],
        "correctness": pt[np.arange(16), y],
        "agreement": ps[np.arange(16), pt.argmax(-1)],
    }[rule]
    ref = 0.2 + 0.8 * easiness**3.0
    got = losses.easy_weights(t, y, s, rule=rule, sharpness=3.0, floor=0.2)
    np.testing.assert_allclose(got, ref, rtol=1e-4, atol=1e-7)


def test_easy_weights_sharpness_zero_is_standard(batch):
    s, t, y = batch
    np.testing.assert_allclose(losses.easy_weights(t, y, s, rule="margin", sharpness=0.0, floor=0.0), 1.0)


def _np_defer(s1, t, y, alpha, defer_weight, temperature, cost):
    """The defer objective in numpy, from its definition (float64)."""
    logp = np_log_softmax(s1.astype(np.float64))
    pt = np_softmax(t.astype(np.float64))
    t_y = pt[np.arange(len(y)), y]
    ce = -logp[np.arange(len(y)), y]
    pt_T = np_softmax(t.astype(np.float64) / temperature)
    logq_T = np_log_softmax(s1[:, :10].astype(np.float64) / temperature)
    kl = (pt_T * (np.log(pt_T) - logq_T)).sum(-1) * temperature**2
    return (1 - alpha) * ce + alpha * kl - defer_weight * np.maximum(t_y - cost, 0) * logp[:, 10]


@pytest.mark.parametrize("temperature, cost", [(1.0, 0.0), (4.0, 0.0), (4.0, 0.3)])
def test_defer_surrogate(batch, temperature, cost):
    """Against the numpy definition; the temperature and the deferral cost both reach the loss
    (each changes it), and the teacher gets no gradient."""
    s, t, y = batch
    rng = np.random.default_rng(1)
    s1 = np.concatenate([s, rng.normal(size=(16, 1)).astype(np.float32)], -1)  # C + 1 outputs
    got = losses.defer_surrogate(s1, t, y, alpha=0.8, defer_weight=0.5, temperature=temperature, defer_cost=cost)
    np.testing.assert_allclose(got, _np_defer(s1, t, y, 0.8, 0.5, temperature, cost), rtol=1e-5, atol=1e-6)
    other_t = losses.defer_surrogate(
        s1, t, y, alpha=0.8, defer_weight=0.5, temperature=temperature + 1.0, defer_cost=cost
    )
    other_c = losses.defer_surrogate(
        s1, t, y, alpha=0.8, defer_weight=0.5, temperature=temperature, defer_cost=0.0 if cost else 0.05
    )
    assert not np.allclose(got, other_t) and not np.allclose(got, other_c)
    # d loss / d defer-logit at alpha = 0 (pure CE + defer term), c = 0: p_defer * (1 + t_y) - t_y.
    g = jax.grad(lambda z: losses.defer_surrogate(z, t, y, alpha=0.0).sum())(jnp.asarray(s1))
    logp = np_log_softmax(s1.astype(np.float64))
    p_defer, t_y = np.exp(logp[:, 10]), np_softmax(t.astype(np.float64))[np.arange(16), y]
    np.testing.assert_allclose(g[:, 10], p_defer * (1 + t_y) - t_y, rtol=1e-4, atol=1e-6)
    assert float(jnp.abs(jax.grad(lambda tt: losses.defer_surrogate(s1, tt, y).sum())(jnp.asarray(t))).max()) == 0.0


def _np_flatten(s, t, y, h, alpha, temperature):
    """The flattened-KD loss written out in numpy: target (1 - h) * softmax(t / T) + h / C."""
    C = s.shape[-1]
    q = (1 - h[:, None]) * np_softmax(t.astype(np.float64) / temperature) + h[:, None] / C
    log_s = np_log_softmax(s.astype(np.float64) / temperature)
    kl = (q * (np.log(q) - log_s)).sum(-1) * temperature**2
    ce = -np_log_softmax(s.astype(np.float64))[np.arange(len(y)), y]
    return alpha * kl + (1 - alpha) * (1 - h) * ce


def test_flattened_distillation(batch):
    """Against numpy; h = 0 is standard Hinton KD; at h = 1 the uniform student is the optimum (zero
    gradient there) while standard KD still pulls it towards the teacher; the teacher and h get no gradient."""
    s, t, y = batch
    h = np.linspace(0.0, 1.0, 16).astype(np.float32)
    got = losses.flattened_distillation(s, t, y, h, alpha=0.7, temperature=3.0)
    np.testing.assert_allclose(got, _np_flatten(s, t, y, h, 0.7, 3.0), rtol=1e-5, atol=1e-5)
    zero = losses.flattened_distillation(s, t, y, np.zeros(16, np.float32), alpha=0.7, temperature=3.0)
    np.testing.assert_allclose(zero, losses.distillation_loss(s, t, y, alpha=0.7, temperature=3.0), rtol=1e-5)
    uniform = jnp.zeros((16, 10))
    g_flat = jax.grad(lambda z: losses.flattened_distillation(z, t, y, jnp.ones(16), temperature=3.0).sum())(uniform)
    g_std = jax.grad(lambda z: losses.distillation_loss(z, t, y, temperature=3.0).sum())(uniform)
    assert float(jnp.abs(g_flat).max()) < 1e-6 and float(jnp.abs(g_std).max()) > 0.01
    g_t = jax.grad(lambda tt: losses.flattened_distillation(s, tt, y, jnp.asarray(h)).sum())(jnp.asarray(t))
    assert float(jnp.abs(g_t).max()) == 0.0


def test_mozannar_sontag_defer_matches_a_hand_computed_3_class_example():
    """p = (0.1, 0.2, 0.3 | defer 0.4), teacher q = (0.7, 0.2, 0.1): L = -sum q log p_{1..3} - 1[expert right] log p_defer,
    both terms at weight 1 (by hand: 2.054095 + 0.916291 = 2.970386 where the teacher is right, 2.054095 where it
    is wrong, and 2.054095 + 0.75 * 0.916291 with a deferral cost of 0.25)."""
    student = jnp.log(jnp.array([[0.1, 0.2, 0.3, 0.4]] * 2))
    teacher = jnp.log(jnp.array([[0.7, 0.2, 0.1]] * 2))
    labels = jnp.array([0, 1])  # the teacher's argmax is class 0: right on row 0, wrong on row 1
    got = losses.mozannar_sontag_defer(student, teacher, labels)
    np.testing.assert_allclose(got, [2.970386, 2.054095], atol=1e-5)
    costly = losses.mozannar_sontag_defer(student, teacher, labels, defer_cost=0.25)
    np.testing.assert_allclose(costly, [2.054095 + 0.75 * 0.916291, 2.054095], atol=1e-5)


def test_easy_weight_strength_raises_the_whole_weight_to_a_power():
    """weight = (floor + (1 - floor) s^sharpness)^strength: strength 16 turns a weight of 0.9468 (a teacher 0.97 sure)
    into 0.4166, and strength 1 leaves it."""
    teacher = jnp.log(jnp.array([[0.97, 0.02, 0.01]]))
    labels = jnp.array([0])
    w1 = losses.easy_weights(teacher, labels, None, rule="confidence", sharpness=2.0, floor=0.1)
    w16 = losses.easy_weights(teacher, labels, None, rule="confidence", sharpness=2.0, floor=0.1, strength=16.0)
    np.testing.assert_allclose(w1, [0.1 + 0.9 * 0.97**2], rtol=1e-5)
    np.testing.assert_allclose(w16, [(0.1 + 0.9 * 0.97**2) ** 16], rtol=1e-4)

"""Which pool points to buy teacher soft labels for: the selection strategies, all in JAX.

Every strategy takes the student's view of the unlabelled pool and an `available` mask (points
not bought yet) and returns exactly `b` distinct pool indices:

  random     b available points uniformly at random, without replacement;
  margin     the b smallest margins p(top1) - p(top2) of the student's softmax;
  entropy    the b largest softmax entropies;
  kcenter    k-center greedy (the coreset of Sener & Savarese, 2018) on the student's embeddings:
             repeatedly the available point farthest from every labelled, bought or already
             chosen point; O(b * pool * dim), the costly one;
  robust     the robust game-theoretic selection below, sampled with DepRound.

Robust selection (docs/methods.md#robust-active-distillation; Baykal et al., 2023). The exact game is left open there; this is
the formulation built here. Each pool point i has an informativeness g_i >= 0 from the student
(1 - margin by default). The learner picks inclusion probabilities p in
P = {p in [0, 1]^n : sum(p) = b}. An adversary that sees p (not the sample drawn from it) makes the
teacher wrong on up to m pool points; a point with a wrong soft label contributes nothing. The
learner maximises the worst case

    f(p) = sum_i p_i g_i  -  max_{|S| <= m} sum_{i in S} p_i g_i
         = sum_i p_i g_i  -  (sum of the m largest values of p_i g_i),

a concave function of p (for fractional m, the m-th value counts with weight frac(m)). By LP
duality, top_m(v) = min_t m t + sum_i (v_i - t)_+, so

    max_p f(p) = max_{t >= 0} V(t),   V(t) = max_{p in P} sum_i min(p_i g_i, t) - m t.

For fixed t the inner problem is a fractional knapsack: point i yields g_i per unit of p up to
p_i = min(1, t / g_i), so the budget is filled in decreasing order of g. Points with g_i > t sit
at the "water level" p_i g_i = t, with p_i = t / g_i < 1; the rest get p_i = 1 until b is spent.
V is concave in t and its slope is k - m - g_r * sum_{i < k} 1 / g_i (k: level points fully
allocated, g_r: the marginal point's g), so t* is found by bisection on the slope's sign; each
evaluation is O(log n) after one sort and prefix sums. With m = 0 this is the greedy top-b (all
mass on the most informative points); as m grows the mass is spread over more, less informative
points instead of being piled on the ones where a wrong teacher would hurt most.

m, the number of teacher mistakes among the b bought points, is estimated on a small labelled
validation split: m = b * (teacher error on it) ("overall"), or b * (teacher error on the
validation points the student finds most informative) ("informative").

DepRound (dependent rounding; Gandhi et al., 2006) then draws exactly b distinct points with
P(i chosen) = p_i. Pairs of fractional entries are rounded against each other (one becomes 0 or 1,
sum and marginals preserved); here the pairs are formed as a tournament tree, so the whole draw is
log2(n) vectorised levels instead of n sequential steps.
"""

from __future__ import annotations

import functools

import jax
import jax.numpy as jnp
import numpy as np

STRATEGIES = ("random", "margin", "entropy", "kcenter", "robust")
INFORMATIVENESS = ("margin", "entropy")


class SelectionError(ValueError):
    """A selection that cannot be made (budget larger than the available pool, bad inputs)."""


# ------------------------------------------------------------------------------ scores


def margin(probs: jax.Array) -> jax.Array:
    """p(top1) - p(top2) per row: small = uncertain."""
    top2 = jax.lax.top_k(probs, 2)[0]
    return top2[:, 0] - top2[:, 1]


def entropy(probs: jax.Array) -> jax.Array:
    """Shannon entropy (nats) per row: large = uncertain."""
    p = jnp.clip(probs, 1e-12, 1.0)
    return -jnp.sum(probs * jnp.log(p), axis=-1)


def informativeness(probs: jax.Array, kind: str = "margin") -> jax.Array:
    """Non-negative informativeness g_i for the robust game: 1 - margin, or entropy / log(K)."""
    if kind == "margin":
        return 1.0 - margin(probs)
    if kind == "entropy":
        return entropy(probs) / jnp.log(probs.shape[-1])
    raise SelectionError(f"Unknown informativeness {kind!r}; expected one of {list(INFORMATIVENESS)}.")


def _check_budget(available, b: int) -> None:
    n_av = int(np.asarray(jax.device_get(jnp.sum(available))))
    if not 0 < b <= n_av:
        raise SelectionError(f"Cannot select b={b} points: {n_av} pool points are available.")


@functools.partial(jax.jit, static_argnames=("b",))
def _top_b(scores, available, b: int):
    """Indices of the b largest scores among available points (unavailable ones never chosen)."""
    masked = jnp.where(available, scores, -jnp.inf)
    return jax.lax.top_k(masked, b)[1]


def select_margin(probs, available, b: int):
    _check_budget(available, b)
    return _top_b(-margin(probs), available, b)


def select_entropy(probs, available, b: int):
    _check_budget(available, b)
    return _top_b(entropy(probs), available, b)


def select_random(key, available, b: int):
    """b available points uniformly without replacement (the b largest of i.i.d. uniforms)."""
    _check_budget(available, b)
    return _top_b(jax.random.uniform(key, available.shape), available, b)


# ------------------------------------------------------------------------- k-center greedy


@functools.partial(jax.jit, static_argnames=("b", "chunk"))
def _kcenter(pool_emb, centre_emb, available, b: int, chunk: int):
    pool_emb = pool_emb.astype(jnp.float32)
    sq = jnp.sum(pool_emb**2, -1)

    def dist_to(c):  # squared distances of every pool point to the rows of c: (n, len(c))
        return jnp.maximum(sq[:, None] - 2.0 * pool_emb @ c.T + jnp.sum(c**2, -1)[None, :], 0.0)

    n_c = centre_emb.shape[0]
    d = jnp.full(sq.shape, jnp.inf, jnp.float32)
    if n_c:
        pad = (-n_c) % chunk
        blocks = jnp.pad(centre_emb.astype(jnp.float32), ((0, pad), (0, 0)), mode="edge")
        blocks = blocks.reshape(-1, chunk, centre_emb.shape[1])
        d = jax.lax.fori_loop(0, blocks.shape[0], lambda i, d: jnp.minimum(d, dist_to(blocks[i]).min(1)), d)
    d = jnp.where(available, d, -jnp.inf)

    def pick(i, carry):
        d, chosen = carry
        j = jnp.argmax(d)
        d = jnp.minimum(d, dist_to(pool_emb[j][None])[:, 0]).at[j].set(-jnp.inf)
        return d, chosen.at[i].set(j)

    return jax.lax.fori_loop(0, b, pick, (d, jnp.zeros((b,), jnp.int32)))[1]


def select_kcenter(pool_emb, centre_emb, available, b: int, chunk: int = 1024):
    """k-center greedy: b available pool points, each the farthest (Euclidean) from all centres
    (labelled and bought points' embeddings, then the points chosen so far)."""
    _check_budget(available, b)
    if pool_emb.ndim != 2 or (centre_emb.size and centre_emb.shape[1] != pool_emb.shape[1]):
        raise SelectionError(
            f"Embeddings must be (n, dim) with the same dim; got pool {pool_emb.shape}, centres {centre_emb.shape}."
        )
    return _kcenter(pool_emb, jnp.asarray(centre_emb).reshape(-1, pool_emb.shape[1]), available, b, chunk)


# ------------------------------------------------------------------------ the robust game


@jax.jit
def game_probabilities(gain, b, m):
    """Inclusion probabilities p maximising sum(p g) - top_m(p g) over {0 <= p <= 1, sum p = b}.

    gain: (n,) non-negative informativeness (points not available must have gain 0 and are then
    only chosen when b exceeds the number of positive gains); b: budget (<= n); m: the number of
    adversarial teacher mistakes (float, >= 0). Returns (p, t*) with p in the original order.
    """
    gain = jnp.maximum(gain.astype(jnp.float32), 0.0)
    n = gain.shape[0]
    b = jnp.asarray(b, jnp.float32)
    m = jnp.asarray(m, jnp.float32)
    order = jnp.argsort(-gain)
    g = gain[order]  # descending
    inv = jnp.where(g > 0, 1.0 / jnp.where(g > 0, g, 1.0), 0.0)
    s_inv = jnp.concatenate([jnp.zeros(1), jnp.cumsum(inv)])  # s_inv[j] = sum_{i<j} 1/g_i
    g_ext = jnp.concatenate([g, jnp.zeros(1)])

    def allocation(t):
        """(k, full, rem): the first k points sit at the level t, points k..full-1 get p = 1, point
        `full` gets the remaining budget `rem` (as p), nothing after it."""
        k = jnp.sum(g > t)  # level points: g_i > t (a prefix, g is sorted)
        level_cost = t * s_inv[k]
        # Budget runs out among the level points: j full level points, the next one partial.
        j = jnp.clip(jnp.searchsorted(s_inv, b / jnp.maximum(t, 1e-30), side="right") - 1, 0, k)
        in_level = level_cost >= b
        left = b - level_cost
        full_b = jnp.minimum(k + jnp.floor(left).astype(jnp.int32), n)
        full = jnp.where(in_level, j, full_b)
        rem = jnp.where(in_level, b - t * s_inv[j], left - jnp.floor(left))
        kk = jnp.where(in_level, j, k)  # level points fully allocated
        return kk, full, rem

    def slope(t):
        kk, full, _ = allocation(t)
        return kk - m - g_ext[full] * s_inv[kk]

    def bisect(_, lohi):
        lo, hi = lohi
        mid = 0.5 * (lo + hi)
        up = slope(mid) > 0
        return jnp.where(up, mid, lo), jnp.where(up, hi, mid)

    lo, hi = jax.lax.fori_loop(0, 64, bisect, (jnp.zeros(()), jnp.max(g) + 1e-6))
    t = hi
    kk, full, rem = allocation(t)
    pos = jnp.arange(n)
    level_p = jnp.minimum(1.0, t * inv)
    p_sorted = jnp.where(pos < kk, level_p, jnp.where(pos < full, 1.0, 0.0))
    p_sorted = jnp.where(pos == full, rem, p_sorted)
    p_sorted = jnp.clip(p_sorted, 0.0, 1.0)
    # When m >= b the adversary can spoil everything and V peaks at a small t that leaves budget
    # unspent. f is non-decreasing in every p_i, so spreading the rest evenly keeps p optimal.
    short = jnp.maximum(b - jnp.sum(p_sorted), 0.0)
    p_sorted = p_sorted + (1.0 - p_sorted) * jnp.minimum(1.0, short / jnp.maximum(jnp.sum(1.0 - p_sorted), 1e-30))
    p = jnp.zeros(n, jnp.float32).at[order].set(p_sorted)
    return p, t


def game_value(p, gain, m: float) -> float:
    """f(p) = sum(p g) - (fractional) sum of the m largest p_i g_i, in float64 numpy."""
    v = np.sort(np.asarray(p, np.float64) * np.asarray(gain, np.float64))[::-1]
    whole = int(np.floor(m))
    top = v[:whole].sum() + ((m - whole) * v[whole] if whole < len(v) else 0.0)
    return float(v.sum() - top)


def estimate_mistakes(
    teacher_pred, labels, b: int, *, student_gain=None, kind: str = "overall", informative_fraction: float = 0.2
) -> float:
    """m = b * the teacher's error rate on a labelled validation split.

    kind "overall": error over the whole split; "informative": error over the validation points
    with the largest student informativeness (`informative_fraction` of them), where the robust
    selection puts its mass and where a teacher is usually wrong more often; "zero": m = 0, the
    ablation that assumes a perfect teacher (the game then has nothing to hedge against).
    """
    teacher_pred, labels = np.asarray(teacher_pred), np.asarray(labels)
    if len(labels) == 0:
        raise SelectionError("The teacher's mistakes are estimated on a labelled validation split; it is empty.")
    wrong = teacher_pred != labels
    if kind == "zero":
        return 0.0
    if kind == "overall":
        err = wrong.mean()
    elif kind == "informative":
        if student_gain is None:
            raise SelectionError(
                "m_estimate='informative' needs the student's informativeness on the validation split."
            )
        k = max(1, int(round(informative_fraction * len(labels))))
        err = wrong[np.argsort(-np.asarray(student_gain), kind="stable")[:k]].mean()
    else:
        raise SelectionError(f"Unknown m_estimate {kind!r}; expected 'overall', 'informative' or 'zero'.")
    return float(b * err)


# -------------------------------------------------------------------------------- DepRound


@jax.jit
def depround(key, p):
    """Dependent rounding: a 0/1 vector with exactly sum(p) ones and P(x_i = 1) = p_i.

    p: (n,) in [0, 1] with an integer sum. Entries are paired in a tournament tree; in each pair
    (x, y), with a = min(1 - x, y) and c = min(x, 1 - y), (x + a, y - a) with probability
    c / (a + c), else (x - c, y + c): expectations are kept and at least one of the two becomes 0
    or 1 (it is final); the other goes up to the next level. The tree is walked with fixed-shape
    arrays (level L pairs positions j * 2^(L+1) and j * 2^(L+1) + 2^L) in a `fori_loop`: one small
    program, log2(n) vectorised levels, one uniform number per pair.
    """
    n = p.shape[0]
    levels = max(0, (n - 1).bit_length())
    size = 1 << levels
    pos = jnp.arange(size, dtype=jnp.int32)
    u_all = jax.random.uniform(key, (size,))  # pair j of level L reads u_all[size - size / 2^L + j]

    def level(lvl, carry):
        idx, val, out = carry
        stride = jnp.left_shift(1, lvl)
        left = (pos & (2 * stride - 1)) == 0  # the left member of a pair at this level
        x, y = val, jnp.roll(val, -stride)
        ia, ib = idx, jnp.roll(idx, -stride)
        a = jnp.minimum(1.0 - x, y)
        c = jnp.minimum(x, 1.0 - y)
        total = a + c
        u = u_all[jnp.minimum(size - jnp.right_shift(size, lvl) + jnp.right_shift(pos, lvl + 1), size - 1)]
        up = u * total < c  # probability c / (a + c): x gains a
        # Exact end points, so that a rounded entry is exactly 0 or 1.
        x_up = jnp.where(1.0 - x <= y, 1.0, x + y)
        y_up = jnp.where(1.0 - x <= y, y - (1.0 - x), 0.0)
        x_dn = jnp.where(x <= 1.0 - y, 0.0, x - (1.0 - y))
        y_dn = jnp.where(x <= 1.0 - y, y + x, 1.0)
        move = total > 0
        nx = jnp.where(move, jnp.where(up, x_up, x_dn), x)
        ny = jnp.where(move, jnp.where(up, y_up, y_dn), y)
        x_frac = (nx > 0.0) & (nx < 1.0)
        final_idx = jnp.where(left, jnp.where(x_frac, ib, ia), size)  # size: not a pair here, dropped
        out = out.at[final_idx].set(jnp.where(x_frac, ny, nx), mode="drop")
        idx = jnp.where(left, jnp.where(x_frac, ia, ib), idx)
        val = jnp.where(left, jnp.where(x_frac, nx, ny), val)
        return idx, val, out

    val = jnp.pad(jnp.clip(p.astype(jnp.float32), 0.0, 1.0), (0, size - n))
    idx, val, out = jax.lax.fori_loop(0, levels, level, (pos, val, jnp.zeros(size, jnp.float32)))
    out = out.at[idx[0]].set(jnp.round(val[0]))
    return out[:n] > 0.5


@functools.partial(jax.jit, static_argnames=("b",))
def _robust(key, gain, available, b: int, m):
    gain = jnp.where(available, gain, 0.0)
    p, _ = game_probabilities(gain, b, m)
    p = jnp.where(available, p, 0.0)
    chosen = depround(key, p)
    # Float rounding in sum(p) could leave one point too many or too few: keep exactly b, by p.
    score = jnp.where(chosen, 2.0 + p, p) + jnp.where(available, 0.0, -10.0)
    return jax.lax.top_k(score, b)[1], p


def select_robust(key, gain, available, b: int, m: float):
    """The robust selection: game probabilities from (gain, b, m), then DepRound. Returns
    (indices (b,), inclusion probabilities p (n,))."""
    _check_budget(available, b)
    if m < 0:
        raise SelectionError(f"The number of teacher mistakes m must be >= 0, got {m}.")
    return _robust(key, gain, available, b, jnp.float32(m))


def select(
    strategy: str,
    *,
    key,
    probs,
    available,
    b: int,
    embeddings=None,
    centres=None,
    m: float = 0.0,
    informativeness_kind: str = "margin",
    kcenter_chunk: int = 1024,
):
    """Dispatches to one strategy; returns (indices, extra dict)."""
    if strategy == "random":
        return select_random(key, available, b), {}
    if strategy == "margin":
        return select_margin(probs, available, b), {}
    if strategy == "entropy":
        return select_entropy(probs, available, b), {}
    if strategy == "kcenter":
        if embeddings is None or centres is None:
            raise SelectionError("kcenter needs the student's embeddings of the pool and of the centres.")
        return select_kcenter(embeddings, centres, available, b, kcenter_chunk), {}
    if strategy == "robust":
        idx, p = select_robust(key, informativeness(probs, informativeness_kind), available, b, m)
        return idx, {"m": float(m), "max_p": float(jnp.max(p)), "support": int(jnp.sum(p > 1e-6))}
    raise SelectionError(f"Unknown strategy {strategy!r}; expected one of {list(STRATEGIES)}.")

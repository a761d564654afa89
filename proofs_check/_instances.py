"""Instance generators and brute-force oracles shared by the claim checks (random AND adversarial instances).

Every generator takes an explicit ``numpy.random.Generator``. The oracles are plain NumPy, independent of the
library's Numba kernels: exact softmax, exact cluster extents, exact law of a proposal / an MH chain.

The goodness-of-fit test here (``required_n``, ``gof``, ``sampler_test``) deliberately does not reuse
``refimpl.testing``: the checks judge the library, so the yardstick must not be the library's own code (a bug in
``refimpl.testing`` would otherwise pass both the library's tests and these checks). Both follow the same
textbook construction (Pearson's statistic on probability-mass bins, power from the noncentral chi-square with
noncentrality >= 4 n TV^2).
"""
from __future__ import annotations

import math

import numpy as np
from scipy import stats

from proofs_check._framework import Verdict
from refimpl.data import hierarchical_points
from refimpl.index.sgtree import SGTree
from refimpl.sampling import bounds

KINDS = ("sphere", "hierarchical", "duplicates", "clustered_tight", "line")


def unit_rows(X):
    n = np.linalg.norm(X, axis=1, keepdims=True)
    n[n == 0] = 1.0
    return X / n


def points(kind: str, n: int, dim: int, rng) -> np.ndarray:
    """Unit-norm targets (A3) of a given kind.

    sphere: uniform on the sphere; hierarchical: refimpl.data.hierarchical_points (planted clusters of clusters);
    duplicates: few distinct points, each repeated (exact duplicates); clustered_tight: near-duplicates at scale
    1e-6 around a few centres (deep trees); line: points on one great circle (1-D, long chains)."""
    if kind == "sphere":
        return unit_rows(rng.normal(size=(n, dim)))
    if kind == "hierarchical":
        return hierarchical_points(n, dim, branching=(4, 4), rng=rng)
    if kind == "duplicates":
        base = unit_rows(rng.normal(size=(max(1, n // 4), dim)))
        return base[rng.integers(0, base.shape[0], size=n)].copy()
    if kind == "clustered_tight":
        c = unit_rows(rng.normal(size=(3, dim)))
        return unit_rows(c[rng.integers(0, 3, size=n)] + 1e-6 * rng.normal(size=(n, dim)))
    if kind == "line":
        ang = np.sort(rng.uniform(0, 2.5, size=n))
        X = np.zeros((n, dim))
        X[:, 0], X[:, 1] = np.cos(ang), np.sin(ang)  # dim >= 2
        return X
    raise ValueError(kind)


def random_instance(rng, *, n_range=(20, 400), dims=(2, 3, 8, 32), kinds=KINDS, bases=(1.05, 1.3, 2.0)):
    kind = kinds[int(rng.integers(len(kinds)))]
    n = int(rng.integers(n_range[0], n_range[1] + 1))
    dim = int(dims[int(rng.integers(len(dims)))])
    base = float(bases[int(rng.integers(len(bases)))])
    return kind, n, dim, base, points(kind, n, dim, rng)


def build(X, base, rng) -> SGTree:
    return SGTree.build(X, base=base, rng=int(rng.integers(1 << 31)))


def drifted_tree(X, base, rng, *, rounds=10, step=0.02):
    """A tree kept valid under drift the way training keeps it (update_points + Alg. 3 maintain(0), i.e. only the
    parent-child covering of Eq. 10 is re-established). Returns (tree, points)."""
    tree = build(X, base, rng)
    ids = np.arange(X.shape[0])
    for _ in range(rounds):
        X = unit_rows(X + step * rng.normal(size=X.shape))
        tree.update_points(ids, X)
    return tree, X


def cluster_extents(tree, level):
    """For C_(level): (clustering, list of member arrays, exact max distance rep -> member per cluster)."""
    c = tree.clustering(level)
    P = tree.points
    mems, ext = [], np.zeros(len(c))
    for j in range(len(c)):
        m = tree.cluster_members(c, j)
        mems.append(m)
        ext[j] = float(np.linalg.norm(P[m] - P[c.reps[j]], axis=1).max())
    return c, mems, ext


def softmax(s):
    m = np.max(s)
    w = np.exp(s - m)
    return w / w.sum()


def log_softmax(s):
    m = np.max(s)
    return s - (m + math.log(float(np.exp(s - m).sum())))


def proposal_eq7(s, labels, rep_of_cluster):
    """Q of Eq. 7 over targets: Q(i) ∝ exp(s_{r(C(i))}); ``labels[i]`` cluster of target i."""
    return softmax(s[rep_of_cluster][labels])


def labels_from_members(n, members):
    lab = np.full(n, -1, np.int64)
    for j, m in enumerate(members):
        lab[m] = j
    if (lab < 0).any():
        raise AssertionError("clustering does not cover every target")
    if sum(len(m) for m in members) != n:
        raise AssertionError("clustering is not a partition: a target lies in two clusters")
    return lab


def mh_law(P, Q, s):
    """Exact law of independent MH (Eq. 14) with proposal Q, started from Q, after s states (s - 1 transitions)."""
    w = P / Q
    n = P.size
    # transition matrix K[y, y'] = Q(y') min(1, w(y')/w(y)) for y' != y; rest stays
    K = Q[None, :] * np.minimum(1.0, w[None, :] / w[:, None])
    np.fill_diagonal(K, 0.0)
    K[np.arange(n), np.arange(n)] = 1.0 - K.sum(axis=1)
    law = Q.copy()
    out = [law.copy()]
    for _ in range(s - 1):
        law = law @ K
        out.append(law.copy())
    return out


def tv(p, r):
    return 0.5 * float(np.abs(np.asarray(p) - np.asarray(r)).sum())


def fmt(x, digits=4):
    return f"{x:.{digits}g}"


def verdict_printed_vs_corrected(printed_violations: int, corrected_violations: int):
    """HOLDS if the printed statement survived, HOLDS_CORRECTED if only the corrected one did, FAILS otherwise."""
    if corrected_violations:
        return Verdict.FAILS
    return Verdict.HOLDS if printed_violations == 0 else Verdict.HOLDS_CORRECTED


class Smallest:
    """Keeps the smallest counterexample by a size key (ties: first found)."""

    def __init__(self):
        self.key, self.text = None, None

    def offer(self, key, text_fn):
        if self.key is None or key < self.key:
            self.key, self.text = key, text_fn()


# ---------------------------------------------------------------------------------------------------------------
# goodness of fit (own implementation, independent of the library's test harness)
ALPHA = 1e-4   # per test; every statistical check runs a handful of tests with fixed seeds
TV_DETECT = 0.02
POWER = 0.99
MIN_EXPECTED = 5.0


def bins_for(p, max_bins=50):
    """Heavy categories (p >= 1/max_bins) get their own bin, the rest contiguous bins of about equal mass."""
    p = np.asarray(p, float)
    order = np.argsort(-p, kind="stable")
    ps = p[order]
    heavy = min(int(np.sum(ps >= 1.0 / max_bins)), max_bins - 1)
    out = np.empty(p.size, np.int64)
    out[order[:heavy]] = np.arange(heavy)
    rest = ps[heavy:]
    if rest.size:
        nr = max_bins - heavy
        cum = np.cumsum(rest)
        idx = np.minimum((cum - 0.5 * rest) / max(cum[-1], 1e-300) * nr, nr - 1).astype(np.int64)
        out[order[heavy:]] = heavy + idx
    _, out = np.unique(out, return_inverse=True)
    return out, int(out.max()) + 1


def required_n(df, tv=TV_DETECT, alpha=ALPHA, power=POWER):
    """Smallest n such that Pearson's test (df) at level alpha detects any alternative at TV >= tv on the bins
    with probability >= power (noncentrality >= 4 n tv^2, since chi^2-divergence >= (2 TV)^2)."""
    crit = stats.chi2.isf(alpha, df)
    lo, hi = 1, 2
    while stats.ncx2.sf(crit, df, 4 * hi * tv * tv) < power:
        hi *= 2
    while hi - lo > 1:
        mid = (lo + hi) // 2
        lo, hi = (lo, mid) if stats.ncx2.sf(crit, df, 4 * mid * tv * tv) >= power else (mid, hi)
    return hi


def _merge_small(b, exp, min_expected=MIN_EXPECTED):
    """Merge the bins with the smallest expected counts (lightest first) until every bin expects >= min_expected
    draws, so that the chi-square approximation of Pearson's statistic holds (a bin expecting 0.01 draws would make
    one draw look like a 100-sigma event). The test's power statement then refers to the merged bins; the sample
    size computed for the unmerged number of bins is conservative (required_n grows with df)."""
    order = np.argsort(exp, kind="stable")
    new = np.empty(exp.size, np.int64)
    g, acc = 0, 0.0
    for j in order:
        new[j] = g
        acc += exp[j]
        if acc >= min_expected:
            g, acc = g + 1, 0.0
    if acc > 0 and g > 0:  # leftover lightest-group tail below the threshold: join the last closed group
        new[new == g] = g - 1
    elif acc > 0:
        g = 1  # everything in one bin
    nb = int(new.max()) + 1
    return new[b], nb


def gof(samples, p, max_bins=50):
    """Pearson chi-square of samples (ids) against p. Returns (p_value, df). Observing a p = 0 id -> p_value 0."""
    samples = np.asarray(samples).ravel()
    p = np.asarray(p, float) / np.sum(p)
    if np.any(p[samples] == 0):
        return 0.0, 0
    b, nb = bins_for(p, max_bins)
    b, nb = _merge_small(b, np.bincount(b, weights=p, minlength=nb) * samples.size)
    exp = np.bincount(b, weights=p, minlength=nb) * samples.size
    obs = np.bincount(b[samples], minlength=nb)
    stat = float(np.sum((obs - exp) ** 2 / exp))
    return float(stats.chi2.sf(stat, nb - 1)), nb - 1


def empirical_tv(samples, p):
    cnt = np.bincount(np.asarray(samples).ravel(), minlength=p.size) / np.asarray(samples).size
    return tv(cnt, p)


def sampler_test(draw, p, max_bins=50):
    """Two-stage goodness of fit of a sampler against p: ``draw(n) -> ids``; n = required_n for the bins of p.
    Stage 1 at level ALPHA; only if it rejects, stage 2 on a fresh independent sample of the same size. The sampler
    fails when both stages reject: false-alarm rate <= ALPHA^2 = 1e-8 per test (so a run of thousands of tests stays
    deterministic-safe), power >= POWER^2 ~ 0.98 against TV >= TV_DETECT on the bins. Returns (failed, p1, p2, n)."""
    n = required_n(max(bins_for(p, max_bins)[1] - 1, 1))
    ids = draw(n)
    p1, _ = gof(ids, p, max_bins)
    if p1 >= ALPHA:
        return False, p1, None, n
    p2, _ = gof(draw(n), p, max_bins)
    return p2 < ALPHA, p1, p2, n


def start_level(tree, beta, q_norm=1.0, c=1.5):
    """A fixed start level for the checks: Prop. 2's level for gamma = e^{2c} with beta ||q|| (per-cluster inflation
    about e^c). Independent of the library's default_level, so the checks' cost and instances stay stable."""
    return int(bounds.prop2_level(math.exp(2 * c), beta * max(float(q_norm), 1e-300), float(tree.base)))

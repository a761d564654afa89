"""Statistical exactness tests of the softmax samplers against brute force.

Every goodness-of-fit test here is Pearson's chi-square (refimpl.testing.chi2_gof, at most 100 bins) at
level ALPHA = 0.001 with N_DRAWS = 64,143 draws: by the noncentral chi-square power computation in
refimpl.testing, this sample size detects any deviation of total variation >= 0.02 on the bins with
probability >= 0.99 (at df = 99; fewer bins only raise the power). Seeds are fixed, so each test is
deterministic; the negative controls show that the same test does fail on a sampler that is slightly wrong.
"""
from __future__ import annotations

import numpy as np
import pytest

from refimpl.sampling import samplers as S
from refimpl.testing import ALPHA, POWER, TV, chi2_gof, required_sample_size, tv_distance
from refimpl.sampling.clustering import cluster_members, find_clustering, refine_clustering
from refimpl.data import hierarchical_points
from refimpl.index.sgtree import SGTree

N_DRAWS = required_sample_size(TV)
N_POINTS = 1000
BETAS = (1.0, 5.0, 20.0)
DIMS = (2, 8, 64)


# ----------------------------------------------------------------------------------------------------------------
# instances


_TREES = {}


def _instance(kind, dim):
    """(points, tree, query) for an instance kind; cached per module (tree building costs)."""
    key = (kind, dim)
    if key in _TREES:
        return _TREES[key]
    rng = np.random.default_rng(100 + dim)
    X = hierarchical_points(N_POINTS, dim, rng=dim)
    if kind == "nonunit":
        X = X * rng.uniform(0.3, 3.0, size=(N_POINTS, 1))
    if kind == "dup":
        src = rng.integers(0, N_POINTS // 2, size=N_POINTS // 2)
        X[N_POINTS // 2:] = X[src]  # half of the points are exact copies
    tree = SGTree.build(X, rng=1)
    if kind == "dynamic":
        ids = rng.choice(N_POINTS, size=N_POINTS // 3, replace=False)
        Y = X[ids] + 0.05 * rng.normal(size=(ids.size, dim)) / np.sqrt(dim)
        Y /= np.linalg.norm(Y, axis=1, keepdims=True)
        tree.update_points(ids, Y, repair=False)
        tree.maintain(0.1, rng=2)
        X = X.copy()
        X[ids] = Y
    q = X[7] + 0.1 * rng.normal(size=dim) / np.sqrt(dim)
    q /= np.linalg.norm(q)
    if kind == "nonunit":
        q *= 1.7
    _TREES[key] = (X, tree, q)
    return _TREES[key]


def _level(tree, beta, c):
    """Prop. 2's level for gamma = e^{2c} (largest l with b^l <= c/beta): fixes the negative controls' levels
    independently of the library's default."""
    from refimpl.sampling import bounds

    return bounds.prop2_level(np.exp(2 * c), beta, tree.base)


def _softmax(X, q, beta, exclude=()):
    s = beta * (X @ q)
    s[list(exclude)] = -np.inf
    p = np.exp(s - s.max())
    return p / p.sum()


GRID = [("unit", d, b) for d in DIMS for b in BETAS]
GRID += [("nonunit", 8, b) for b in BETAS] + [("nonunit", 64, 5.0)]
GRID += [("dup", 8, b) for b in BETAS] + [("dup", 2, 5.0)]
GRID += [("dynamic", 8, b) for b in BETAS] + [("dynamic", 64, 20.0)]


@pytest.mark.parametrize("kind,dim,beta", GRID)
def test_rejection_alg1_is_exact(kind, dim, beta):
    """Alg. 1 (sample_rejection) matches the exact softmax: chi-square at alpha 0.001, n = 64,143 (power >= 0.99
    against TV >= 0.02). Trees: unit / non-unit norms, exact duplicates, after update_points + maintain. Start
    level: Prop. 2's for gamma = e^3 (the library default, gamma = e^12, is tested below and costs ~e^4.5 more
    attempts per draw). No draw may come from the (disabled) fallback."""
    X, tree, q = _instance(kind, dim)
    assert tree.check_invariants() == []
    r = S.sample_rejection(tree, q, N_DRAWS, beta=beta, rng=11, level=_level(tree, beta * np.linalg.norm(q), 1.5))
    assert r.stats["fallbacks"] == 0 and r.stats["accepted"] == N_DRAWS
    pval = chi2_gof(r.ids, _softmax(X, q, beta))[0]
    assert pval > ALPHA, (kind, dim, beta, pval)


@pytest.mark.parametrize("kind,dim,beta", [g for g in GRID if g[0] == "unit" or g[1] == 8])
def test_rejection_alg1_other_start_level_is_exact(kind, dim, beta):
    """Same test with the start level 3 above (deeper descents, more restarts)."""
    X, tree, q = _instance(kind, dim)
    lvl = _level(tree, beta * np.linalg.norm(q), 1.5) + 3
    r = S.sample_rejection(tree, q, N_DRAWS, beta=beta, rng=12, level=lvl)
    assert chi2_gof(r.ids, _softmax(X, q, beta))[0] > ALPHA


@pytest.mark.parametrize("kind,dim,beta", GRID)
def test_flat_rejection_is_exact(kind, dim, beta):
    """Flat rejection (Eq. 3-5 with per-cluster eps_C) on a level clustering of the tree matches the softmax
    (chi-square, alpha 0.001, n = 64,143, power >= 0.99 at TV 0.02)."""
    X, tree, q = _instance(kind, dim)
    r = S.sample_flat_rejection(tree, q, N_DRAWS, beta=beta, rng=13, level=_level(tree, beta * np.linalg.norm(q), 1.5))
    assert chi2_gof(r.ids, _softmax(X, q, beta))[0] > ALPHA


@pytest.mark.parametrize("dim", [8, 64])
def test_default_level_is_exact(dim):
    """Both rejection samplers at the library's default start level (beta = 5), same test and power."""
    X, tree, q = _instance("unit", dim)
    for f in (S.sample_rejection, S.sample_flat_rejection):
        r = f(tree, q, N_DRAWS, beta=5.0, rng=19)
        assert chi2_gof(r.ids, _softmax(X, q, 5.0))[0] > ALPHA


def test_flat_rejection_on_array_clustering_is_exact():
    """Flat rejection on a clustering given as arrays (no tree: a Voronoi partition around 100 random points) is
    exact too (same test and power)."""
    from refimpl.sampling.clustering import partition_clustering

    X, _, q = _instance("unit", 8)
    centres = X[np.random.default_rng(3).choice(N_POINTS, 100, replace=False)]
    labels = np.argmin(((X[:, None, :] - centres[None]) ** 2).sum(-1), axis=1)
    cl = partition_clustering(X, labels)
    r = S.sample_flat_rejection(X, q, N_DRAWS, beta=5.0, rng=14, clustering=cl)
    assert chi2_gof(r.ids, _softmax(X, q, 5.0))[0] > ALPHA


# ----------------------------------------------------------------------------------------------------------------
# negative controls: the same test must fail on the broken variants


@pytest.mark.parametrize("dim,above", [(2, 3), (8, 4)])
def test_negative_control_radius_b_to_the_l_fails(dim, above):
    """Alg. 1 with the printed radius b^l (instead of MAXD / rho) and the restart weight clipped at 0 is NOT exact:
    the same chi-square test rejects it (beta = 5, start 3-4 levels above the default, where b^l underestimates
    the true radius often enough; closer to the leaves the broken variant is often indistinguishable)."""
    X, tree, q = _instance("unit", dim)
    level = _level(tree, 5.0, 1.5) + above
    r = S._rejection(tree, q, N_DRAWS, beta=5.0, rng=15, level=level, broken=True)
    assert chi2_gof(r.ids, _softmax(X, q, 5.0))[0] < ALPHA


def test_negative_control_authors_fallback_fails():
    """The authors' fallback (return the unaccepted proposal after too many restarts; here 10, where the correct
    sampler needs ~5 attempts per draw, so ~10% of the draws fall back) is NOT exact: the same chi-square test
    rejects it, while the correct sampler at the same level passes."""
    X, tree, q = _instance("unit", 8)
    level = _level(tree, 5.0, 1.5) + 1
    r = S._rejection(tree, q, N_DRAWS, beta=5.0, rng=16, level=level, fallback_after=10)
    assert r.stats["fallbacks"] > 0
    assert chi2_gof(r.ids, _softmax(X, q, 5.0))[0] < ALPHA
    r = S.sample_rejection(tree, q, N_DRAWS, beta=5.0, rng=16, level=level)
    assert chi2_gof(r.ids, _softmax(X, q, 5.0))[0] > ALPHA


def test_negative_control_topk_heuristic_is_not_a_softmax_sampler():
    """The experiments' shortcut (top clusters, chains of length 2, top-scoring targets) fails the exactness test:
    with k = 1 it returns the better of 2 chain states, which over-weights high logits. 4,000 draws suffice
    here (power >= 0.99 against TV >= 0.08 on <= 100 bins: n = 4,009 by the same computation)."""
    X, tree, q = _instance("unit", 8)
    n = required_sample_size(0.08)
    assert n <= 4100
    ids = np.concatenate([S.sample_cluster_topk_heuristic(tree, q, 1, beta=5.0, rng=1000 + i).ids for i in range(n)])
    assert chi2_gof(ids, _softmax(X, q, 5.0))[0] < ALPHA


# ----------------------------------------------------------------------------------------------------------------
# MH: the law of the chain is what the sampler produces, and it is within Eq. 6's bound


def _mh_law(tree, X, q, beta, cl, s, proposal="eq7"):
    """Exact law of the last state of an independent MH chain of s states started from Q (Eq. 14)."""
    from refimpl.sampling import bounds

    n = X.shape[0]
    lab = np.empty(n, np.int64)
    for j in range(len(cl)):
        lab[cluster_members(tree, cl, j)] = j
    sr = beta * (X[cl.reps] @ q)
    lw = sr + (bounds.cluster_eps(beta, float(np.linalg.norm(q)), cl.radii) if proposal == "upper" else 0.0)
    lq = lw[lab]
    Q = np.exp(lq - lq.max())
    Q /= Q.sum()
    P = _softmax(X, q, beta)
    w = P / Q
    Kmat = Q[None, :] * np.minimum(1.0, w[None, :] / w[:, None])
    np.fill_diagonal(Kmat, 0.0)
    np.fill_diagonal(Kmat, 1.0 - Kmat.sum(axis=1))
    law = Q.copy()
    for _ in range(s - 1):
        law = law @ Kmat
    return law, P, float(np.max(w))


MH_GRID = [("unit", d, b) for d in DIMS for b in BETAS]
MH_GRID += [("nonunit", 8, 5.0), ("nonunit", 8, 20.0), ("dup", 8, 5.0), ("dup", 8, 20.0), ("dynamic", 8, 5.0),
            ("dynamic", 64, 20.0)]


@pytest.mark.parametrize("kind,dim,beta", MH_GRID)
def test_mh_within_eq6_bound_and_draws_follow_the_chain_law(kind, dim, beta):
    """sample_mh on the Alg. 2 clustering (certified refinement to gamma = 4, budget 300 clusters): (1) the exact law
    of a chain of s = 3 states is within Eq. 6's bound exp(-(s-1)/gamma_cert) of P, with gamma_cert >= the true
    max P/Q; (2) the sampler's draws follow that law (chi-square, alpha 0.001, n = 64,143, power >= 0.99 at
    TV 0.02), so the empirical TV to P is within the bound up to the test's resolution. Unit and non-unit norms,
    duplicates, trees after update_points + maintain."""
    X, tree, q = _instance(kind, dim)
    cl = find_clustering(tree, q, beta=beta, gamma=4.0, refine=True, max_refine_clusters=300)
    s = 3
    r = S.sample_mh(tree, q, N_DRAWS, beta=beta, rng=17, clustering=cl, chain_length=s)
    law, P, true_gamma = _mh_law(tree, X, q, beta, cl, s)
    log_gamma = r.stats["log_gamma"]
    assert np.log(true_gamma) <= log_gamma + 1e-9
    bound = np.exp(-(s - 1) / np.exp(log_gamma))
    assert abs(r.stats["tv_bound"] - bound) < 1e-12
    assert tv_distance(law, P) <= bound + 1e-12
    assert chi2_gof(r.ids, law)[0] > ALPHA
    emp = np.bincount(r.ids, minlength=X.shape[0]) / N_DRAWS
    # empirical TV within the bound plus the sampling resolution of the test (0.02 on bins; full-support noise)
    assert tv_distance(emp, P) <= bound + tv_distance(emp, law) + 1e-12


@pytest.mark.parametrize("dim,beta,proposal", [(8, 5.0, "eq7"), (64, 20.0, "eq7"), (8, 20.0, "upper")])
def test_mh_chain_length_from_eq6(dim, beta, proposal):
    """With chain_length=None the chain length is 1 + ceil(gamma_cert log(1/tv)) (Eq. 6) and the exact law of
    the chain is within tv of P."""
    X, tree, q = _instance("unit", dim)
    r = S.sample_mh(tree, q, 1000, beta=beta, rng=18, tv=0.05, proposal=proposal, max_refine_clusters=400)
    g = np.exp(r.stats["log_gamma"])
    s = r.stats["chain_length"]
    assert s == 1 + int(np.ceil(g * np.log(20.0) - 1e-12))
    assert r.stats["tv_bound"] <= 0.05
    cl = find_clustering(tree, q, beta=beta, gamma=4.0, refine=True, proposal=proposal, max_refine_clusters=400)
    law, P, true_gamma = _mh_law(tree, X, q, beta, cl, s, proposal)
    assert tv_distance(law, P) <= 0.05


# ----------------------------------------------------------------------------------------------------------------
# A* sampling over the tree's Gumbel process


N_ASTAR = required_sample_size(0.03)  # 28,508: power >= 0.99 at TV 0.03, alpha 0.001 (A* costs ~50 regions a draw)


@pytest.mark.parametrize("kind,dim,beta", [("unit", 64, 20.0), ("nonunit", 2, 1.0), ("dup", 8, 5.0), ("dynamic", 8, 5.0)])
def test_astar_is_exact(kind, dim, beta):
    """sample_astar follows the softmax (chi-square, alpha 0.001, n = 28,508, power >= 0.99 at TV 0.03), on unit,
    non-unit and duplicated data and on a tree after update_points + maintain."""
    X, tree, q = _instance(kind, dim)
    r = S.sample_astar(tree, q, N_ASTAR, beta=beta, rng=31)
    assert chi2_gof(r.ids, _softmax(X, q, beta))[0] > ALPHA
    assert r.stats["log_z_lo"] - 1e-9 <= np.logaddexp.reduce(beta * X @ q) <= r.stats["log_z_hi"] + 1e-9


def test_astar_batch_exclusion_and_without_replacement():
    """A batch of 2 queries with per-query exclusions: each row follows its renormalised softmax; without
    replacement, the first and the second draws follow the sequential law (each test: chi-square, alpha 0.001,
    n = 16,036, power >= 0.99 at TV 0.04), and no id repeats."""
    X, tree, q = _instance("unit", 8)
    Q = np.stack([q, X[500] / np.linalg.norm(X[500])])
    ex = [np.argsort(-(X @ Q[0]))[:3], np.argsort(-(X @ Q[1]))[:1]]
    n = required_sample_size(0.04)
    r = S.sample_astar(tree, Q, n, beta=5.0, rng=32, exclude=ex)
    for b in range(2):
        p = _softmax(X, Q[b], 5.0)
        p[ex[b]] = 0
        assert not np.isin(r.ids[b], ex[b]).any()
        assert chi2_gof(r.ids[b], p / p.sum())[0] > ALPHA
    r = S.sample_astar(tree, np.repeat(q[None], n, axis=0), 2, beta=5.0, rng=33, replace=False)
    assert np.all(r.ids[:, 0] != r.ids[:, 1])
    p = _softmax(X, q, 5.0)
    second = np.zeros_like(p)  # law of the second draw: sum_i p_i p_j / (1 - p_i)
    for i in range(p.size):
        pj = p.copy()
        pj[i] = 0
        second += p[i] * pj / pj.sum()
    assert chi2_gof(r.ids[:, 0], p)[0] > ALPHA
    assert chi2_gof(r.ids[:, 1], second / second.sum())[0] > ALPHA


def test_negative_control_astar_without_radius_fails():
    """A* with bounds that ignore the cluster radius (E = s_r) stops before the true argmax: the same chi-square
    test rejects it (beta = 20, where the radius term matters), while the certified bounds pass above."""
    X, tree, q = _instance("unit", 8)
    r = S._astar(tree, q, N_DRAWS, beta=20.0, rng=34, broken=True)
    assert chi2_gof(r.ids, _softmax(X, q, 20.0))[0] < ALPHA

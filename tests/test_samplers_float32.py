"""Exactness of every tree sampler on a float32 tree, for batches of queries with per-query exclusion and without
replacement, and of the adaptive rejection sampler (Eq. 3-5 on a refined envelope) on every instance kind.

Each goodness-of-fit test is Pearson's chi-square of refimpl.testing at alpha = 0.001 with the sample size of
``required_sample_size`` (power >= 0.99 against the TV stated in the test's docstring, on <= 100 bins). The law a
float32 tree's sampler must follow is the softmax of the float32-rounded points (its logits are accumulated in
float64 from the stored values). Seeds are fixed; the negative controls show that the same tests fail on a sampler
that is slightly wrong. The adaptive sampler switches to brute force here only at N inner products (fixture
``rejection_path``), so that its rejection path is what they test.
"""
from __future__ import annotations

import numpy as np
import pytest

from refimpl.data import hierarchical_points
from refimpl.index.search import preorder
from refimpl.index.sgtree import SGTree
from refimpl.sampling import _kernels as K
from refimpl.sampling import samplers as S
from refimpl.sampling.clustering import cluster_members, find_clustering, level_clustering
from refimpl.testing import ALPHA, TV, chi2_gof, required_sample_size, tv_distance
from tests.test_samplers_stats import _instance, _mh_law

# the adaptive sampler's rejection path, on trees of a few hundred to a few thousand targets (conftest.py)
pytestmark = pytest.mark.usefixtures("rejection_path")

N_DRAWS = required_sample_size(TV)  # 64,143: power >= 0.99 at TV 0.02
N_PAIR = required_sample_size(0.04)  # 16,036: power >= 0.99 at TV 0.04
EXACT_SAMPLERS = {
    "flat": S.sample_flat_rejection,
    "rejection": S.sample_rejection,
    "astar": S.sample_astar,
    "adaptive": lambda *a, **kw: S.sample_adaptive(*a, start_clusters=START, **kw),
}


START = 30  # the adaptive sampler's start level (at most 30 clusters), so that its refinement runs
K_ROW = 16  # draws per query row: the regime of the samplers (a handful of negatives per query)


def _draws(sampler, tree, q, n, **kw):
    """n draws for the query q: ceil(n / K_ROW) copies of q answered in ONE call, K_ROW draws each (iid with
    replacement), so that the adaptive sampler runs its rejection path (with n draws for ONE query, brute force
    would be the cheaper choice and it would take it). Returns (ids (n,), result)."""
    rows = -(-n // K_ROW)
    r = sampler(tree, np.repeat(np.asarray(q, np.float64)[None], rows, axis=0), K_ROW, **kw)
    return r.ids.ravel()[:n], r


def _rejection_path(r):
    """The adaptive sampler made (almost) every draw by rejection, not by its brute-force switch."""
    return int(np.sum(r.stats["exact_fallbacks"])) <= 0.01 * r.ids.size


def _softmax(X, q, beta, exclude=()):
    s = beta * (np.asarray(X, np.float64) @ q)
    s[list(exclude)] = -np.inf
    p = np.exp(s - s.max())
    return p / p.sum()


@pytest.fixture(scope="module")
def f32():
    """(float32 points, float32 tree, batch of 2 queries, per-query exclusions): D = 16, 1,500 targets."""
    X = hierarchical_points(1500, 16, rng=41, dtype=np.float32)
    tree = SGTree.build(X, rng=42, dtype=np.float32)
    assert tree.points.dtype == np.float32 and tree.check_invariants() == []
    rng = np.random.default_rng(43)
    Q = X[[5, 900]].astype(np.float64) + 0.1 * rng.normal(size=(2, 16)) / 4.0
    Q /= np.linalg.norm(Q, axis=1, keepdims=True)
    ex = [np.argsort(-(X @ Q[0]))[:4], np.argsort(-(X @ Q[1]))[[0, 2]]]
    return X, tree, Q, ex


@pytest.mark.parametrize("name", sorted(EXACT_SAMPLERS))
def test_float32_batch_with_exclusion_is_exact(f32, name):
    """A float32 tree, a batch of 2 different queries with different exclusions (their top targets), beta = 10,
    each repeated as rows of ONE call (K_ROW draws a row): the draws of each query follow its own renormalised
    softmax over the float32 points (chi-square, alpha 0.001, n = 64,143 per query, power >= 0.99 at TV 0.02);
    no excluded id is drawn."""
    X, tree, Q, ex = f32
    rows = -(-N_DRAWS // K_ROW)
    QQ = np.repeat(Q, rows, axis=0)
    r = EXACT_SAMPLERS[name](tree, QQ, K_ROW, beta=10.0, rng=44, exclude=[ex[0]] * rows + [ex[1]] * rows)
    assert r.ids.shape == (2 * rows, K_ROW)
    if name == "adaptive":
        assert _rejection_path(r)
    for b in range(2):
        ids = r.ids[b * rows:(b + 1) * rows].ravel()[:N_DRAWS]
        assert not np.isin(ids, ex[b]).any()
        assert chi2_gof(ids, _softmax(X, Q[b], 10.0, ex[b]))[0] > ALPHA, (name, b)


@pytest.mark.parametrize("name", sorted(EXACT_SAMPLERS))
def test_float32_without_replacement_is_exact(f32, name):
    """Without replacement on a float32 tree, 2 draws for each of 16,036 copies of a query (one call), with one
    excluded id: the first draw follows P renormalised over the non-excluded ids, the second the sequential law
    sum_i P_i P_j / (1 - P_i) (each chi-square at alpha 0.001, n = 16,036, power >= 0.99 at TV 0.04); the two
    draws of a row differ."""
    X, tree, Q, ex = f32
    q = Q[1]
    excl = ex[1][:1]
    r = EXACT_SAMPLERS[name](tree, np.repeat(q[None], N_PAIR, axis=0), 2, beta=10.0, rng=45, replace=False,
                             exclude=excl)
    assert np.all(r.ids[:, 0] != r.ids[:, 1]) and not np.isin(r.ids, excl).any()
    if name == "adaptive":
        assert _rejection_path(r)
    p = _softmax(X, q, 10.0, excl)
    second = np.zeros_like(p)
    for i in np.flatnonzero(p > 1e-12):
        pj = p.copy()
        pj[i] = 0
        second += p[i] * pj / pj.sum()
    assert chi2_gof(r.ids[:, 0], p)[0] > ALPHA
    assert chi2_gof(r.ids[:, 1], second / second.sum())[0] > ALPHA


def test_float32_mh_batch_follows_its_chain_law(f32):
    """sample_mh on a float32 tree, a batch of 2 queries with one clustering (certified refinement to gamma = 4):
    each row follows the exact law of its chain of s = 3 states (chi-square, alpha 0.001, n = 64,143, power
    >= 0.99 at TV 0.02), which is within Eq. 6's bound of the softmax of the float32 points."""
    X, tree, Q, _ = f32
    X64 = X.astype(np.float64)
    cl = find_clustering(tree, Q[0], beta=10.0, gamma=4.0, refine=True, max_refine_clusters=300)
    r = S.sample_mh(tree, Q, N_DRAWS, beta=10.0, rng=46, clustering=cl, chain_length=3)
    for b in range(2):
        law, P, true_gamma = _mh_law(tree, X64, Q[b], 10.0, cl, 3)
        assert tv_distance(law, P) <= np.exp(-2.0 / true_gamma) + 1e-12
        assert chi2_gof(r.ids[b], law)[0] > ALPHA, b


def test_negative_control_float32_tree_against_float64_points_fails():
    """The harness resolves float32 rounding when it matters: a sampler that draws from the softmax of the float64
    points (sample_exact on them) is rejected as a sampler of a float32 tree whose points were rounded coarsely
    (to 1/64: 0.4 % of a coordinate, beta = 20), with n = 64,143 (power >= 0.99 at TV 0.02)."""
    X = hierarchical_points(1500, 16, rng=47)
    Xr = (np.round(X * 64) / 64).astype(np.float32)
    q = X[3]
    r = S.sample_exact(X, q, N_DRAWS, beta=20.0, rng=48)
    assert chi2_gof(r.ids, _softmax(Xr, q, 20.0))[0] < ALPHA
    tree = SGTree.build(Xr, rng=49, dtype=np.float32)
    ids, r = _draws(EXACT_SAMPLERS["adaptive"], tree, q, N_DRAWS, beta=20.0, rng=48)
    assert _rejection_path(r) and chi2_gof(ids, _softmax(Xr, q, 20.0))[0] > ALPHA


# ----------------------------------------------------------------------------------------------------------------
# adaptive rejection (float64 trees of every kind)


GRID = [("unit", 8, 5.0), ("unit", 64, 20.0), ("unit", 2, 1.0), ("nonunit", 8, 20.0), ("dup", 8, 5.0),
        ("dynamic", 8, 20.0), ("dynamic", 64, 20.0)]


@pytest.mark.parametrize("kind,dim,beta", GRID)
def test_adaptive_is_exact(kind, dim, beta):
    """sample_adaptive matches the softmax (chi-square, alpha 0.001, n = 64,143, power >= 0.99 at TV 0.02; K_ROW
    draws per query row, so the rejection path runs) on unit and non-unit norms, exact duplicates and a tree after
    update_points + maintain; its log Z interval is certified."""
    X, tree, q = _instance(kind, dim)
    ids, r = _draws(EXACT_SAMPLERS["adaptive"], tree, q, N_DRAWS, beta=beta, rng=50)
    assert np.all(r.stats["accepted"] + r.stats["exact_fallbacks"] == K_ROW) and _rejection_path(r)
    assert chi2_gof(ids, _softmax(X, q, beta))[0] > ALPHA, (kind, dim, beta)
    lz = np.logaddexp.reduce(beta * X @ q)
    assert np.all(r.stats["log_z_lo"] - 1e-9 <= lz) and np.all(lz <= r.stats["log_z_hi"] + 1e-9)


@pytest.mark.parametrize("kind,start", [("unit", 300), ("nonunit", 1000), ("dynamic", 1000)])
def test_adaptive_start_frontier_and_tail_are_exact(kind, start):
    """sample_adaptive started from a deep level (up to every target a start cluster, scored by one GEMM), with
    start clusters lumped into the tail, matches the softmax (chi-square, alpha 0.001, n = 64,143, power >= 0.99 at
    TV 0.02; beta = 20, D = 8, unit and non-unit norms, a tree after update_points + maintain)."""
    X, tree, q = _instance(kind, 8)
    ids, r = _draws(S.sample_adaptive, tree, q, N_DRAWS, beta=20.0, rng=56, start_clusters=start)
    assert np.all(r.stats["lumped_clusters"] > 0) and _rejection_path(r)
    assert chi2_gof(ids, _softmax(X, q, 20.0))[0] > ALPHA, kind
    lz = np.logaddexp.reduce(20.0 * X @ q)
    assert np.all(r.stats["log_z_lo"] - 1e-9 <= lz) and np.all(lz <= r.stats["log_z_hi"] + 1e-9)


def test_negative_control_adaptive_without_radius_fails():
    """The adaptive sampler with bounds that drop the radius term (E = s_r, not an upper bound) is NOT exact: the
    same chi-square test rejects it (beta = 20, n = 64,143, the rejection path)."""
    X, tree, q = _instance("unit", 8)
    ids, r = _draws(lambda *a, **kw: S._adaptive(*a, broken=True, start_clusters=START, **kw), tree, q, N_DRAWS,
                    beta=20.0, rng=51)
    assert _rejection_path(r) and chi2_gof(ids, _softmax(X, q, 20.0))[0] < ALPHA


def test_preorder_ranges_are_the_clusters_members():
    """Every cluster (v, L) of level clusterings is {p_v} + the pre-order range [pos[first child below L],
    pos[v] + count[v]) (the adaptive sampler's O(1) member lookup), on a tree after inserts and removals."""
    from refimpl.sampling._cluster_kernels import _first_below

    X, tree, _ = _instance("dynamic", 8)
    T = tree.arrays()
    order, pos = preorder(tree)
    assert np.array_equal(np.sort(order), np.sort(tree.live_ids()))
    lo, hi = tree.level_range()
    for L in range(lo, hi + 1, max(1, (hi - lo) // 6)):
        cl = level_clustering(tree, L)
        for j in range(len(cl)):
            v = int(cl.nodes[j])
            c = _first_below(T, v, int(cl.levels[j]))
            rng_ = order[pos[c]:pos[v] + T.node_count[v]] if c != -1 else np.zeros(0, np.int64)
            got = np.sort(np.concatenate([[T.node_point[v]], rng_]))
            assert np.array_equal(got, np.sort(cluster_members(tree, cl, j))), (L, j)


def test_adaptive_after_mutation_uses_the_new_tree():
    """The pre-order is cached per tree version: after insert + remove, draws follow the softmax of the new live
    targets (chi-square, alpha 0.001, n = 64,143, power >= 0.99 at TV 0.02) and never a removed id."""
    X = hierarchical_points(800, 8, rng=52)
    tree = SGTree.build(X[:600], rng=53)
    q = X[10]
    S.sample_adaptive(tree, q, 10, beta=5.0, rng=54)
    tree.insert(X[600:])
    gone = np.arange(0, 600, 3)
    tree.remove(gone)
    ids, r = _draws(EXACT_SAMPLERS["adaptive"], tree, q, N_DRAWS, beta=5.0, rng=55)
    p = _softmax(X, q, 5.0, gone)
    assert not np.isin(ids, gone).any() and _rejection_path(r)
    assert chi2_gof(ids, p)[0] > ALPHA


def test_adaptive_switches_to_brute_force_without_structure():
    """On unstructured data (800 Gaussian points in D = 64, beta = 20, float32 tree) the envelope cannot pay for
    itself: every draw is made by brute force (stats exact_fallbacks = k), still exact (chi-square, alpha 0.001,
    n = 64,143, power >= 0.99 at TV 0.02, with one excluded id), and log Z is then the exact one."""
    rng = np.random.default_rng(56)
    X = rng.normal(size=(800, 64)).astype(np.float32)
    X /= np.linalg.norm(X, axis=1, keepdims=True)
    tree = SGTree.build(X, rng=57, dtype=np.float32)
    q = X[4].astype(np.float64)
    top = int(np.argmax(X @ X[4]))
    r = S.sample_adaptive(tree, q, N_DRAWS, beta=20.0, rng=58, exclude=[top])
    assert r.stats["exact_fallbacks"] == N_DRAWS and r.stats["attempts"] == 0
    assert chi2_gof(r.ids, _softmax(X, q, 20.0, [top]))[0] > ALPHA
    assert abs(r.stats["log_z"] - np.logaddexp.reduce(20.0 * (X.astype(np.float64) @ q))) < 1e-9


def _unstructured(seed):
    rng = np.random.default_rng(seed)
    X = rng.normal(size=(800, 64)).astype(np.float32)
    X /= np.linalg.norm(X, axis=1, keepdims=True)
    return X, SGTree.build(X, rng=seed + 1, dtype=np.float32)


def test_adaptive_brute_force_is_batched_without_replacement_and_with_removed_targets():
    """The adaptive sampler leaves brute force to one batched pass over the targets (_brute_rest). On unstructured
    data with 3 targets removed from the tree and one excluded per query, a batch of 2 queries x ROWS rows draws
    ordered pairs without replacement, over 90 % of the rows by brute force: each row's first draw follows the
    softmax over the live targets not excluded (chi-square per query, n = required_sample_size(0.05), power >= 0.99
    at TV 0.05), the second never repeats it, no removed or excluded id is drawn, and log Z is the exact one over
    the live targets."""
    X, tree = _unstructured(60)
    gone = [7, 100, 555]
    for i in gone:
        tree.remove(i)
    Q = X[[4, 9]].astype(np.float64)
    ex = [int(np.argmax(X @ X[4])), int(np.argmax(X @ X[9]))]
    rows = required_sample_size(0.05)
    QQ = np.repeat(Q, rows, axis=0)
    r = S.sample_adaptive(tree, QQ, 2, beta=20.0, rng=61, replace=False, exclude=[[ex[0]]] * rows + [[ex[1]]] * rows)
    fb = r.stats["exact_fallbacks"]
    assert np.all(fb + r.stats["accepted"] == 2) and np.mean(fb == 2) > 0.9, np.mean(fb == 2)
    assert np.all(r.ids[:, 0] != r.ids[:, 1]) and not np.isin(r.ids, gone).any()
    live = np.setdiff1d(np.arange(X.shape[0]), gone)
    for b in range(2):
        got = r.ids[b * rows:(b + 1) * rows]
        assert not np.isin(got, ex[b]).any()
        assert chi2_gof(got[:, 0], _softmax(X, Q[b], 20.0, gone + [ex[b]]))[0] > ALPHA
        lz = np.logaddexp.reduce(20.0 * (X[live].astype(np.float64) @ Q[b]))
        brute = fb[b * rows:(b + 1) * rows] == 2
        assert np.allclose(r.stats["log_z"][b * rows:(b + 1) * rows][brute], lz, atol=1e-9)


def test_brute_rest_keeps_the_draws_made_before_the_switch():
    """A query that switched to brute force after some accepted draws keeps them, and without replacement its
    later draws exclude them: a kernel state with the likeliest target i0 already drawn (STATUS 2, as the adaptive
    kernel leaves it) is completed by _brute_rest; the second draw follows p_j / (1 - p_i0), j != i0 (chi-square,
    n = 64,143 rows, power >= 0.99 at TV 0.02), and log Z is the exact one over all live targets (the draw made
    before the switch included). With replacement the completed draw follows p itself."""
    X, tree = _unstructured(62)
    q = X[3].astype(np.float64)
    p = _softmax(X, q, 20.0)
    i0 = int(np.argmax(p))
    B = N_DRAWS
    Q = np.repeat(q[None], B, axis=0)
    eptr, eids = np.zeros(B + 1, np.int64), np.zeros(0, np.int64)
    for replace in (False, True):
        ids = np.full((B, 2), -1, np.int64)
        ids[:, 0] = i0
        sids = np.zeros((B, 2))
        sids[:, 0] = 20.0 * float(X[i0].astype(np.float64) @ q)
        cnt = np.zeros((B, K.NC), np.int64)
        cnt[:, K.STATUS] = 2  # left to brute force
        lz = np.full((B, 4), -np.inf)
        rows, screened = S._brute_rest(tree, Q, 2, 20.0, np.random.default_rng(63), replace, eptr, eids, ids, sids,
                                       cnt, lz)
        assert rows.size == B and screened == replace  # float32 GEMMs with replacement, float64 without
        assert np.all(cnt[:, K.STATUS] == 0) and np.all(ids[:, 0] == i0)
        want = _softmax(X, q, 20.0, [] if replace else [i0])
        assert chi2_gof(ids[:, 1], want)[0] > ALPHA, replace
        assert np.allclose(sids[:, 1], 20.0 * (X[ids[:, 1]].astype(np.float64) @ q), atol=1e-9)  # float64 logits
        # without replacement log Z is the float64 one; with replacement, from the float32 GEMM, within its bound
        tol = 1e-9 if not replace else float(S._screen_error(X.shape[1], 20.0, q[None], 1.0 + 1e-6)[0])
        assert np.allclose(lz[:, K.LZ_EST], np.logaddexp.reduce(20.0 * (X.astype(np.float64) @ q)), rtol=0, atol=tol)


@pytest.mark.parametrize("dim", [8, 64, 384, 1000])
def test_screen_error_bounds_the_float32_logits(dim):
    """_screen_error bounds |s32 - s64| for every target: s32 = beta fl32(<fl32(q), t>) as _exact_draws computes it
    (a float32 GEMM), s64 accumulated in float64. Checked on 20,000 float32 targets x 16 queries per dimension,
    among them all-positive data (the rounding errors of a dot product do not cancel) and norms far from 1."""
    rng = np.random.default_rng(dim)
    beta = 20.0
    for X in (rng.normal(size=(20_000, dim)), rng.random((20_000, dim))):
        X = (X * rng.uniform(0.2, 5.0, size=(X.shape[0], 1))).astype(np.float32)
        Q = np.abs(rng.normal(size=(16, dim))) * rng.uniform(0.1, 10.0, size=(16, 1))
        M = float(np.max(np.linalg.norm(X.astype(np.float64), axis=1)))
        s32 = np.multiply(Q.astype(np.float32) @ X.T, beta, dtype=np.float64)
        s64 = beta * (Q @ X.astype(np.float64).T)
        eps = S._screen_error(dim, beta, Q, M)
        assert np.all(np.abs(s32 - s64) <= eps[:, None]), float(np.max(np.abs(s32 - s64) / eps[:, None]))


def test_screened_draws_correct_their_proposal(monkeypatch):
    """_screened_draws turns candidates drawn from a wrong law into exact draws: with the candidates' logits
    deliberately perturbed (s64 + d, |d| <= 0.5 uniform, eps = 0.5), the accepted draws follow the softmax of s64
    (chi-square, n = 64,143, power >= 0.99 at TV 0.02), with their s64 returned. Negative control: the candidates
    themselves, uncorrected (TV about 0.1 from the target), fail the same test."""
    rng = np.random.default_rng(70)
    X = rng.normal(size=(100, 8)).astype(np.float32)
    q = rng.normal(size=8)
    s64 = 2.0 * (X.astype(np.float64) @ q)
    d = rng.uniform(-0.5, 0.5, size=100)

    def fake(points, Q, m, beta, gen, eptr, eids, replace, gone, f64=False):
        w = np.exp(s64 + d - np.max(s64 + d))
        ids = gen.choice(100, size=(Q.shape[0], m), p=w / w.sum())
        return ids, (s64 + d)[ids], np.full(Q.shape[0], np.logaddexp.reduce(s64 + d))

    monkeypatch.setattr(S, "_exact_draws", fake)
    B = N_DRAWS // 4
    Q = np.repeat(q[None], B, axis=0)
    ids, sids, _ = S._screened_draws(X, Q, 4, 2.0, np.random.default_rng(71), np.zeros(B + 1, np.int64),
                                     np.zeros(0, np.int64), np.zeros(0, np.int64), np.full(B, 0.5 + 1e-9))
    p = np.exp(s64 - s64.max())
    assert chi2_gof(ids.ravel(), p / p.sum())[0] > ALPHA
    assert np.allclose(sids, s64[ids], rtol=0, atol=1e-12)
    raw, _, _ = fake(X, Q, 4, 2.0, np.random.default_rng(71), None, None, True, None)
    assert chi2_gof(raw.ravel(), p / p.sum())[0] < ALPHA  # the uncorrected candidates

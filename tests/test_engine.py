"""The batched mining engine (refimpl.sampling.engine): exactness of "rejection" (and a negative control), the
exact MH law of "mh" (float64 and float32 points), certificates, repeatability, the experiments' procedure and its
forest, bad input."""
import numpy as np
import pytest

from refimpl.data import hierarchical_points
from refimpl.index.sgtree import SGTree
from refimpl.mining.dynnibal import cluster_labels, mh_law
from refimpl.sampling.engine import MiningEngine, prop2_levels, sample_paper
from refimpl.sampling.bounds import prop2_level
from refimpl.sampling.clustering import find_clustering
from refimpl.softmax import logsumexp
from refimpl.testing import ALPHA, TV, chi2_gof, make_bins, required_sample_size

BETA = 8.0


@pytest.fixture(scope="module")
def tree():
    return SGTree.build(hierarchical_points(1500, 6, branching=(6, 5), rng=3), rng=3)


def _queries(n, seed=9):
    return hierarchical_points(n, 6, branching=(6, 5), rng=seed)


def _softmax(tree, q, excl):
    lp = BETA * (tree.points[: tree.n_targets] @ q)
    lp[excl] = -np.inf
    return np.exp(lp - logsumexp(lp))


def test_prop2_levels_match_the_scalar_rule():
    bq = np.array([0.3, 1.0, 7.5, 20.0, 55.0])
    for base in (1.05, 1.2, 2.0):
        assert list(prop2_levels(1e6, bq, base)) == [prop2_level(1e6, b, base) for b in bq]


K_ROW = 16  # draws per query row: the engine's regime (a handful of negatives per query)


def _rejection_rows(eng, tr, Q, excl, n, beta, rng):
    """n draws for every query of Q through ONE engine call: each query repeated as ceil(n / K_ROW) rows with its
    exclusions, K_ROW draws a row, except query 1's rows, which draw K_ROW + 1 (two groups of equal need, one
    batch-sampler call each). With n draws for ONE row the adaptive sampler would rightly choose brute force;
    K_ROW a row makes it run its rejection path. Returns (per-query draws (n,), result, rows per query)."""
    rows = -(-n // K_ROW)
    QQ = np.repeat(Q, rows, axis=0)
    counts = np.full(QQ.shape[0], K_ROW)
    if Q.shape[0] > 1:
        counts[rows:2 * rows] = K_ROW + 1
    r = eng.run(tr, QQ, counts, beta=beta, rng=rng, exclude=[e for e in excl for _ in range(rows)])
    draws = [np.concatenate([r.of(x) for x in range(b * rows, (b + 1) * rows)])[:n] for b in range(Q.shape[0])]
    return draws, r, rows


def test_rejection_draws_are_exact_through_the_batch():
    """"rejection" (the adaptive sampler's Eq. 3-5 rejection inside the engine's call), 3 queries, each with its own
    exclusions, repeated as rows of ONE call (K_ROW draws a row, so that the rejection path runs; asserted): the
    draws of each query against its renormalised softmax by the Pearson chi-square of refimpl.testing at
    alpha = 0.001 with n = required_sample_size(TV, n_bins) draws per query, i.e. power >= 0.99 against any law at
    TV >= 0.02 on the bins. A law that ignores the exclusions is rejected. The certified log Z interval holds."""
    tr = SGTree.build(hierarchical_points(1500, 6, branching=(6, 5), rng=3), rng=3)
    Q = _queries(3)
    top = np.argsort(-(tr.points[: tr.n_targets] @ Q[0]))[:2]  # query 0 excludes its two most likely targets
    excl = [top, np.zeros(0, np.int64), np.array([7])]
    laws = [_softmax(tr, Q[b], excl[b]) for b in range(3)]
    n = max(required_sample_size(TV, n_bins=make_bins(p)[1]) for p in laws)
    draws, r, rows = _rejection_rows(MiningEngine("rejection", start_clusters=40), tr, Q, excl, n, BETA, 1)
    assert r.exact_draws.sum() == 0 and np.all(r.attempts >= np.diff(r.ptr)) and np.all(r.distance_evals == 0)
    assert np.all(r.inner_products < len(tr)) and np.all(r.tv_bound == 0.0)
    for b in range(3):
        assert chi2_gof(draws[b], laws[b])[0] > ALPHA
        lz = logsumexp(BETA * (tr.points[: tr.n_targets] @ Q[b]))  # the certified interval is for Z over all targets
        sl = slice(b * rows, (b + 1) * rows)
        assert np.all(r.log_z_lo[sl] - 1e-9 <= lz) and np.all(lz <= r.log_z_hi[sl] + 1e-9)
        assert np.all((r.log_z_lo[sl] <= r.log_z[sl]) & (r.log_z[sl] <= r.log_z_hi[sl]))
        np.testing.assert_allclose(r.log_gamma[sl], r.log_z_hi[sl] - r.log_z_lo[sl])
    assert chi2_gof(draws[0], _softmax(tr, Q[0], np.zeros(0, np.int64)))[0] < ALPHA


def test_negative_control_rejection_without_radius_fails():
    """The engine's "rejection" with bounds that drop the radius term (E_C = s_r, not an upper bound on the
    cluster's logits; the private switch ``_broken``) is NOT exact: the same chi-square test (alpha = 0.001,
    n = required_sample_size(TV, n_bins), power >= 0.99 at TV 0.02) rejects it, on its rejection path."""
    tr = SGTree.build(hierarchical_points(1500, 6, branching=(6, 5), rng=3), rng=3)
    Q = _queries(1)
    law = _softmax(tr, Q[0], np.zeros(0, np.int64))
    n = required_sample_size(TV, n_bins=make_bins(law)[1])
    eng = MiningEngine("rejection", start_clusters=40)
    eng._broken = True
    draws, r, _ = _rejection_rows(eng, tr, Q, [np.zeros(0, np.int64)], n, BETA, 2)
    assert r.exact_draws.sum() == 0 and chi2_gof(draws[0], law)[0] < ALPHA


@pytest.mark.parametrize("dtype", [np.float64, np.float32])
def test_mh_draws_follow_the_exact_chain_law(dtype):
    """Independent MH from the engine's own Alg. 2 partition (partition()): the draws against mh_law after 2 states
    (same chi-square harness and power as above); float32 points give the law of the float32 logits. The certified
    gamma bounds the true max P/Q and Eq. 6's bound is reported."""
    tr = SGTree.build(hierarchical_points(1500, 6, branching=(6, 5), rng=3), rng=3)
    tr.points = tr.points.astype(dtype)
    Q = _queries(2, seed=4)
    eng = MiningEngine("mh", chain_length=2)
    pts = tr.points[: tr.n_targets].astype(np.float64)
    for b in range(2):
        cl = eng.partition(tr, Q[b], beta=BETA)
        lp = BETA * (pts @ Q[b])
        sr = lp[cl.reps]
        lq = sr[cluster_labels(tr, cl)] - logsumexp(sr + np.log(cl.sizes))
        law = mh_law(lp, lq, 2)
        n = required_sample_size(TV, n_bins=make_bins(law)[1])
        r = eng.run(tr, Q[b:b + 1], n, beta=BETA, rng=2 + b)
        assert chi2_gof(r.ids, law)[0] > ALPHA
        p = np.exp(lp - logsumexp(lp))
        assert np.log(np.max(p / np.exp(lq))) <= r.log_gamma[0] + 1e-9
        assert r.tv_bound[0] == pytest.approx(np.exp(-1.0 / np.exp(r.log_gamma[0])))


def test_prop2_start_is_alg2_from_c_l_per_query(tree):
    """start="prop2": each query's Alg. 2 starts from C_(l) at its own Prop. 2 level (queries scaled so that their
    levels differ); the partition equals the sampling layer's find_clustering, and run() samples from it."""
    Q = _queries(4) * np.array([0.3, 1.0, 3.0, 1.0])[:, None]
    levels = prop2_levels(1e6, BETA * np.linalg.norm(Q, axis=1), tree.base)
    assert len(set(levels.tolist())) >= 3
    eng = MiningEngine("mh", start="prop2", m=-12, max_frontier=None, chain_length=3)
    r = eng.run(tree, Q, [2, 1, 0, 3], beta=BETA, rng=0)
    for b in range(4):
        cl = eng.partition(tree, Q[b], beta=BETA)
        ref = find_clustering(tree, Q[b], beta=BETA, gamma=1e6, m=-12)
        assert sorted(zip(cl.nodes, cl.levels)) == sorted(zip(ref.nodes, ref.levels))
        assert r.n_clusters[b] == (len(cl) if b != 2 else 0)
    assert r.ids.size == 6 and np.all(r.chain_length[[0, 1, 3]] == 3)


def test_same_seed_same_draws_every_procedure(tree):
    Q = _queries(5)
    for proc in ("rejection", "mh", "paper"):
        eng = MiningEngine(proc, chain_length=10 if proc == "mh" else None)
        a = eng.run(tree, Q, [3, 0, 2, 4, 1], beta=BETA, rng=11)
        b = eng.run(tree, Q, [3, 0, 2, 4, 1], beta=BETA, rng=11)
        assert np.array_equal(a.ids, b.ids) and list(a.ptr) == [0, 3, 3, 5, 9, 10]
        assert a.ids.min() >= 0 and a.ids.max() < tree.n_targets


def test_paper_procedure_and_forest(tree):
    """The experiments' procedure keeps the top-scoring distinct chain states (sorted by score, no duplicates when
    enough are distinct), reports no bound, and a forest merges its trees' candidates by the largest logit."""
    Q = _queries(4)
    r = MiningEngine("paper", n_top_clusters=5).run(tree, Q, 3, beta=BETA, rng=0)
    ids = r.matrix()
    for b in range(4):
        s = BETA * (tree.points[ids[b]] @ Q[b])
        np.testing.assert_allclose(r.logits[3 * b:3 * b + 3], s, rtol=1e-12)
        assert np.all(np.diff(s) <= 1e-12)
    assert np.all(np.isinf(r.log_gamma)) and np.all(np.isnan(r.tv_bound))
    X = tree.points[: tree.n_targets]
    parts = [np.arange(0, 700), np.arange(700, X.shape[0])]
    forest = [SGTree.build(X[p], rng=1) for p in parts]
    ids, lg = sample_paper(forest, Q, 4, beta=BETA, rng=5, id_maps=parts)
    assert ids.shape == (4, 4)
    np.testing.assert_allclose(lg, BETA * np.einsum("bkd,bd->bk", X[ids], Q), rtol=1e-12)
    gen = np.random.default_rng(5)  # the same stream: one engine call per tree, then the merge by max logit
    eng = MiningEngine("paper")
    runs = [eng.run(t, Q, 4, beta=BETA, rng=gen) for t in forest]
    cand = np.concatenate([p[r.matrix()] for p, r in zip(parts, runs)], axis=1)
    cs = np.concatenate([r.logits.reshape(4, 4) for r in runs], axis=1)
    best = np.take_along_axis(cand, np.argsort(-cs, axis=1, kind="stable")[:, :4], axis=1)
    assert np.array_equal(ids, best)


@pytest.mark.parametrize("kw, name", [({"procedure": "topk"}, "procedure"), ({"gamma": 1.0}, "gamma"),
                                      ({"max_frontier": 0}, "max_frontier"), ({"temperature": 0.0}, "temperature"),
                                      ({"start": "x"}, "start"), ({"tv": 1.0}, "tv")])
def test_bad_knobs(kw, name):
    with pytest.raises((ValueError, TypeError), match=name):
        MiningEngine(**kw)


def test_bad_run_input(tree):
    eng = MiningEngine("mh")
    Q = _queries(2)
    with pytest.raises(ValueError, match="Q"):
        eng.run(tree, Q[:, :3], 1, beta=BETA, rng=0)
    with pytest.raises(ValueError, match="counts"):
        eng.run(tree, Q, [1, -1], beta=BETA, rng=0)
    with pytest.raises(ValueError, match="exclude"):
        eng.run(tree, Q, 1, beta=BETA, rng=0, exclude=[[tree.n_targets]] * 2)
    with pytest.raises(ValueError, match="beta"):
        eng.run(tree, Q, 1, beta=0.0, rng=0)
    with pytest.raises(ValueError, match="chain_length"):
        MiningEngine("mh", chain_length=None, max_steps=10).run(tree, Q, 1, beta=50.0, rng=0)

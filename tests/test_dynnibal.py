"""Tests of the DyNNIBAL miner (refimpl/dynnibal.py, Alg. 4): schedule of Alg. 5 / Alg. 3, encoder-call and Mem %
accounting, validity of the negatives and of their log_q, bit-for-bit repeatability, and the exact law of the MH
draws checked statistically against the sampler itself.

Not asserted: "DyNNIBAL beats Uniform on R@1 after a short run". On the demo's quick task (1500 targets, 120 steps,
30 uniform warm-up, 64 mined + 64 uniform) five seeds gave uniform / DyNNIBAL R@1 0.130/0.137, 0.137/0.133,
0.127/0.107, 0.133/0.127, 0.140/0.137 (300 test queries): no robust gain, so a test would only pass by seed choice.
The gain shows on the demo task itself (N = 6000, 400 steps; ``python -m refimpl.mining.dynnibal``).
"""
import math

import numpy as np
import pytest
from scipy import stats

from refimpl.sampling.bounds import prop6_drift
from refimpl.sampling.clustering import find_clustering, level_clustering
from refimpl.data import planted_dataset
from refimpl.mining.dynnibal import DyNNIBAL, cluster_labels, mh_law, mixture_log_q
from refimpl.mining import Batch, MinerContext
from refimpl.nystrom import RegressionReEncoder
from refimpl.sampling.clustering import cluster_members
from refimpl.sampling.samplers import sample_mh
from refimpl.index.sgtree import SGTree
from refimpl.training import train

N, DIM = 600, 16


@pytest.fixture(scope="module")
def ds():
    return planted_dataset(n_targets=N, n_queries=800, n_features=32, dim=DIM, branching=(10, 6), rng=1)


def run(ds, miner, steps=24, seed=0, **kw):
    kw = {"batch_size": 32, "dim": DIM, "uniform_warmup": 3, "lr_warmup": 5, "seed": seed, **kw}
    return train(ds, miner, steps=steps, **kw)


def context(ds, seed=0):
    from refimpl.encoders import LinearDualEncoder

    enc = LinearDualEncoder(ds.query_features.shape[1], ds.target_features.shape[1], DIM, rng=seed)
    return MinerContext(enc, ds.target_features, rng=seed)


def batch(ds, ctx, qids, step=0):
    pos = [ds.positives[q] for q in qids]
    return Batch(step=step, query_ids=qids, Xq=ds.query_features[qids], Q=ctx.encoder.encode_queries(
        ds.query_features[qids]), positives=pos, positive_ids=np.unique(np.concatenate(pos)))


# ------------------------------------------------------------------------------------------------ schedule, calls
def test_reencode_and_maintain_every_w_steps_and_encoder_calls(ds, monkeypatch):
    """Alg. 6 at the first mining step (after the uniform warm-up), then Alg. 5 + Alg. 3 exactly every w mining
    steps: counted on the real methods (spies), not on the miner's own log. Encoder calls: N + s' per re-encode."""
    calls = {"reencode": [], "maintain": []}
    orig_re, orig_m = RegressionReEncoder.reencode, SGTree.maintain
    holder = {}

    def spy_re(self, encoder):
        calls["reencode"].append(holder["ctx_step"]())
        return orig_re(self, encoder)

    def spy_m(self, U, **kw):
        calls["maintain"].append((holder["ctx_step"](), U))
        return orig_m(self, U, **kw)

    monkeypatch.setattr(RegressionReEncoder, "reencode", spy_re)
    monkeypatch.setattr(SGTree, "maintain", spy_m)
    mi = DyNNIBAL(16, n_landmarks=24, n_samples=64, reencode_every=5, tree_update="maintain")
    orig_start = mi.start

    def start(ctx):
        holder["ctx_step"] = lambda: ctx.step
        orig_start(ctx)

    mi.start = start
    res = run(ds, mi, steps=24)
    assert mi.started_at == 3
    assert calls["reencode"] == [8, 13, 18, 23]
    assert [s for s, _ in calls["maintain"]] == [8, 13, 18, 23]
    assert [u["step"] for u in mi.tree_updates] == [8, 13, 18, 23]
    for (_, U), rec in zip(calls["maintain"], mi.tree_updates):
        assert U == pytest.approx(2 * rec["max_move"]) and U > 0 and rec["method"] == "maintain"
    assert res.final["encoder_calls_mining"] == N + 4 * 64
    assert [h["kind"] for h in mi.reencoder.history] == ["initial"] + ["regression"] * 4
    # the tree follows the representations and is a valid SG tree after Alg. 3
    np.testing.assert_array_equal(mi.tree.points[:N], mi.reencoder.representations)
    assert mi.tree.check_invariants() == []


def test_auto_tree_update_rebuilds_after_a_reencode_and_keeps_a_valid_tree(ds, monkeypatch):
    """The default tree_update="auto": a re-encode moves every representation, so the tree is rebuilt (Alg. 3 is
    never called) and is a valid SG tree over the new representations."""
    calls = []
    orig_m = SGTree.maintain
    monkeypatch.setattr(SGTree, "maintain", lambda self, U, **kw: calls.append(U) or orig_m(self, U, **kw))
    mi = DyNNIBAL(16, n_landmarks=24, n_samples=64, reencode_every=5)
    run(ds, mi, steps=14)
    assert [u["step"] for u in mi.tree_updates] == [8, 13] and calls == []
    for rec in mi.tree_updates:
        assert rec["method"] == "rebuild" and rec["U"] == pytest.approx(2 * rec["max_move"]) and rec["U"] > 0
    np.testing.assert_array_equal(mi.tree.points[:N], mi.reencoder.representations)
    assert mi.tree.check_invariants() == []


@pytest.mark.parametrize("mode", ["rebuild_level", "rebuild", "prop6", "given", "paper-split"])
def test_other_tree_updates_keep_a_valid_tree(ds, mode):
    kw = {"rebuild_level": {"tree_update": mode}, "rebuild": {"tree_update": mode}, "given": {"U": 0.05},
          "prop6": {"U": "prop6", "prop6_eta": 1e-3, "prop6_L": 2.0, "prop6_M": 1.5},
          "paper-split": {"split": "paper", "landmarks": "kmeans++"}}[mode]
    mi = DyNNIBAL(8, n_landmarks=16, n_samples=48, reencode_every=4, **kw)
    res = run(ds, mi, steps=12, uniform_warmup=0)
    assert mi.reencoded_at == [4, 8]
    assert res.final["encoder_calls_mining"] == N + 2 * 48
    np.testing.assert_array_equal(mi.tree.points[:N], mi.reencoder.representations)
    assert mi.tree.check_invariants() == []
    if mode == "prop6":
        assert mi.tree_updates[0]["U"] == pytest.approx(prop6_drift(4, 1e-3, 20.0, 2.0, 1.5))
    if mode == "given":
        assert all(u["U"] == 0.05 for u in mi.tree_updates)


def test_mem_percent_matches_documented_formula(ds):
    """Mem % = 100 (2 d' + s' (1 + d'/D)) / N: landmarks d' x D, regression model d' x D, s' training pairs of a
    d'-dim input and a D-dim output, in units of D floats."""
    d, s = 24, 40
    res = run(ds, DyNNIBAL(8, n_landmarks=d, n_samples=s, reencode_every=50), steps=6)
    assert res.final["mem_percent"] == pytest.approx(100 * (2 * d + s * (1 + d / DIM)) / N, rel=1e-12)


# ------------------------------------------------------------------------------------------------ negatives
@pytest.mark.parametrize("sampler", ["mh", "rejection", "paper"])
def test_negatives_valid_ids_and_log_q(ds, sampler):
    ctx = context(ds)
    mi = DyNNIBAL(24, n_landmarks=16, n_samples=32, sampler=sampler, n_uniform=5)
    mi.start(ctx)
    b = batch(ds, ctx, ds.train_ids[:10])
    negs = mi.mine(ctx, b)
    assert negs.ids.dtype == np.int64 and negs.ids.ndim == 1
    assert negs.ids.min() >= 0 and negs.ids.max() < N
    if sampler == "paper":
        assert negs.log_q is None and not mi.has_log_q
        return
    assert negs.ids.shape == (29,) and negs.log_q.shape == (29,)
    assert np.all(np.isfinite(negs.log_q)) and np.all(negs.log_q <= 0)
    assert np.all(negs.log_q[-5:] == -math.log(N))
    # per-query mode: (B, k), and a query never draws its own positives
    mi2 = DyNNIBAL(6, n_landmarks=16, n_samples=32, sampler=sampler, shared=False)
    mi2.start(ctx)
    n2 = mi2.mine(ctx, b)
    assert n2.ids.shape == (10, 6) and np.all(np.isfinite(n2.log_q))
    for r in range(10):
        assert not np.isin(n2.ids[r], b.positives[r]).any()


def test_mixture_log_q_against_explicit_sum():
    """log q̄(n) = log Σ_u w_u q_u(n) with q_u the softmax renormalised over u's non-excluded targets (exact Z)."""
    rng = np.random.default_rng(3)
    Z = rng.normal(size=(50, 4))
    Qr = rng.normal(size=(3, 4))
    S = 3.0 * Qr @ Z.T
    log_z = np.log(np.exp(S).sum(axis=1))
    excl = [np.array([1, 7]), np.zeros(0, np.int64), np.array([2])]
    drawn = np.array([1, 2, 3, 7, 40])
    w = np.array([0.5, 0.25, 0.25])
    ptr = np.cumsum([0] + [e.size for e in excl])
    eids = np.concatenate(excl)
    elog = np.concatenate([S[u, e] for u, e in enumerate(excl)])
    got = mixture_log_q(S[:, drawn], log_z, w, drawn, (ptr, eids, elog))
    want = np.zeros(drawn.size)
    for u in range(3):
        p = np.exp(S[u] - log_z[u])
        p[excl[u]] = 0.0
        want += w[u] * p[drawn] / p.sum()
    np.testing.assert_allclose(got, np.log(want), rtol=1e-12)


def test_log_q_correction_refused_for_paper(ds):
    with pytest.raises(ValueError, match="log_q_correction"):
        run(ds, DyNNIBAL(8, n_landmarks=16, n_samples=32, sampler="paper"), steps=6, log_q_correction=True)


# ------------------------------------------------------------------------------------------------ repeatability
def test_same_seed_bit_for_bit(ds):
    def go(seed):
        mi = DyNNIBAL(16, n_landmarks=16, n_samples=48, reencode_every=4)
        r = run(ds, mi, steps=14, seed=seed, probe_every=5)
        return r, mi

    (a, ma), (b, mb), (c, _) = go(4), go(4), go(5)
    assert [h["loss"] for h in a.history] == [h["loss"] for h in b.history]
    assert [p["tv"] for p in a.probes] == [p["tv"] for p in b.probes]
    assert np.array_equal(a.encoder.A, b.encoder.A) and np.array_equal(a.encoder.B, b.encoder.B)
    assert np.array_equal(ma.reencoder.representations, mb.reencoder.representations)
    assert {k: v for k, v in a.final.items() if "time" not in k} == {k: v for k, v in b.final.items()
                                                                      if "time" not in k}
    assert [h["loss"] for h in a.history] != [h["loss"] for h in c.history]


# ------------------------------------------------------------------------------------------------ exact MH law
def test_cluster_labels_match_reference():
    from refimpl.data import hierarchical_points

    P = hierarchical_points(400, 6, rng=2)
    tree = SGTree.build(P, rng=0)
    for cl in (find_clustering(tree, P[3], beta=10.0, gamma=1e4), level_clustering(tree, -3)):
        lab = cluster_labels(tree, cl)
        ref = np.full(400, -1)
        for j in range(len(cl)):
            ref[cluster_members(tree, cl, j)] = j
        np.testing.assert_array_equal(lab, ref)
        assert np.array_equal(np.bincount(lab, minlength=len(cl)), cl.sizes)


def _gtest(counts, probs, min_expected=5.0):
    """G-test of counts against probs, pooling the categories with expected count < min_expected."""
    n = counts.sum()
    exp = probs * n
    small = exp < min_expected
    obs = np.r_[counts[~small], counts[small].sum()]
    ex = np.r_[exp[~small], exp[small].sum()]
    keep = ex > 0
    obs, ex = obs[keep], ex[keep]
    g = 2 * np.sum(np.where(obs > 0, obs * np.log(np.maximum(obs, 1) / ex), 0.0))
    return stats.chi2.sf(g, obs.size - 1)


def test_mh_law_matches_sampler_and_rejects_the_wrong_law():
    """The exact law of an MH draw (mh_law) against 200000 draws of sample_mh with the same clustering, chain length
    2 and 3 excluded ids (N = 150, beta = 15, coarse clustering). G-test at alpha = 0.001 with <= 150 categories:
    a law at TV distance 0.02 has noncentrality >= 4 n TV^2 = 320, detected with probability > 0.999. Negative
    controls: the same draws against P (the chain's target; TV to the true law asserted > 0.03) and against the
    law after one state (the proposal, chain length 1) must fail."""
    from refimpl.data import hierarchical_points

    P = hierarchical_points(150, 4, branching=(4, 4), rng=7)
    tree = SGTree.build(P, rng=0)
    q = P[0] * 1.1
    beta = 15.0
    cl = find_clustering(tree, q, beta=beta, gamma=1e8)
    assert 3 <= len(cl) < 150
    excl = np.array([0, 5, 9])
    lp = beta * (P @ q)
    sr = beta * (P[cl.reps] @ q)
    lq = sr[cluster_labels(tree, cl)] - np.log(np.sum(cl.sizes * np.exp(sr)))
    law = mh_law(lp, lq, 2, excl)
    assert law[excl].sum() == 0 and law.sum() == pytest.approx(1.0)
    r = sample_mh(tree, q, 200_000, beta=beta, rng=11, chain_length=2, clustering=cl, exclude=excl)
    counts = np.bincount(r.ids, minlength=150).astype(float)
    assert _gtest(counts, law) > 0.001
    p = np.exp(lp - lp.max())
    p[excl] = 0
    p /= p.sum()
    assert 0.5 * np.abs(p - law).sum() > 0.03
    assert _gtest(counts, p) < 1e-6
    assert _gtest(counts, mh_law(lp, lq, 1, excl)) < 1e-6
    # long chains converge to P (Eq. 6)
    assert 0.5 * np.abs(mh_law(lp, lq, 400, excl) - p).sum() < 1e-6


@pytest.mark.parametrize("sampler", ["mh", "rejection"])
def test_distribution_is_the_law_of_the_batched_engine_draws(ds, sampler):
    """End to end through the batched engine (one compiled call for the batch): the miner's distribution() row of
    each of 3 queries against n draws of the engine for it, Pearson chi-square of refimpl.testing at alpha = 0.001
    with n = required_sample_size(TV, n_bins) draws: power >= 0.99 against any law at TV >= 0.02 on the bins.
    "mh": the exact law after chain_length = 2 states (mh_law); "rejection": P~ itself (its draws are exact; 16
    draws per row, so its rejection path runs, asserted). distribution() must not consume randomness. Same seed,
    same draws."""
    from refimpl.testing import ALPHA, TV, chi2_gof, make_bins, required_sample_size

    ctx = context(ds)
    mi = DyNNIBAL(8, n_landmarks=16, n_samples=32, chain_length=2, sampler=sampler)
    mi.start(ctx)
    b = batch(ds, ctx, ds.train_ids[:3])
    state = ctx.rng.bit_generator.state
    dist = mi.distribution(ctx, b)
    assert ctx.rng.bit_generator.state == state
    assert dist.shape == (3, N) and np.allclose(dist.sum(axis=1), 1.0)
    for r in range(3):
        assert dist[r, b.positives[r]].sum() == 0
    zq = mi.reencoder.query_representations(b.Q)
    n = max(required_sample_size(TV, n_bins=make_bins(dist[r])[1]) for r in range(3))
    rows = -(-n // 16)  # each query as rows of 16 draws (the mining regime: "rejection" runs its rejection path)
    zz = np.repeat(zq, rows, axis=0)
    ex = [p for p in b.positives for _ in range(rows)]
    res = mi.engine.run(mi.tree, zz, 16, beta=ctx.beta, rng=7, exclude=ex)
    again = mi.engine.run(mi.tree, zz, 16, beta=ctx.beta, rng=7, exclude=ex)
    assert np.array_equal(res.ids, again.ids)
    if sampler == "rejection":
        assert res.exact_draws.sum() == 0
    draws = res.matrix().reshape(3, -1)[:, :n]
    for r in range(3):
        assert chi2_gof(draws[r], dist[r])[0] > ALPHA
    # negative control: the same law with mass moved onto the excluded positives is rejected by the same test
    wrong = dist[1].copy()
    wrong[b.positives[1]] = wrong.max()
    assert chi2_gof(draws[1], wrong / wrong.sum())[0] < ALPHA


# ------------------------------------------------------------------------------------------------ bad input
@pytest.mark.parametrize("kw, name", [
    ({"k": 0}, "k"), ({"sampler": "gibbs"}, "sampler"), ({"gamma": 1.0}, "gamma"), ({"reencode_every": 0},
     "reencode_every"), ({"tree_update": "x"}, "tree_update"), ({"U": -1.0}, "U"), ({"U": "bound"}, "U"),
    ({"U": "prop6"}, "prop6_eta"), ({"split": "x"}, "split"), ({"landmarks": "x"}, "landmarks"),
    ({"tv": 1.5}, "tv"), ({"chain_length": 0}, "chain_length"), ({"base": 1.0}, "base"),
    ({"n_uniform": -1}, "n_uniform")])
def test_bad_knobs(kw, name):
    with pytest.raises((ValueError, TypeError), match=name):
        DyNNIBAL(**kw)


def test_too_many_samples_or_landmarks(ds):
    for kw, name in (({"n_samples": N + 1}, "n_samples"), ({"n_landmarks": N + 1}, "n_landmarks")):
        with pytest.raises(ValueError, match=name):
            DyNNIBAL(8, **kw).start(context(ds))

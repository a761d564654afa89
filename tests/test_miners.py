"""Contract tests of every miner in refimpl.mining (PAPER.md §7 baselines)."""
import numpy as np
import pytest

from refimpl.encoders import LinearDualEncoder
from refimpl.mining import (Batch, BruteForceTopK, FullSoftmax, InBatch, MinerContext, NegativeCache,
                            StochasticNegativeMining, Uniform, make_miner)

N, F, D = 60, 12, 6


def _ctx(seed=0, n=N):
    g = np.random.default_rng(seed)
    Xt = g.normal(size=(n, F))
    enc = LinearDualEncoder(F, F, D, beta=5.0, rng=seed)
    return MinerContext(enc, Xt, rng=seed + 1), g


def _batch(ctx, g, B=4, step=0):
    Xq = g.normal(size=(B, F))
    pos = [np.array([i], dtype=np.int64) for i in range(B)]
    return Batch(step=step, query_ids=np.arange(B), Xq=Xq, Q=ctx.encoder.encode_queries(Xq), positives=pos,
                 positive_ids=np.arange(B, dtype=np.int64))


def _perturb(ctx, g):
    ctx.encoder.A += 0.3 * g.normal(size=ctx.encoder.A.shape)
    ctx.encoder.B += 0.3 * g.normal(size=ctx.encoder.B.shape)
    ctx.advance()


def _softmax(S):
    P = np.exp(S - S.max(1, keepdims=True))
    return P / P.sum(1, keepdims=True)


def test_uniform_ids_and_log_q():
    ctx, g = _ctx()
    b = _batch(ctx, g)
    neg = Uniform(7).mine(ctx, b)
    assert neg.ids.shape == (7,) and neg.ids.dtype == np.int64
    assert np.array_equal(neg.log_q, np.full(7, -np.log(N)))
    neg2 = Uniform(5, shared=False).mine(ctx, b)
    assert neg2.ids.shape == (4, 5) and np.all(neg2.log_q == -np.log(N))
    assert np.allclose(Uniform(3).distribution(ctx, b), 1.0 / N)
    # uniformity: 30000 draws over 60 ids, chi-square with 59 dof; threshold 110 has p ~ 5e-5 under H0, and a
    # sampler that never draws one id (expected count 500) fails it surely.
    draws = np.concatenate([Uniform(100).mine(ctx, b).ids for _ in range(300)])
    c = np.bincount(draws, minlength=N)
    assert ((c - 500.0) ** 2 / 500.0).sum() < 110


def test_snm_never_uses_fresh_embeddings_between_refreshes():
    ctx, g = _ctx()
    m = StochasticNegativeMining(8, mem_percent=20.0, refresh_every=5)
    m.setup(ctx)
    m.start(ctx)
    assert m.pool.size == 12 and ctx.encoder_calls == {"mining": 12}
    assert m.memory_embeddings(ctx) == 12.0
    stale = m.pool_emb.copy()
    np.testing.assert_array_equal(stale, ctx.encoder.encode_targets(ctx.target_features[m.pool]))
    for step in range(1, 5):
        _perturb(ctx, g)
        ctx.step = step
        b = _batch(ctx, g, step=step)
        m.mine(ctx, b)
        assert ctx.encoder_calls == {"mining": 12}, "SNM encoded targets between refreshes"
        np.testing.assert_array_equal(m.pool_emb, stale)
        fresh = ctx.encoder.encode_targets(ctx.target_features[m.pool])
        assert not np.allclose(fresh, stale)
        dist = m.distribution(ctx, b)
        np.testing.assert_allclose(dist[:, m.pool], _softmax(ctx.beta * b.Q @ stale.T), rtol=1e-12)
        assert np.all(dist[:, np.setdiff1d(np.arange(N), m.pool)] == 0)
    _perturb(ctx, g)
    ctx.step = 5
    m.mine(ctx, _batch(ctx, g, step=5))
    assert ctx.encoder_calls == {"mining": 24} and m.refreshed_at == [0, 5]
    np.testing.assert_array_equal(m.pool_emb, ctx.encoder.encode_targets(ctx.target_features[m.pool]))


def test_snm_samples_follow_pool_softmax_and_log_q():
    """Per-query draws vs the pool softmax: 20000 draws per query, TV < 0.02 (sd of the empirical TV here is
    ~0.004, a 12-point softmax with a real error of 0.05 fails). log_q = log p_pool + log(m/N) exactly."""
    ctx, g = _ctx(1)
    m = StochasticNegativeMining(20000, mem_percent=20.0, refresh_every=100, shared=False)
    m.start(ctx)
    b = _batch(ctx, g, B=2)
    neg = m.mine(ctx, b)
    P = m.distribution(ctx, b)
    for r in range(2):
        emp = np.bincount(neg.ids[r], minlength=N) / neg.ids.shape[1]
        assert 0.5 * np.abs(emp - P[r]).sum() < 0.02
        np.testing.assert_allclose(neg.log_q[r], np.log(P[r, neg.ids[r]]) + np.log(12 / N), rtol=1e-10)


def test_shared_log_q_is_the_slot_mixture():
    ctx, g = _ctx(2)
    m = StochasticNegativeMining(6, mem_percent=50.0, refresh_every=100)
    m.start(ctx)
    b = _batch(ctx, g, B=4)
    state = ctx.rng.bit_generator.state
    neg = m.mine(ctx, b)
    ctx.rng.bit_generator.state = state
    slots = np.resize(ctx.rng.permutation(4), 6)  # the same slot assignment the miner drew
    P = m.distribution(ctx, b)
    mix = P[slots].mean(0)
    np.testing.assert_allclose(neg.log_q, np.log(mix[neg.ids]) + np.log(30 / N), rtol=1e-10)


@pytest.mark.parametrize("policy, evicted", [("fifo", 1), ("lru", 2)])
def test_negative_cache_eviction_order(policy, evicted):
    ctx, g = _ctx()
    c = NegativeCache(2, size=3, policy=policy)
    c.slot_ids = np.full(3, -1, dtype=np.int64)
    c.slot_emb = np.zeros((3, D))
    c.slot_time = np.full(3, -1, dtype=np.int64)
    c._where = {}
    e = np.eye(D)[:4]
    c.insert([1, 2, 3], e[:3])
    assert c.cached_ids().tolist() == [1, 2, 3]
    c.refresh([1], 5 * e[:1])  # target 1 used again: LRU moves it to the back, FIFO keeps its place
    np.testing.assert_array_equal(c.slot_emb[c._where[1]], 5 * e[0])
    c.insert([4], e[3:4])
    assert evicted not in c.cached_ids().tolist() and 4 in c.cached_ids().tolist()
    expected = {"fifo": [2, 3, 4], "lru": [3, 1, 4]}[policy]
    assert c.cached_ids().tolist() == expected
    c.insert([3], 7 * e[:1])  # already cached: refreshed in place, nothing evicted
    assert sorted(c.cached_ids().tolist()) == sorted(expected)
    np.testing.assert_array_equal(c.slot_emb[c._where[3]], 7 * e[0])


def test_negative_cache_streams_positives_and_refreshes_sampled():
    ctx, g = _ctx(3)
    c = NegativeCache(5, size=10, policy="fifo")
    c.setup(ctx)
    assert ctx.encoder_calls == {"mining": 10} and c.memory_embeddings(ctx) == 10.0
    b = _batch(ctx, g, B=4)
    neg = c.mine(ctx, b)
    assert set(neg.ids.tolist()) <= set(c.slot_ids.tolist())
    cached_neg = neg.ids[:1]
    new_emb = np.full((5, D), 0.5)
    ids = np.concatenate([b.positive_ids, cached_neg])
    c.observe(ctx, b, ids, new_emb)
    for t in b.positive_ids:
        assert t in c.cached_ids()
    np.testing.assert_array_equal(c.slot_emb[c._where[int(cached_neg[0])]], np.full(D, 0.5))
    assert ctx.encoder_calls == {"mining": 10}


def test_negative_cache_draws_follow_cache_softmax():
    """20000 inverse-CDF draws for one query against the softmax over the 10 cached scores: TV < 0.02 (empirical
    TV sd ~0.003 here)."""
    ctx, g = _ctx(4)
    c = NegativeCache(20000, size=10, shared=False)
    c.setup(ctx)
    b = _batch(ctx, g, B=1)
    neg = c.mine(ctx, b)
    P = c.distribution(ctx, b)[0]
    emp = np.bincount(neg.ids[0], minlength=N) / neg.ids.shape[1]
    assert 0.5 * np.abs(emp - P).sum() < 0.02
    np.testing.assert_allclose(np.exp(neg.log_q[0]), P[neg.ids[0]], rtol=1e-10)


def test_brute_force_equals_exact_topk():
    ctx, g = _ctx(5)
    b = _batch(ctx, g, B=5)
    neg = BruteForceTopK(7, shared=False).mine(ctx, b)
    assert neg.log_q is None and ctx.encoder_calls == {"mining": N}
    S = b.Q @ ctx.encoder.encode_targets(ctx.target_features).T
    for r in range(5):
        s = S[r].copy()
        s[b.positives[r]] = -np.inf
        np.testing.assert_array_equal(neg.ids[r], np.argsort(-s, kind="stable")[:7])
    shared = BruteForceTopK(10).mine(ctx, b)  # same parameters: the cached encoding is reused, no new calls
    assert ctx.encoder_calls == {"mining": N}
    assert shared.ids.size == 10 and np.unique(shared.ids).size == 10
    assert set(neg.ids[:, :2].ravel()) <= set(shared.ids.tolist())  # k >= 2B: every query's top 2 is in
    assert BruteForceTopK(3).memory_embeddings(ctx) == N and not BruteForceTopK.has_log_q


def test_full_softmax_and_in_batch():
    ctx, g = _ctx(6)
    b = _batch(ctx, g)
    fs = FullSoftmax()
    assert fs.mine(ctx, b).full
    P = fs.distribution(ctx, b)
    np.testing.assert_allclose(P, _softmax(ctx.beta * b.Q @ ctx.encoder.encode_targets(ctx.target_features).T))
    assert fs.memory_embeddings(ctx) == N and ctx.encoder_calls == {}
    ib = InBatch()
    assert ib.in_batch and ib.mine(ctx, b).ids.size == 0 and ib.memory_embeddings(ctx) == 0.0


def test_make_miner_and_bad_arguments():
    assert isinstance(make_miner("snm", k=5, mem_percent=2.0, policy="lru", refresh_every=None),
                      StochasticNegativeMining)
    assert make_miner("negative-cache", policy="lru").policy == "lru"
    with pytest.raises(ValueError, match="miner"):
        make_miner("nope")
    with pytest.raises(ValueError, match="k"):
        Uniform(0)
    with pytest.raises(ValueError, match="mem_percent"):
        StochasticNegativeMining(4, mem_percent=150)
    with pytest.raises(ValueError, match="policy"):
        NegativeCache(4, policy="random")
    with pytest.raises(ValueError, match="refresh_every"):
        StochasticNegativeMining(4, refresh_every=0)

"""The baselines' knobs (refimpl.mining.baselines): brute force's refresh period, SNM's top-scoring variant,
Negative Cache's inverse-CDF draws; and evaluate's MRR@1/10/100 (the paper's Table 2)."""
import numpy as np
import pytest

from refimpl.data import RetrievalDataset, planted_dataset
from refimpl.encoders import LinearDualEncoder
from refimpl.mining import (Batch, BruteForceTopK, MinerContext, NegativeCache, StochasticNegativeMining,
                            make_miner)
from refimpl.training import evaluate, train

N, F, D = 80, 12, 6


def _ctx(seed=0, n=N):
    g = np.random.default_rng(seed)
    enc = LinearDualEncoder(F, F, D, beta=5.0, rng=seed)
    return MinerContext(enc, g.normal(size=(n, F)), rng=seed + 1), g


def _batch(ctx, g, B=4, step=0):
    Xq = g.normal(size=(B, F))
    pos = [np.array([i, i + B], dtype=np.int64) for i in range(B)]
    return Batch(step=step, query_ids=np.arange(B), Xq=Xq, Q=ctx.encoder.encode_queries(Xq), positives=pos,
                 positive_ids=np.unique(np.concatenate(pos)))


def _perturb(ctx, g):
    ctx.encoder.B += 0.5 * g.normal(size=ctx.encoder.B.shape)
    ctx.advance()


def _top(S, positives, k):
    """Reference: each row's k best columns (excluding its positives), by a full sort."""
    out = []
    for b, p in enumerate(positives):
        s = S[b].copy()
        s[p] = -np.inf
        out.append(np.argsort(-s, kind="stable")[:k])
    return np.array(out)


# ------------------------------------------------------------------------------------------------ brute force
def test_brute_force_refresh_every_uses_the_stale_table_between_refreshes():
    """R = 3: the table is encoded at steps 0, 3, 6 only (N calls each); in between the negatives are the exact
    top-k of the STALE table (and differ from the fresh top-k), as the docstring says. R = 1: fresh every step."""
    ctx, g = _ctx()
    bf, fresh = BruteForceTopK(5, refresh_every=3, shared=False), BruteForceTopK(5, shared=False)
    stale_hits = 0
    for step in range(7):
        ctx.step = step
        b = _batch(ctx, g, step=step)
        if step in (0, 3, 6):
            table = ctx.encoder.encode_targets(ctx.target_features)
        neg = bf.mine(ctx, b)
        np.testing.assert_array_equal(neg.ids, _top(b.Q @ table.T, b.positives, 5))
        now = _top(b.Q @ ctx.encoder.encode_targets(ctx.target_features).T, b.positives, 5)
        np.testing.assert_array_equal(fresh.mine(ctx, b).ids, now)
        stale_hits += not np.array_equal(neg.ids, now)
        dist = bf.distribution(ctx, b)
        assert np.all(dist[np.arange(4)[:, None], neg.ids] == 0.2) and np.allclose(dist.sum(1), 1.0)
        _perturb(ctx, g)
    assert bf.refreshed_at == [0, 3, 6] and fresh.refreshed_at == list(range(7))
    assert stale_hits >= 2  # the stale table changed the answer between refreshes
    assert ctx.encoder_calls == {"mining": 7 * N}  # fresh: 7 N; bf's 3 refreshes share fresh's encodings
    assert bf.config()["refresh_every"] == 3
    with pytest.raises(ValueError, match="refresh_every"):
        BruteForceTopK(4, refresh_every=0)


def test_brute_force_refresh_counts_encoder_calls_in_training():
    ds = planted_dataset(n_targets=200, n_queries=200, branching=(4, 5), n_features=12, dim=6, rng=0)
    kw = dict(steps=12, batch_size=8, dim=6, uniform_warmup=2, seed=0)
    r1 = train(ds, BruteForceTopK(8), **kw).final
    r4 = train(ds, BruteForceTopK(8, refresh_every=4), **kw).final
    assert r1["encoder_calls_mining"] == 10 * 200  # every mining step
    assert r4["encoder_calls_mining"] == 3 * 200  # mining steps 2, 6, 10
    assert r4["mem_percent"] == 100.0


# ------------------------------------------------------------------------------------------------ SNM top
def test_snm_top_takes_the_best_stale_pool_members_excluding_positives():
    """select='top': per query, its k best stale pool scores (positives excluded even when pooled), deterministic
    given the pool; no log_q. select='sample' on the same pool draws from the softmax, so it differs."""
    ctx, g = _ctx(1)
    m = StochasticNegativeMining(6, mem_percent=100.0, refresh_every=100, select="top", shared=False)
    m.start(ctx)
    assert m.pool.size == N and not m.has_log_q and m.config()["select"] == "top"
    _perturb(ctx, g)  # the pool is now stale: the ranking must use the stale embeddings
    b = _batch(ctx, g)
    neg = m.mine(ctx, b)
    assert neg.log_q is None
    want = m.pool[_top(b.Q @ m.pool_emb.T, [np.searchsorted(m.pool, p) for p in b.positives], 6)]
    np.testing.assert_array_equal(neg.ids, want)
    for r, p in enumerate(b.positives):
        assert not set(p.tolist()) & set(neg.ids[r].tolist())
    np.testing.assert_array_equal(m.mine(ctx, b).ids, neg.ids)  # deterministic
    dist = m.distribution(ctx, b)
    assert np.allclose(dist[np.arange(4)[:, None], neg.ids], 1 / 6) and np.allclose(dist.sum(1), 1.0)
    s = StochasticNegativeMining(6, mem_percent=100.0, refresh_every=100, shared=False)
    s.start(_ctx(1)[0])
    assert not np.array_equal(np.sort(s.mine(ctx, b).ids, axis=1), np.sort(neg.ids, axis=1))


def test_snm_top_shared_fills_distinct_slots_round_robin_from_a_small_pool():
    ctx, g = _ctx(2)
    m = StochasticNegativeMining(12, mem_percent=25.0, refresh_every=100, select="top")
    m.start(ctx)
    b = _batch(ctx, g)
    ids = m.mine(ctx, b).ids
    assert ids.shape == (12,) and np.unique(ids).size == 12 and set(ids.tolist()) <= set(m.pool.tolist())
    S = b.Q @ m.pool_emb.T
    for r in range(4):  # k = 3 B: every query's own best 2 pool members are in the shared set
        s = S[r].copy()
        s[np.isin(m.pool, b.positives[r])] = -np.inf
        assert set(m.pool[np.argsort(-s)[:2]].tolist()) <= set(ids.tolist())
    ds = planted_dataset(n_targets=200, n_queries=200, branching=(4, 5), n_features=12, dim=6, rng=0)
    with pytest.raises(ValueError, match="log_q_correction"):
        train(ds, StochasticNegativeMining(4, select="top"), steps=3, log_q_correction=True)
    with pytest.raises(ValueError, match="select"):
        StochasticNegativeMining(4, select="best")
    assert make_miner("snm", k=4, select="top").select == "top"


# ------------------------------------------------------------------------------------------------ Negative Cache
def test_negative_cache_shared_draws_and_log_q_are_the_slot_mixture():
    """Shared slots: 40000 inverse-CDF draws from the slot mixture q̄ = mean_j p_{b_j} of a 12-entry cache, TV to q̄
    < 0.015 (the empirical TV of 12 cells at 40000 draws has mean ~0.006; a draw from the wrong query's softmax,
    TV ~0.3 here, fails), and log_q = log q̄ at every draw."""
    ctx, g = _ctx(3)
    c = NegativeCache(40000, size=12)
    c.setup(ctx)
    b = _batch(ctx, g, B=4)
    state = ctx.rng.bit_generator.state
    neg = c.mine(ctx, b)
    ctx.rng.bit_generator.state = state
    slots = np.resize(ctx.rng.permutation(4), 40000)
    mix = c.distribution(ctx, b)[slots].mean(0)
    np.testing.assert_allclose(neg.log_q, np.log(mix[neg.ids]), rtol=1e-10)
    emp = np.bincount(neg.ids, minlength=N) / neg.ids.size
    assert 0.5 * np.abs(emp - mix).sum() < 0.015
    assert set(neg.ids.tolist()) <= set(c.slot_ids.tolist())


# ------------------------------------------------------------------------------------------------ MRR@k
def test_evaluate_mrr_at_1_10_100_from_known_ranks():
    """Each test query's one positive is the teacher's rank-r target, r in {1, 4, 10, 11, 60, 100, 101, 150}:
    MRR@k = mean of [r <= k] / r exactly, and MRR@1 = R@1."""
    ds = planted_dataset(n_targets=300, n_queries=320, branching=(5, 6), n_features=16, dim=8, rng=2)
    t = ds.teacher
    S = t.encode_queries(ds.query_features) @ t.encode_targets(ds.target_features).T
    order = np.argsort(-S, axis=1, kind="stable")
    gaps = np.sort(S, axis=1)[:, ::-1]
    ranks = np.array([1, 4, 10, 11, 60, 100, 101, 150])
    # only queries whose ranking has no near-ties around the chosen ranks (so the rank is unambiguous)
    ok = [q for q in range(ds.n_queries) if np.min(np.abs(np.diff(gaps[q, :160]))) > 1e-9]
    test = np.array(ok[:ranks.size * 8])
    r_of = {q: ranks[i % ranks.size] for i, q in enumerate(test)}
    pos = [np.array([order[q, r_of.get(q, 1) - 1]]) for q in range(ds.n_queries)]
    d2 = RetrievalDataset(ds.query_features, ds.target_features, pos, np.setdiff1d(np.arange(ds.n_queries), test),
                          np.sort(test))
    m = evaluate(t, d2)
    r = np.array([r_of[q] for q in np.sort(test)])
    for k in (1, 10, 100):
        assert m[f"MRR@{k}"] == pytest.approx(np.mean(np.where(r <= k, 1.0 / r, 0.0)), abs=1e-12)
    assert m["MRR@1"] == m["R@1"] == pytest.approx(np.mean(r == 1))
    assert m["MRR@100"] > m["MRR@10"] > m["MRR@1"]
    small = evaluate(t, d2, ks=(1,))  # small ks still rank the top 100 for MRR@100
    assert small["MRR@100"] == m["MRR@100"]

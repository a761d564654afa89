"""The paper's baseline miners (paper §5) and the exact gold standard, behind the interface of
:mod:`refimpl.mining.base`: in-batch, uniform, Stochastic Negative Mining, Negative Cache, brute-force top-k and
the full softmax.
"""
from __future__ import annotations

import numpy as np

from refimpl._validate import check_int, check_positive
from refimpl.mining.base import Miner, Negatives, draw_slots, log_softmax_rows, mixture_log_q_rows, shared_slots

__all__ = ["InBatch", "Uniform", "StochasticNegativeMining", "NegativeCache", "BruteForceTopK", "FullSoftmax"]


def _softmax_draws(log_p, k, rng, shared, per_example):
    """Draws of the rows' softmaxes ``exp(log_p)`` (B, C) by inverse CDF (:func:`draw_slots`, O(B C + k log C)).

    shared: one 1-D set, slot j drawn from row ``b_j`` (:func:`shared_slots`), with the slot-mixture log q̄;
    otherwise (B, k) per-row draws with their own log p. Returns (columns, log q).
    """
    cdf = np.cumsum(np.exp(log_p), axis=1)
    if shared:
        slots = shared_slots(log_p.shape[0], k, rng, per_example)
        cols = draw_slots(cdf, slots, rng.random(slots.size))
        return cols, mixture_log_q_rows(log_p, slots, cols)
    B = log_p.shape[0]
    cols = draw_slots(cdf, np.repeat(np.arange(B), k), rng.random(B * k)).reshape(B, k)
    return cols, np.take_along_axis(log_p, cols, axis=1)


def _ranked_top(S, k):
    """Per row, the column indices of the ``min(k, C)`` largest entries of ``S`` (B, C), best first (stable)."""
    k = min(k, S.shape[1])
    idx = np.argpartition(-S, k - 1, axis=1)[:, :k] if k < S.shape[1] else np.tile(np.arange(S.shape[1]),
                                                                                     (S.shape[0], 1))
    order = np.argsort(-np.take_along_axis(S, idx, axis=1), axis=1, kind="stable")
    return np.take_along_axis(idx, order, axis=1).astype(np.int64)


def _top_slots(S, k, rng):
    """k distinct shared columns of ``S`` (B, C; -inf = excluded): round-robin over a random order of the rows,
    each row contributing its next-best column not already taken (fewer than k if too few finite entries)."""
    order = rng.permutation(S.shape[0])
    top = _ranked_top(S, k)
    chosen, seen = [], set()
    for r in range(top.shape[1]):
        for b in order:
            t = int(top[b, r])
            if t not in seen and np.isfinite(S[b, t]):
                seen.add(t)
                chosen.append(t)
                if len(chosen) == k:
                    return np.array(chosen, dtype=np.int64)
    return np.array(chosen, dtype=np.int64)


class InBatch(Miner):
    """In-batch negatives (paper §5, first row of Table 1): the other queries' positives are the negatives.

    Mines nothing itself; the loop adds the batch's positives as shared negatives. Their proposal (used by the TV
    probe and by log-Q correction) is the frequency of each target among the training positives. Mem %: 0 (the
    in-batch targets are encoded for the loss anyway; no state is kept).
    """

    name = "in-batch"
    in_batch = True
    warmup = False

    def mine(self, ctx, batch):
        return Negatives(np.zeros(0, dtype=np.int64), np.zeros(0))

    def distribution(self, ctx, batch):
        if ctx.in_batch_log_q is None:
            return None
        return np.tile(np.exp(ctx.in_batch_log_q), (batch.Q.shape[0], 1))


class Uniform(Miner):
    """Uniform negatives (paper §5, Table 1 "uniform"): k targets drawn uniformly with replacement.

    ``log_q = -log N`` for every draw (shared or per query). ``per_example``: k draws per example (shared: B k
    draws for the batch). Mem %: 0.
    """

    name = "uniform"
    warmup = False

    def __init__(self, k: int = 64, *, shared: bool = True, per_example: bool = False):
        self.k = check_int("k", k, low=1)
        self.shared = bool(shared)
        self.per_example = bool(per_example)

    def mine(self, ctx, batch):
        B = batch.Q.shape[0]
        shape = ((B * self.k if self.per_example else self.k),) if self.shared else (B, self.k)
        ids = ctx.rng.integers(0, ctx.n_targets, size=shape).astype(np.int64)
        return Negatives(ids, np.full(shape, -np.log(ctx.n_targets)))

    def distribution(self, ctx, batch):
        return np.full((batch.Q.shape[0], ctx.n_targets), 1.0 / ctx.n_targets)

    def config(self):
        return {"name": self.name, "k": self.k, "shared": self.shared, "per_example": self.per_example}


class StochasticNegativeMining(Miner):
    """Stochastic Negative Mining (Reddi et al. 2019) as run in the paper (§5, Table 1 "SNM").

    "A uniform pool of stale embeddings held on the accelerator, refreshed every 100 or 500 steps; negatives
    sampled from its softmax" (paper §5). Here: a pool of ``m = round(mem_percent * N / 100)`` targets drawn
    uniformly without replacement; at ``start`` and then every ``refresh_every`` steps the pool is re-drawn and
    encoded with the encoder of that moment (``m`` target-encoder calls); between refreshes the stale pool
    embeddings are used as they are (never fresh ones).

    ``select="sample"`` (the paper's SNM, default): each slot draws a pool member from the softmax
    ``p_pool(n | q) = exp(beta <q, t_stale_n>) / sum_{n' in pool} exp(beta <q, t_stale_n'>)`` (with replacement,
    by inverse CDF). log_q: the two-stage proposal "uniform pool, then softmax within it" has no closed-form
    marginal; we report ``log q = log p_pool(n) + log(m / N)``, the importance weight for which ``exp(s_n)/q`` is
    unbiased for Z over the draw of the pool (each target is in the pool with probability m/N).

    ``select="top"`` (Reddi et al.'s own variant, stronger): the slots of query q take q's highest stale scores
    ``<q, t_stale_n>`` among the pool members that are not q's positives, best first; shared slots are filled
    round-robin over a random order of the batch's queries, each query contributing its next-best member not already
    taken (as :class:`BruteForceTopK`, restricted to the pool). Deterministic given the pool: no sampling
    distribution (``log_q`` None; log-Q correction is refused).

    Mem %: the pool, ``m`` embeddings. ``per_example``: k draws per example (the paper's setup; shared: the B k
    draws form one set for the batch).
    """

    name = "snm"

    def __init__(self, k: int = 64, *, mem_percent: float = 3.0, refresh_every: int = 100, select: str = "sample",
                 shared: bool = True, per_example: bool = False):
        self.k = check_int("k", k, low=1)
        if select not in ("sample", "top"):
            raise ValueError(f"select: expected 'sample' or 'top', got {select!r}")
        self.select = select
        self.has_log_q = select == "sample"
        self.mem_percent = check_positive("mem_percent", mem_percent)
        if self.mem_percent > 100:
            raise ValueError(f"mem_percent: must be <= 100, got {mem_percent}")
        self.refresh_every = check_int("refresh_every", refresh_every, low=1)
        self.shared = bool(shared)
        self.per_example = bool(per_example)
        self.pool = None
        self.pool_emb = None
        self.refreshed_at = []

    def pool_size(self, n_targets: int) -> int:
        return max(1, min(n_targets, int(round(self.mem_percent * n_targets / 100.0))))

    def refresh(self, ctx) -> None:
        m = self.pool_size(ctx.n_targets)
        self.pool = np.sort(ctx.rng.choice(ctx.n_targets, size=m, replace=False)).astype(np.int64)
        self.pool_emb = ctx.encode_targets(self.pool, purpose="mining").copy()
        self.refreshed_at.append(ctx.step)

    def start(self, ctx):
        self.refresh(ctx)
        self._last = ctx.step

    def _log_p(self, ctx, Q):
        return log_softmax_rows(ctx.beta * (Q @ self.pool_emb.T))

    def _pool_scores(self, batch):
        """(B, m) stale scores ``<q, t_stale>`` with every query's own positives set to -inf."""
        S = batch.Q @ self.pool_emb.T
        m = self.pool.size
        for b, p in enumerate(batch.positives):
            cols = np.minimum(np.searchsorted(self.pool, p), m - 1)  # the pool is sorted
            S[b, cols[self.pool[cols] == p]] = -np.inf
        return S

    def mine(self, ctx, batch):
        if ctx.step - self._last >= self.refresh_every:
            self.refresh(ctx)
            self._last = ctx.step
        B = batch.Q.shape[0]
        if self.select == "top":
            S = self._pool_scores(batch)
            if self.shared:
                return Negatives(self.pool[_top_slots(S, self.k, ctx.rng)], None)
            return Negatives(self.pool[_ranked_top(S, self.k)], None)
        cols, log_q = _softmax_draws(self._log_p(ctx, batch.Q), self.k, ctx.rng, self.shared, self.per_example)
        return Negatives(self.pool[cols], log_q + np.log(self.pool.size / ctx.n_targets))

    def distribution(self, ctx, batch):
        """``p_pool`` on the pool (``select="sample"``), or uniform over each query's own top k pool members
        (``"top"``, as :meth:`BruteForceTopK.distribution`); 0 outside the pool."""
        out = np.zeros((batch.Q.shape[0], ctx.n_targets))
        if self.select == "top":
            top = _ranked_top(self._pool_scores(batch), self.k)
            np.put_along_axis(out, self.pool[top], 1.0 / top.shape[1], axis=1)
            return out
        out[:, self.pool] = np.exp(self._log_p(ctx, batch.Q))
        return out

    def memory_embeddings(self, ctx):
        return float(self.pool_size(ctx.n_targets))

    def config(self):
        return {"name": self.name, "k": self.k, "mem_percent": self.mem_percent,
                "refresh_every": self.refresh_every, "select": self.select, "shared": self.shared,
                "per_example": self.per_example}


class NegativeCache(Miner):
    """Negative Cache (Lindgren et al. 2021, "Efficient training of retrieval models using negative cache"),
    paper §5, Table 1 "Negative Cache" (FIFO/LRU streaming cache of stale embeddings, paper §5).

    A cache of ``size`` slots holds (target id, stale embedding). It is filled at ``setup`` with ``size`` uniformly
    drawn targets (``size`` target-encoder calls). After every step, the batch's positives stream in with the
    embeddings computed for the loss (no extra encoder call), and every cached target that was encoded for the
    loss (the sampled negatives) has its embedding refreshed. Eviction: ``policy="fifo"`` replaces the slot
    inserted longest ago (a refresh does not move an entry); ``policy="lru"`` replaces the slot least recently
    inserted, refreshed or sampled. Negatives: each slot draws a cached entry c from the softmax over the cached
    scores, ``exp(beta <q, e_c>) / sum_c' exp(beta <q, e_c'>)``, with replacement, by inverse CDF (shared slots
    round-robin over a random order of the batch's queries, as every shared miner).

    log_q: the softmax over the cache, conditional on the cache content (the cache is filled by the data stream,
    so no marginal proposal exists; with log-Q correction the estimator is consistent only for the cached
    part of Z). Mem %: the cache, ``size`` embeddings (``size`` may be given as ``mem_percent`` of N).
    """

    name = "negative-cache"

    def __init__(self, k: int = 64, *, size: int | None = None, mem_percent: float | None = 6.3,
                 policy: str = "fifo", shared: bool = True):
        self.k = check_int("k", k, low=1)
        if policy not in ("fifo", "lru"):
            raise ValueError(f"policy: expected 'fifo' or 'lru', got {policy!r}")
        if size is None and mem_percent is None:
            raise ValueError("size, mem_percent: give one of them")
        self.size = None if size is None else check_int("size", size, low=1)
        self.mem_percent = None if mem_percent is None or size is not None else check_positive("mem_percent",
                                                                                               mem_percent)
        self.policy = policy
        self.shared = bool(shared)
        self.slot_ids = None
        self.slot_emb = None
        self.slot_time = None
        self._clock = 0

    def capacity(self, n_targets: int) -> int:
        if self.size is not None:
            return min(self.size, n_targets)
        return max(1, min(n_targets, int(round(self.mem_percent * n_targets / 100.0))))

    def setup(self, ctx):
        c = self.capacity(ctx.n_targets)
        self.slot_ids = np.full(c, -1, dtype=np.int64)
        self.slot_emb = np.zeros((c, ctx.encoder.dim))
        self.slot_time = np.full(c, -1, dtype=np.int64)
        self._where = {}
        init = ctx.rng.choice(ctx.n_targets, size=c, replace=False).astype(np.int64)
        self.insert(init, ctx.encode_targets(init, purpose="mining"))

    def _touch(self, slot: int) -> None:
        self._clock += 1
        self.slot_time[slot] = self._clock

    def insert(self, ids, emb) -> None:
        """Stream targets in order: refresh those already cached, evict (FIFO/LRU) to make room for the others."""
        for t, e in zip(np.asarray(ids, dtype=np.int64), emb):
            t = int(t)
            s = self._where.get(t)
            if s is not None:
                self.slot_emb[s] = e
                if self.policy == "lru":
                    self._touch(s)
                continue
            s = int(np.argmin(self.slot_time))  # empty slots have time -1; ties -> lowest slot
            old = int(self.slot_ids[s])
            if old >= 0:
                del self._where[old]
            self.slot_ids[s] = t
            self.slot_emb[s] = e
            self._where[t] = s
            self._touch(s)

    def refresh(self, ids, emb) -> None:
        """Refresh the embeddings of the cached targets among ``ids`` (no insertion)."""
        for t, e in zip(np.asarray(ids, dtype=np.int64), emb):
            s = self._where.get(int(t))
            if s is not None:
                self.slot_emb[s] = e
                if self.policy == "lru":
                    self._touch(s)

    def cached_ids(self) -> np.ndarray:
        """Cached target ids from oldest to newest (the eviction order)."""
        live = np.flatnonzero(self.slot_ids >= 0)
        return self.slot_ids[live[np.argsort(self.slot_time[live], kind="stable")]]

    def _log_p(self, ctx, Q):
        S = ctx.beta * (Q @ self.slot_emb.T)
        S[:, self.slot_ids < 0] = -np.inf
        return log_softmax_rows(S)

    def mine(self, ctx, batch):
        cols, log_q = _softmax_draws(self._log_p(ctx, batch.Q), self.k, ctx.rng, self.shared, False)
        ids = self.slot_ids[cols]
        if self.policy == "lru":
            for s in np.unique(cols):
                self._touch(int(s))
        return Negatives(ids, log_q)

    def observe(self, ctx, batch, ids, emb):
        pos = np.isin(ids, batch.positive_ids)
        self.refresh(ids[~pos], emb[~pos])
        self.insert(ids[pos], emb[pos])

    def distribution(self, ctx, batch):
        out = np.zeros((batch.Q.shape[0], ctx.n_targets))
        live = self.slot_ids >= 0
        np.add.at(out.T, self.slot_ids[live], np.exp(self._log_p(ctx, batch.Q)[:, live]).T)
        return out

    def memory_embeddings(self, ctx):
        return float(self.capacity(ctx.n_targets))

    def config(self):
        return {"name": self.name, "k": self.k, "size": self.size, "mem_percent": self.mem_percent,
                "policy": self.policy, "shared": self.shared}


class BruteForceTopK(Miner):
    """Exhaustive brute-force top-k (paper §5, Table 1 "exhaustive brute force"): the oracle miner.

    A table of all N target embeddings is encoded with the encoder of that moment (N target-encoder calls) at the
    first mining step and then every ``refresh_every`` steps; each query's k highest logits ``<q, t_n>`` over the
    table, among the targets that are not its positives, are its negatives. ``refresh_every=1`` (default): the
    table is fresh every step (and reused for the loss: no extra calls); ``R > 1``: between refreshes the stale
    table is used as it is (how often the paper re-encoded it is unstated), so the cost of a step is one (B, N)
    scoring instead of N encodings. Shared: the k slots are filled round-robin over a random query order, each
    query contributing its next-best negative not already taken. No sampling distribution (``log_q`` None; log-Q
    correction is refused). Mem %: 100 (all N embeddings resident). Ties between equal logits: ``numpy.argpartition``.
    """

    name = "brute-force"
    has_log_q = False

    def __init__(self, k: int = 64, *, refresh_every: int = 1, shared: bool = True):
        self.k = check_int("k", k, low=1)
        self.refresh_every = check_int("refresh_every", refresh_every, low=1)
        self.shared = bool(shared)
        self.table = None
        self.refreshed_at = []

    @staticmethod
    def ranked(S: np.ndarray, positives, k: int) -> np.ndarray:
        """Per row, the indices of the k largest entries of ``S`` excluding ``positives[b]``, best first."""
        S = S.copy()
        for b, p in enumerate(positives):
            S[b, p] = -np.inf
        return _ranked_top(S, k)

    def _table(self, ctx):
        if self.table is None or ctx.step - self.refreshed_at[-1] >= self.refresh_every:
            self.table = ctx.encode_all_targets(purpose="mining")
            self.refreshed_at.append(ctx.step)
        return self.table

    def mine(self, ctx, batch):
        S = batch.Q @ self._table(ctx).T
        if not self.shared:
            return Negatives(self.ranked(S, batch.positives, self.k), None)
        for b, p in enumerate(batch.positives):
            S[b, p] = -np.inf
        return Negatives(_top_slots(S, self.k, ctx.rng), None)

    def distribution(self, ctx, batch):
        """The (deterministic) negatives as a distribution: uniform over each query's own top k in the table the
        miner ranks with (fresh embeddings before the first mining step)."""
        E = self.table if self.table is not None else ctx.peek_all_targets()
        top = self.ranked(batch.Q @ E.T, batch.positives, self.k)
        out = np.zeros((top.shape[0], ctx.n_targets))
        np.put_along_axis(out, top, 1.0 / top.shape[1], axis=1)
        return out

    def memory_embeddings(self, ctx):
        return float(ctx.n_targets)

    def config(self):
        return {"name": self.name, "k": self.k, "refresh_every": self.refresh_every, "shared": self.shared}


class FullSoftmax(Miner):
    """The full softmax (Eq. 2): the exact gradient, our gold standard (not a row of the paper's tables).

    Every step the loop encodes all N targets (N target-encoder calls, counted as ``loss``) and uses the exact
    loss over all of them.
    Its "negative distribution" is the exact softmax itself (TV 0). Mem %: 100.
    """

    name = "full-softmax"
    k = 0
    warmup = False

    def mine(self, ctx, batch):
        return Negatives(np.zeros(0, dtype=np.int64), None, full=True)

    def distribution(self, ctx, batch):
        E = ctx.peek_all_targets()
        return np.exp(log_softmax_rows(ctx.beta * (batch.Q @ E.T)))

    def memory_embeddings(self, ctx):
        return float(ctx.n_targets)

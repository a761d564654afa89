"""The paper's baseline miners (paper §5) and the exact gold standard, behind the interface of
:mod:`refimpl.mining.base`: in-batch, uniform, Stochastic Negative Mining, Negative Cache, brute-force top-k and
the full softmax.
"""
from __future__ import annotations

import numpy as np

from refimpl._validate import check_int, check_positive
from refimpl.mining.base import (Miner, Negatives, draw_slots, log_softmax_rows, mixture_log_q_rows, shared_slots,
                                 slot_queries)

__all__ = ["InBatch", "Uniform", "StochasticNegativeMining", "NegativeCache", "BruteForceTopK", "FullSoftmax"]


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
    embeddings are used as they are (never fresh ones). Each slot draws a pool member from the softmax
    ``exp(beta <q, t_stale>)`` over the pool (with replacement).

    log_q: the two-stage proposal "uniform pool, then softmax within it" has no closed-form marginal; we report
    ``log q = log p_pool(n) + log(m / N)``, the importance weight for which ``exp(s_n)/q`` is unbiased for Z over
    the draw of the pool (each target is in the pool with probability m/N). Mem %: the pool, ``m`` embeddings.
    ``per_example``: k draws per example (the paper's setup; shared: the B k draws form one set for the batch).
    """

    name = "snm"

    def __init__(self, k: int = 64, *, mem_percent: float = 3.0, refresh_every: int = 100, shared: bool = True,
                 per_example: bool = False):
        self.k = check_int("k", k, low=1)
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

    def mine(self, ctx, batch):
        if ctx.step - self._last >= self.refresh_every:
            self.refresh(ctx)
            self._last = ctx.step
        log_p = self._log_p(ctx, batch.Q)
        cdf = np.cumsum(np.exp(log_p), axis=1)
        offset = np.log(self.pool.size / ctx.n_targets)
        B = batch.Q.shape[0]
        if self.shared:
            slots = shared_slots(B, self.k, ctx.rng, self.per_example)
            cols = draw_slots(cdf, slots, ctx.rng.random(slots.size))
            return Negatives(self.pool[cols], mixture_log_q_rows(log_p, slots, cols) + offset)
        slots = np.repeat(np.arange(B), self.k)
        cols = draw_slots(cdf, slots, ctx.rng.random(slots.size)).reshape(B, self.k)
        return Negatives(self.pool[cols], np.take_along_axis(log_p, cols, axis=1) + offset)

    def distribution(self, ctx, batch):
        out = np.zeros((batch.Q.shape[0], ctx.n_targets))
        out[:, self.pool] = np.exp(self._log_p(ctx, batch.Q))
        return out

    def memory_embeddings(self, ctx):
        return float(self.pool_size(ctx.n_targets))

    def config(self):
        return {"name": self.name, "k": self.k, "mem_percent": self.mem_percent,
                "refresh_every": self.refresh_every, "shared": self.shared, "per_example": self.per_example}


class NegativeCache(Miner):
    """Negative Cache (Lindgren et al. 2021, "Efficient training of retrieval models using negative cache"),
    paper §5, Table 1 "Negative Cache" (FIFO/LRU streaming cache of stale embeddings, paper §5).

    A cache of ``size`` slots holds (target id, stale embedding). It is filled at ``setup`` with ``size`` uniformly
    drawn targets (``size`` target-encoder calls). After every step, the batch's positives stream in with the
    embeddings computed for the loss (no extra encoder call), and every cached target that was encoded for the
    loss (the sampled negatives) has its embedding refreshed. Eviction: ``policy="fifo"`` replaces the slot
    inserted longest ago (a refresh does not move an entry); ``policy="lru"`` replaces the slot least recently
    inserted, refreshed or sampled. Negatives: each slot draws ``argmax_c (beta <q, e_c> + G_c)`` with i.i.d.
    Gumbel noise G (Gumbel-max = a draw from the softmax over cached scores, with replacement).

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
        log_p = self._log_p(ctx, batch.Q)
        B = batch.Q.shape[0]
        if self.shared:
            slots = slot_queries(B, self.k, ctx.rng)
            g = ctx.rng.gumbel(size=(self.k, self.slot_ids.size))
            cols = np.argmax(log_p[slots] + g, axis=1).astype(np.int64)
            ids, log_q = self.slot_ids[cols], mixture_log_q_rows(log_p, slots, cols)
        else:
            g = ctx.rng.gumbel(size=(B, self.k, self.slot_ids.size))
            cols = np.argmax(log_p[:, None, :] + g, axis=2).astype(np.int64)
            ids, log_q = self.slot_ids[cols], np.take_along_axis(log_p, cols, axis=1)
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

    Every step all N targets are encoded with the current encoder (N target-encoder calls, reused for the loss)
    and each query's k highest fresh logits among the targets that are not its positives are its negatives.
    Shared: the k slots are filled round-robin over a random query order, each query contributing its next-best
    negative not already taken. No sampling distribution (``log_q`` None; log-Q correction is refused). Mem %: 100
    (all N fresh embeddings resident). Ties between equal logits are broken by ``numpy.argpartition``.
    """

    name = "brute-force"
    has_log_q = False

    def __init__(self, k: int = 64, *, shared: bool = True):
        self.k = check_int("k", k, low=1)
        self.shared = bool(shared)

    @staticmethod
    def ranked(S: np.ndarray, positives, k: int) -> np.ndarray:
        """Per row, the indices of the k largest entries of ``S`` excluding ``positives[b]``, best first."""
        S = S.copy()
        for b, p in enumerate(positives):
            S[b, p] = -np.inf
        k = min(k, S.shape[1])
        idx = np.argpartition(-S, k - 1, axis=1)[:, :k] if k < S.shape[1] else np.tile(np.arange(S.shape[1]),
                                                                                         (S.shape[0], 1))
        order = np.argsort(-np.take_along_axis(S, idx, axis=1), axis=1, kind="stable")
        return np.take_along_axis(idx, order, axis=1).astype(np.int64)

    def mine(self, ctx, batch):
        E = ctx.encode_all_targets(purpose="mining")
        S = batch.Q @ E.T
        B = S.shape[0]
        if not self.shared:
            return Negatives(self.ranked(S, batch.positives, self.k), None)
        order = ctx.rng.permutation(B)
        top = self.ranked(S, batch.positives, self.k)
        chosen, seen = [], set()
        for r in range(top.shape[1]):
            for b in order:
                t = int(top[b, r])
                if t not in seen and np.isfinite(S[b, t]):
                    seen.add(t)
                    chosen.append(t)
                    if len(chosen) == self.k:
                        return Negatives(np.array(chosen, dtype=np.int64), None)
        return Negatives(np.array(chosen, dtype=np.int64), None)

    def distribution(self, ctx, batch):
        """The (deterministic) negatives as a distribution: uniform over each query's own top k."""
        E = ctx.peek_all_targets()
        top = self.ranked(batch.Q @ E.T, batch.positives, self.k)
        out = np.zeros((top.shape[0], ctx.n_targets))
        np.put_along_axis(out, top, 1.0 / top.shape[1], axis=1)
        return out

    def memory_embeddings(self, ctx):
        return float(ctx.n_targets)

    def config(self):
        return {"name": self.name, "k": self.k, "shared": self.shared}


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

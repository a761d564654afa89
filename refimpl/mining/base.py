"""Negative miners behind one interface: the baselines of the paper's tables (paper §5) and the gold standard.

Every miner is driven by :func:`refimpl.training.train` (Alg. 4, mini-batch form) through five hooks:

- ``setup(ctx)``: once, before the first step (the encoder is initialised; e.g. fill a cache).
- ``start(ctx)``: once, at the first mining step, i.e. after the uniform-only warm-up of paper App. C (e.g. the
  initial encoding of Alg. 6 and the tree build).
- ``mine(ctx, batch) -> Negatives``: every mining step, with the batch's query embeddings under the current encoder.
- ``observe(ctx, batch, ids, emb)``: after every optimiser step (warm-up included); ``ids``/``emb`` are the targets
  that were encoded for this step's loss, at the parameters of that step (free for the miner: no encoder call).
  Periodic work (SNM's refresh every R steps; DyNNIBAL's re-encode + tree maintenance every w steps) is keyed on
  ``ctx.step`` here or in ``mine``.
- ``distribution(ctx, batch) -> (B, N) array or None``: the per-query distribution the miner draws its negatives
  from, for the TV probe; it must not consume randomness or change state.

:class:`MinerContext` is everything a miner may touch: the live encoder, the target features, its own ``rng``,
``beta``, the step counter, and ``encode_targets`` / ``encode_all_targets`` which are the ONLY way a miner runs the
target encoder, so that target-encoder calls (rows encoded) are counted by the code. ``memory_embeddings(ctx)``
reports the miner's accelerator-resident target state in units of one full ``dim``-dimensional embedding; the
paper's Mem % (§7) is ``100 * memory_embeddings / N``.

Shared negatives (the paper's setup, §6): a miner with ``shared=True`` returns ONE 1-D set of ``k`` negatives for
the whole batch. Per-query miners fill the ``k`` slots round-robin over a random order of the batch's queries
(slot j draws from the distribution of query ``b_j``); the ``log_q`` of a drawn target is then that of the slot
mixture ``q̄(n) = (1/k) Σ_j q_{b_j}(n)`` (the balance heuristic of multiple importance sampling), for which the
log-Q-corrected estimate of Z stays unbiased for every query of the batch. With ``shared=False`` a miner returns
(B, k) per-query negatives and per-query ``log_q``.
"""
from __future__ import annotations

from dataclasses import dataclass

import numpy as np

from refimpl._validate import as_rng
from refimpl.softmax import log_softmax, logsumexp

__all__ = ["Negatives", "Batch", "MinerContext", "Miner", "slot_queries", "shared_slots", "draw_slots",
           "mixture_log_q_rows", "log_softmax_rows"]


@dataclass
class Negatives:
    """A miner's answer for one step.

    ids : int64 target ids, 1-D (shared across the batch) or 2-D (batch x k, per query).
    log_q : float64 array of the same shape, log-probability of each draw under the distribution actually sampled
        (for the optional log-Q correction), or None where no sampling distribution exists (top-k).
    full : True for :class:`FullSoftmax`: the loop uses the exact loss over all N targets (ids is empty).
    """

    ids: np.ndarray
    log_q: np.ndarray | None = None
    full: bool = False


@dataclass
class Batch:
    """One mini-batch as the miner sees it.

    step : the training step (0-based). query_ids : dataset query ids. Xq : their features.
    Q : (B, D) query embeddings under the current encoder. positives : list of 1-D target-id arrays per query.
    positive_ids : the sorted unique positive target ids of the batch.
    """

    step: int
    query_ids: np.ndarray
    Xq: object
    Q: np.ndarray
    positives: list
    positive_ids: np.ndarray


class MinerContext:
    """What a miner can see: the live encoder, target features, an rng, and counted access to the target encoder.

    Attributes: ``encoder`` (updated in place by the optimiser), ``target_features`` (N rows), ``n_targets``,
    ``beta``, ``rng`` (the miner's own Generator), ``step``, ``version`` (incremented after every optimiser
    update), ``encoder_calls`` (dict purpose -> rows encoded), ``in_batch_log_q`` (log of the in-batch proposal:
    the frequency of each target among the training positives; -inf for targets never positive).
    """

    def __init__(self, encoder, target_features, *, rng=None, in_batch_log_q=None):
        self.encoder = encoder
        self.target_features = target_features
        self.n_targets = int(target_features.shape[0])
        self.beta = float(encoder.beta)
        self.rng = as_rng(rng)
        self.step = 0
        self.version = 0
        self.encoder_calls: dict[str, int] = {}
        self.in_batch_log_q = in_batch_log_q
        self._all_cache = None  # (version, embeddings of all targets)

    def count(self, purpose: str, rows: int) -> None:
        self.encoder_calls[purpose] = self.encoder_calls.get(purpose, 0) + int(rows)

    def encode_targets(self, ids, *, purpose: str = "mining") -> np.ndarray:
        """Embeddings of targets ``ids`` under the current encoder; counts ``len(ids)`` target-encoder calls."""
        ids = np.asarray(ids, dtype=np.int64)
        if self._all_cache is not None and self._all_cache[0] == self.version:
            return self._all_cache[1][ids]
        self.count(purpose, ids.size)
        return self.encoder.encode_targets(self.target_features[ids])

    def encode_all_targets(self, *, purpose: str = "mining") -> np.ndarray:
        """All N target embeddings under the current encoder (N calls, counted once per parameter version)."""
        if self._all_cache is None or self._all_cache[0] != self.version:
            self.count(purpose, self.n_targets)
            self._all_cache = (self.version, self.encoder.encode_targets(self.target_features))
        return self._all_cache[1]

    def peek_all_targets(self) -> np.ndarray:
        """All N fresh target embeddings for MEASUREMENT only (probes, ``distribution``): not counted as calls."""
        if self._all_cache is not None and self._all_cache[0] == self.version:
            return self._all_cache[1]
        return self.encoder.encode_targets(self.target_features)

    def advance(self) -> None:
        """Called by the loop after each optimiser update: cached fresh embeddings become stale."""
        self.version += 1
        self._all_cache = None


def log_softmax_rows(S: np.ndarray) -> np.ndarray:
    """Row-wise log-softmax (:func:`refimpl.softmax.log_softmax` along axis 1)."""
    return log_softmax(S, axis=1)


def slot_queries(n_queries: int, k: int, rng: np.random.Generator) -> np.ndarray:
    """Query of each of the k shared slots: round-robin over a random order of the batch's queries."""
    return np.resize(rng.permutation(n_queries), k).astype(np.int64)


def shared_slots(n_queries: int, k: int, rng: np.random.Generator, per_example: bool) -> np.ndarray:
    """Query of each shared slot: k per batch (:func:`slot_queries`) or k per example (query b owns slots
    b k ... b k + k - 1; the paper's setup, every example's draws shared by the whole batch)."""
    if per_example:
        return np.repeat(np.arange(n_queries, dtype=np.int64), k)
    return slot_queries(n_queries, k, rng)


def draw_slots(cdf: np.ndarray, slots: np.ndarray, u: np.ndarray) -> np.ndarray:
    """Inverse-CDF draws: column ``searchsorted(cdf[slots[j]], u[j] * cdf[slots[j], -1])`` for every slot j, one
    vectorised search per query (``cdf`` rows non-decreasing)."""
    cols = np.empty(slots.size, np.int64)
    order = np.argsort(slots, kind="stable")
    ss = slots[order]
    bounds = np.flatnonzero(np.r_[True, ss[1:] != ss[:-1], True])
    for a, b in zip(bounds[:-1], bounds[1:]):
        row = cdf[ss[a]]
        cols[order[a:b]] = np.searchsorted(row, u[order[a:b]] * row[-1], side="right")
    return np.minimum(cols, cdf.shape[1] - 1)


def mixture_log_q_rows(log_p: np.ndarray, slots: np.ndarray, cols: np.ndarray) -> np.ndarray:
    """log q̄(c) with q̄ = (1/k) Σ_j p_{slots[j]}, evaluated at the drawn columns ``cols``."""
    w = np.bincount(slots, minlength=log_p.shape[0]) / slots.size
    rows = np.flatnonzero(w)
    return logsumexp(log_p[rows][:, cols] + np.log(w[rows])[:, None], axis=0)


class Miner:
    """Base class: the interface documented in the module docstring. Subclasses set ``name`` and ``k``."""

    name = "miner"
    k = 0
    in_batch = False  # True: the loop always adds in-batch negatives (InBatch)
    has_log_q = True  # False: no sampling distribution (top-k); log-Q correction is then refused
    warmup = True  # False: the uniform-only warm-up does not apply (non-mining miners, the exact gold standard)

    def setup(self, ctx: MinerContext) -> None:
        pass

    def start(self, ctx: MinerContext) -> None:
        pass

    def mine(self, ctx: MinerContext, batch: Batch) -> Negatives:
        raise NotImplementedError

    def observe(self, ctx: MinerContext, batch: Batch, ids: np.ndarray, emb: np.ndarray) -> None:
        pass

    def distribution(self, ctx: MinerContext, batch: Batch) -> np.ndarray | None:
        return None

    def memory_embeddings(self, ctx: MinerContext) -> float:
        return 0.0

    def config(self) -> dict:
        return {"name": self.name, "k": self.k}

"""The DyNNIBAL negative miner: Alg. 4 of the paper behind the miner interface of :mod:`refimpl.mining`.

Per run, driven by :func:`refimpl.training.train`:

* ``start`` (the first mining step, after the loop's uniform-only warm-up): Alg. 6
  (:meth:`refimpl.nystrom.RegressionReEncoder.initial_encode`: every target encoded once, d' landmarks, Nyström)
  and an SG tree over the d'-dim target representations ``z_t`` (App. B.1; Euclidean, so the certified bounds hold).
  With ``n_trees = T > 1`` (the experiments' forest, ``sampler="paper"`` only) the targets are split uniformly at
  random into T near-equal parts and one tree is built per part.
* every mining step (``mine``): query representations ``z_q`` (:meth:`~refimpl.nystrom.Nystrom.transform_queries`)
  and ONE call of the batched engine (:class:`refimpl.sampling.engine.MiningEngine`) for the whole batch, which
  samples the approximate softmax ``P~(i|x) ∝ exp(beta <z_q, z_t_i>)`` by ``sampler``:
  ``"rejection"`` (exact draws of P~: rejection sampling, Eq. 3-5, on an envelope of tree clusters refined per
  query from a level scored by one GEMM, each cluster's bound certified (Prop. 1 and a norm bound); Alg. 1 as printed is
  :func:`refimpl.sampling.samplers.sample_rejection`), ``"mh"`` (Alg. 2 with the Remark 2 frontier cap + Eq. 7 +
  independent MH chains, Eq. 14: certified gamma and Eq. 6 TV bound per query in ``last_stats``), or ``"paper"`` (the
  experiments' procedure: top-k closest clusters, chains of length 2, top-scoring states, optional temperature and
  forest; no proposition covers it and it has no ``log_q``). The query's own positives are excluded by default.
* every ``w`` mining steps (``reencode_every``): Alg. 5 (s' targets encoded, kernel ridge regression, every
  representation refreshed), then the tree follows the moved representations: by default Alg. 3
  (``update_points`` + ``maintain(U)``) when few moved and a fresh batch build when most did, as after a re-encode
  (``tree_update="auto"``); ``"maintain"`` is Alg. 3 always, as printed; or ``rebuild_level``, or a rebuild. Every ``refresh_every`` mining steps (off by default, the
  faithful Alg. 4; the paper did it once on NQ), an exact refresh: every target re-encoded, Nyström and the
  regression re-initialised (Alg. 6 again) and the tree(s) rebuilt.

Negative counts: ``k`` per batch (``per_example=False``: the k slots are dealt round-robin over a random order of
the batch's queries) or ``k`` per example (``per_example=True``, the experiments: 64 sampled per example). With
``shared=True`` the draws form one set shared by the whole batch, and ``log_q`` of a drawn target n is that of the
slot mixture ``q̄(n) = Σ_b (c_b / Σc) q_b(n)`` (:func:`mixture_log_q`, ``q_b`` = P~(.|x_b) renormalised over the
targets not excluded for b, ``log Z_b`` the engine's estimate clipped to its certified interval); with
``shared=False`` query b keeps its own draws, shape (B, k), and ``log_q = log q_b``. Uniform and in-batch
negatives are added by the loop (``train(n_uniform=..., in_batch=True)``) alike for every miner.

Encoder calls (counted through ``ctx.encode_targets``, purpose ``"mining"``): N at ``start`` and at each exact
refresh, s' per Alg. 5 re-encode (the regression refreshes the landmark embeddings).

Mem % (paper §5: regression model + landmarks + regression training data), in full D-dim embeddings:
``2 d' + s' (1 + d'/D)`` (:meth:`DyNNIBAL.memory_embeddings`); the N x d' representations and the tree are host
memory in the paper's design and are not counted.

Defaults ([unstated] in the paper unless said): d' = 64 and s' = 128 = 2 d' (paper: 64/128 and 8192);
``reencode_every`` w = 25; ``ridge`` 1e-3; ``landmarks`` "uniform" (the paper); ``split`` "symmetric" (same inner
products as the paper's split, distances of the projected embeddings); ``gamma`` 1e6 (Alg. 2's start level by
Prop. 2); ``m`` 16x finer than the start; ``max_clusters`` = 100, the experiments' frontier cap (Remark 2);
``chain_length`` 10 for "mh" (None: Eq. 6 for ``tv`` from the certified gamma) and the experiments' 2 for "paper";
``n_top_clusters`` 10, ``n_chains`` 2 x the draws, ``temperature`` 1, ``n_trees`` 1 for "paper"; ``U``
"measured" = ``2 max_i ||z'_i - z_i||`` (no pairwise distance moved more), or a float, or "prop6" (Prop. 6's
``4 w eta beta L M`` from ``prop6_eta``, ``prop6_L``, ``prop6_M``; its premise, plain SGD, fails for Adam).

Contents: :class:`DyNNIBAL`, :data:`SAMPLERS`, :data:`TREE_UPDATES`, and the exact laws used by the probes and
tests: :func:`mh_law`, :func:`cluster_labels` (the sampling layer's, re-exported), :func:`mixture_log_q`.
"""
from __future__ import annotations

import math
import numbers
import time

import numpy as np

from refimpl._validate import check_int, check_positive
from refimpl.index.sgtree import DEFAULT_BASE, SGTree
from refimpl.mining.base import Miner, Negatives, shared_slots
from refimpl.nystrom import (LANDMARK_METHODS, REBUILD_FRACTION, SPLITS, RegressionReEncoder, default_level,
                             update_tree)
from refimpl.sampling.bounds import prop6_drift
from refimpl.sampling.clustering import certify, cluster_labels
from refimpl.sampling.engine import MiningEngine
from refimpl.softmax import logsumexp

__all__ = ["DyNNIBAL", "SAMPLERS", "TREE_UPDATES", "mh_law", "cluster_labels", "mixture_log_q"]

SAMPLERS = ("rejection", "mh", "paper")
TREE_UPDATES = ("auto", "maintain", "rebuild_level", "rebuild")


# ----------------------------------------------------------------------------------------------------------------
# helpers (public for tests and probes)


def mh_law(log_p, log_q, chain_length, exclude=None) -> np.ndarray:
    """Exact law of the draw returned by one independent-MH chain of :func:`refimpl.sampling.samplers.sample_mh`.

    The chain (the flat kernel of :mod:`refimpl.sampling._kernels`): state 1 ~ Q; each next proposal y ~ Q replaces
    the state x with probability min(1, w(y)/w(x)), w = P/Q (Eq. 14; excluded targets have w = 0, are never
    accepted, and an excluded state is left by any non-excluded proposal); the state after ``chain_length`` states
    is returned, unless it is excluded, in which case the chain continues until it is not. ``log_p`` are (possibly
    unnormalised) target log-probabilities over all N, ``log_q`` the proposal's normalised log-probabilities.

    Computed exactly in O(N log N + s N): sorting by w turns each transition into prefix sums,
    mu'(y) = Q(y) [sum_{x != y, w_x <= w_y} mu(x) + w_y sum_{w_x > w_y} mu(x)/w_x] + mu(y) r(y) + e Q(y), with
    r(y) = 1 - sum_{x != y} Q(x) min(1, w_x/w_y) and e the excluded mass (which leaves with probability Q(not
    excluded) per step and, after the last step, is distributed like Q over the non-excluded targets).
    Returns the law over all N targets (0 on excluded ones).
    """
    log_p = np.asarray(log_p, dtype=np.float64)
    log_q = np.asarray(log_q, dtype=np.float64)
    s = check_int("chain_length", chain_length, low=1)
    n = log_p.size
    ne = np.ones(n, dtype=bool)
    if exclude is not None and len(exclude):
        ne[np.asarray(exclude, dtype=np.int64)] = False
    if not ne.any():
        raise ValueError("exclude: excludes every target")
    q = np.exp(log_q)
    qn = q[ne]
    lw = log_p[ne] - log_q[ne]
    w = np.exp(lw - lw.max())  # w up to a constant: only ratios matter
    order = np.argsort(w, kind="stable")
    ws = w[order]
    hi = np.searchsorted(ws, w, side="right")
    lo = np.searchsorted(ws, w, side="left")
    cq = np.concatenate([[0.0], np.cumsum(qn[order])])
    cqw = np.concatenate([[0.0], np.cumsum((qn * w)[order])])
    r = 1.0 - ((cq[-1] - cq[lo]) - qn + cqw[lo] / w)  # stay probability (rejections + self-proposals)
    q_excl = float(q[~ne].sum())
    mu = qn.copy()
    e = q_excl
    for _ in range(s - 1):
        cm = np.concatenate([[0.0], np.cumsum(mu[order])])
        cmw = np.concatenate([[0.0], np.cumsum((mu / w)[order])])
        A = (cm[hi] - mu) + w * (cmw[-1] - cmw[hi])
        mu = qn * A + mu * r + e * qn
        e *= q_excl
    mu = mu + e * qn / qn.sum()
    out = np.zeros(n)
    out[ne] = np.maximum(mu, 0.0)
    return out / out.sum()


def mixture_log_q(logits, log_z, weights, drawn, excluded=None) -> np.ndarray:
    """log q̄(n) = log Σ_u weights[u] q_u(n) at the drawn targets ``drawn`` (the slot mixture of shared negatives).

    Parameters
    ----------
    logits : (U, K) beta <z_q_u, z_n> of each query u for each drawn target n.
    log_z : (U,) log Z_u (over all targets; estimates). weights : (U,) slot fractions (sum 1). drawn : (K,) ids.
    excluded : None or (ptr (U+1,), ids, logits): query u's excluded ids ``ids[ptr[u]:ptr[u+1]]`` and their logits.

    q_u(n) = exp(s_un - log Z_u) / (1 - P_u(excluded_u)) for n not excluded for u, 0 otherwise (the softmax
    renormalised over the targets u may draw); each term is clipped at log 1 against estimation error in log Z_u.
    """
    logits = np.asarray(logits, dtype=np.float64)
    log_z = np.asarray(log_z, dtype=np.float64)
    drawn = np.asarray(drawn, dtype=np.int64)
    U = logits.shape[0]
    lp = logits - log_z[:, None]
    if excluded is not None:
        ptr, ids, lg = (np.asarray(a) for a in excluded)
        if ids.size:
            owner = np.repeat(np.arange(U), np.diff(ptr))
            mass = np.bincount(owner, weights=np.exp(lg - log_z[owner]), minlength=U)
            lp -= np.log(np.maximum(1.0 - mass, 1e-300))[:, None]
            span = int(max(drawn.max(initial=0), ids.max()) + 1)
            hit = np.isin(np.arange(U)[:, None] * span + drawn[None, :], owner * span + ids)
            lp[hit] = -np.inf
    with np.errstate(divide="ignore"):
        return logsumexp(np.minimum(lp, 0.0) + np.log(np.asarray(weights, dtype=np.float64))[:, None], axis=0)


def _excluded_logits(exclude, Z, ZQ, beta):
    """Per-query excluded ids as CSR with their logits: (ptr (B+1,), ids, beta <z_q_b, z_id>)."""
    ex = [np.unique(np.asarray(e, dtype=np.int64)) for e in exclude]
    ptr = np.zeros(len(ex) + 1, np.int64)
    np.cumsum([e.size for e in ex], out=ptr[1:])
    ids = np.concatenate(ex) if ex else np.zeros(0, np.int64)
    owner = np.repeat(np.arange(len(ex)), np.diff(ptr))
    return ptr, ids, beta * np.einsum("ij,ij->i", Z[ids], ZQ[owner])


# ----------------------------------------------------------------------------------------------------------------
# the miner


class DyNNIBAL(Miner):
    """DyNNIBAL (Alg. 4): Nyström + regression re-encoding, a dynamically maintained SG tree, and negatives drawn
    for the whole batch by one call of the batched engine (module docstring: procedure, accounting, defaults).

    Parameters
    ----------
    k : sampled negatives per batch (``per_example=False``) or per example (``per_example=True``).
    n_landmarks : d', Nyström landmarks (Alg. 6). n_samples : s', targets re-encoded per Alg. 5 (s' <= N).
    reencode_every : w, mining steps between Alg. 5 re-encodes (each followed by the tree update).
    refresh_every : R, mining steps between exact refreshes (every target re-encoded, Alg. 6 again, tree(s)
        rebuilt); None: never (Alg. 4 as printed).
    sampler : "rejection" (exact draws of P~: Eq. 3-5 rejection on a per-query refined envelope with Prop. 1's
        bounds, the sampler of :func:`refimpl.sampling.samplers.sample_adaptive`; Alg. 1 as printed is
        :func:`refimpl.sampling.samplers.sample_rejection`), "mh" (Alg. 2 + Eq. 14, certified gamma and Eq. 6
        bound) or "paper" (the experiments' procedure; no proposition covers it; no log_q).
    gamma, m, max_clusters, start : Alg. 2: target max P/Q (Prop. 2's level), deepest level (None: 16x finer than
        Prop. 2's level), frontier cap (Remark 2; None: uncapped), first frontier ("root" or "prop2": C_(l) at
        Prop. 2's level, as printed; see :class:`refimpl.sampling.engine.MiningEngine`).
    chain_length : states per MH chain; "auto": 10 for "mh", 2 for "paper"; None ("mh"): Eq. 6's length for ``tv``.
    tv : Eq. 6's TV target when ``chain_length`` is None.
    n_top_clusters, n_chains, temperature, n_trees : "paper" only: the closest clusters kept, chains per query
        (None: 2 x draws), the chains' temperature (< 1: harder negatives), trees of the forest (merged by max
        unnormalised probability).
    n_uniform : uniform negatives appended by the miner itself (log_q = -log N); prefer ``train(n_uniform=...)``.
    exclude_positives : each query's draws exclude its own positives (P~ renormalised over the rest).
    ridge, landmarks, split : :class:`refimpl.nystrom.RegressionReEncoder` knobs (``landmarks`` = its ``method``).
    tree_update : "auto" (:func:`refimpl.nystrom.update_tree`: Alg. 3 when few representations moved, a fresh
        batch build when most did, as after every re-encode; both leave an exactly valid tree), "maintain" (Alg. 4
        as printed: update_points + Alg. 3 ``maintain(U)`` whatever moved), "rebuild_level" (update_points +
        ``rebuild_level(update_level)`` + ``maintain(0)``) or "rebuild" (a new tree).
    U : "measured" (2 max_i ||z'_i - z_i||), "prop6" (with ``prop6_eta``, ``prop6_L``, ``prop6_M``) or a float >= 0.
    update_level : level for "rebuild_level" (None: ``nystrom.default_level``).
    base : SG-tree base (None: :data:`refimpl.index.sgtree.DEFAULT_BASE`).
    shared : one set of negatives for the whole batch (slot-mixture log_q) or per query (B, k).
    per_example : k draws per example (True) or k per batch (False).
    paper_probe_runs : "paper" only: runs of the procedure behind the TV probe's estimate (:meth:`distribution`).

    State for inspection: ``reencoder``, ``tree`` (``trees`` for a forest), ``started_at``, ``reencoded_at``,
    ``refreshed_at``, ``tree_updates``, ``last_stats`` (the last mining step: per-query certified log gamma, TV
    bound, clusters, inner products), ``inner_products`` (total over the run, in representation space).
    """

    name = "dynnibal"

    def __init__(self, k: int = 64, *, n_landmarks: int = 64, n_samples: int = 128, reencode_every: int = 25,
                 refresh_every: int | None = None, sampler: str = "mh", gamma: float = 1e6, m: int | None = None,
                 max_clusters: int | None = 100, chain_length="auto", tv: float = 0.01,
                 n_top_clusters: int | None = 10, n_chains: int | None = None, temperature: float = 1.0,
                 n_trees: int = 1, n_uniform: int = 0, exclude_positives: bool = True, ridge: float = 1e-3,
                 landmarks: str = "uniform", split: str = "symmetric", tree_update: str = "auto", U="measured",
                 update_level: int | None = None, prop6_eta: float | None = None, prop6_L: float | None = None,
                 prop6_M: float | None = None, base: float | None = None, shared: bool = True,
                 per_example: bool = False, paper_probe_runs: int = 32, start: str = "root"):
        self.k = check_int("k", k, low=1)
        self.n_landmarks = check_int("n_landmarks", n_landmarks, low=1)
        self.n_samples = check_int("n_samples", n_samples, low=1)
        self.reencode_every = check_int("reencode_every", reencode_every, low=1)
        self.refresh_every = None if refresh_every is None else check_int("refresh_every", refresh_every, low=1)
        if sampler not in SAMPLERS:
            raise ValueError(f"sampler: expected one of {SAMPLERS}, got {sampler!r}")
        self.sampler = sampler
        if isinstance(chain_length, str):
            if chain_length != "auto":
                raise ValueError(f"chain_length: expected 'auto', None or an int >= 1, got {chain_length!r}")
            chain_length = 2 if sampler == "paper" else 10
        elif chain_length is not None:
            chain_length = check_int("chain_length", chain_length, low=1)
        if chain_length is None and sampler == "paper":
            raise ValueError("chain_length: None (Eq. 6) applies to sampler='mh' only")
        self.chain_length = chain_length
        self.tv = check_positive("tv", tv)
        if self.tv >= 1.0:
            raise ValueError(f"tv: must be in (0, 1), got {tv}")
        self.n_trees = check_int("n_trees", n_trees, low=1)
        if self.n_trees > 1 and sampler != "paper":
            raise ValueError("n_trees: a forest is part of sampler='paper' only")
        self.engine = MiningEngine(sampler, gamma=gamma, m=m, max_frontier=max_clusters,
                                   n_top_clusters=n_top_clusters, chain_length=chain_length, n_chains=n_chains,
                                   temperature=temperature, tv=self.tv, start=start)
        self.gamma, self.m, self.max_clusters = self.engine.gamma, self.engine.m, max_clusters
        self.n_top_clusters, self.n_chains, self.temperature = n_top_clusters, n_chains, self.engine.temperature
        self.n_uniform = check_int("n_uniform", n_uniform, low=0)
        self.exclude_positives = bool(exclude_positives)
        self.ridge = check_positive("ridge", ridge, allow_zero=True)
        if landmarks not in LANDMARK_METHODS:
            raise ValueError(f"landmarks: expected one of {LANDMARK_METHODS}, got {landmarks!r}")
        self.landmarks = landmarks
        if split not in SPLITS:
            raise ValueError(f"split: expected one of {SPLITS}, got {split!r}")
        self.split = split
        if tree_update not in TREE_UPDATES:
            raise ValueError(f"tree_update: expected one of {TREE_UPDATES}, got {tree_update!r}")
        self.tree_update = tree_update
        if isinstance(U, str):
            if U not in ("measured", "prop6"):
                raise ValueError(f"U: expected 'measured', 'prop6' or a number >= 0, got {U!r}")
        elif isinstance(U, numbers.Real) and not isinstance(U, bool):
            U = check_positive("U", U, allow_zero=True)
        else:
            raise TypeError(f"U: expected 'measured', 'prop6' or a number >= 0, got {type(U).__name__}")
        self.U = U
        self.prop6 = None
        if U == "prop6":
            if prop6_eta is None or prop6_L is None or prop6_M is None:
                raise ValueError("prop6_eta, prop6_L, prop6_M: all three are required with U='prop6'")
            self.prop6 = (check_positive("prop6_eta", prop6_eta), check_positive("prop6_L", prop6_L),
                          check_positive("prop6_M", prop6_M))
        self.update_level = None if update_level is None else check_int("update_level", update_level)
        if base is not None:
            base = check_positive("base", base)
            if base <= 1.0:
                raise ValueError(f"base: must be > 1, got {base}")
        self.base = base
        self.shared = bool(shared)
        self.per_example = bool(per_example)
        self.paper_probe_runs = check_int("paper_probe_runs", paper_probe_runs, low=1)
        self.paper_probe_seed = 0x5EED
        self.has_log_q = sampler != "paper"
        self.reencoder = None
        self.trees: list = []
        self.parts: list = []  # global target ids of each tree of the forest (None: the identity, one tree)
        self.started_at = None
        self._last = None
        self._last_refresh = None
        self.reencoded_at: list[int] = []
        self.refreshed_at: list[int] = []
        self.tree_updates: list[dict] = []
        self.last_stats: dict = {}
        self.inner_products = 0

    @property
    def tree(self):
        """The SG tree (the first tree of a forest); None before ``start``."""
        return self.trees[0] if self.trees else None

    # ------------------------------------------------------------------ Alg. 6 + tree build
    def _build_trees(self, Z, rng):
        base = DEFAULT_BASE if self.base is None else self.base
        if self.n_trees == 1:
            self.parts = [None]
            self.trees = [SGTree.build(Z, base=base, rng=rng)]
            return
        perm = rng.permutation(Z.shape[0])
        self.parts = [np.sort(p).astype(np.int64) for p in np.array_split(perm, self.n_trees)]
        self.trees = [SGTree.build(Z[p], base=base, rng=rng) for p in self.parts]

    def _encode_fn(self, ctx):
        return lambda ids: ctx.encode_targets(ids, purpose="mining")

    def start(self, ctx) -> None:
        """Alg. 6 (N encoder calls, landmarks, Nyström) and the SG tree(s) over the representations."""
        n = ctx.n_targets
        if self.n_landmarks > n:
            raise ValueError(f"n_landmarks: {self.n_landmarks} landmarks requested but there are only {n} targets")
        if self.n_samples > n:
            raise ValueError(f"n_samples: s' = {self.n_samples} exceeds the number of targets {n}")
        if self.n_trees > n:
            raise ValueError(f"n_trees: {self.n_trees} trees for {n} targets")
        self.reencoder = RegressionReEncoder(self.n_landmarks, self.n_samples, ridge=self.ridge,
                                             method=self.landmarks, split=self.split, rng=ctx.rng)
        Z = self.reencoder.initial_encode(self._encode_fn(ctx), np.arange(n, dtype=np.int64))
        self._build_trees(Z, ctx.rng)
        self.started_at = self._last = self._last_refresh = int(ctx.step)

    # ------------------------------------------------------------------ Alg. 5 + Alg. 3, exact refresh
    def drift_bound(self, max_move: float, beta: float) -> float:
        """The U passed to Alg. 3 after a re-encode whose largest representation move was ``max_move``."""
        if self.U == "measured":
            return 2.0 * float(max_move)
        if self.U == "prop6":
            eta, L, M = self.prop6
            return float(prop6_drift(self.reencode_every, eta, beta, L, M))
        return float(self.U)

    def _follow(self, tree, old, new, rng, max_move, beta, rec):
        """The tree follows moved points: :func:`refimpl.nystrom.update_tree` ("auto": Alg. 3 or a rebuild by the
        share of moved points; "maintain": Alg. 3 always), or update_points + rebuild_level + maintain(0)."""
        if self.tree_update in ("auto", "maintain"):
            frac = REBUILD_FRACTION if self.tree_update == "auto" else 2.0  # a share > 1: Alg. 3 whatever moved
            st = update_tree(tree, old, new, U=self.drift_bound(max_move, beta), rng=rng, rebuild_fraction=frac)
            st = {key: v for key, v in st.items() if key not in ("max_move", "n_moved")}
        else:
            tree.update_points(np.arange(new.shape[0], dtype=np.int64), new, repair=False)
            level = default_level(tree) if self.update_level is None else self.update_level
            moved = tree.rebuild_level(level, rng=rng)
            st = tree.maintain(0.0, rng=rng)
            st = dict(st, points_reinserted=int(moved + st["points_reinserted"]), level=int(level), U=0.0)
        for key, v in st.items():
            numeric = isinstance(v, (int, float)) and key not in ("level", "U")
            rec[key] = rec.get(key, 0) + v if numeric else v

    def reencode(self, ctx) -> dict:
        """ApproximateReEncode (Alg. 5: s' encoder calls) then the tree update; returns the update record."""
        old = self.reencoder.representations
        t0 = time.process_time()
        new = self.reencoder.reencode(self._encode_fn(ctx))
        t1 = time.process_time()
        d = new - old
        max_move = float(np.sqrt(np.max(np.einsum("ij,ij->i", d, d))))
        rec = {"step": int(ctx.step), "mode": self.tree_update, "max_move": max_move, "reencode_seconds": t1 - t0}
        if self.tree_update == "rebuild":
            self._build_trees(new, ctx.rng)
            rec.update(U=None, points_reinserted=int(new.shape[0]))
        else:
            for tree, part in zip(self.trees, self.parts):
                self._follow(tree, old if part is None else old[part], new if part is None else new[part], ctx.rng,
                             max_move, ctx.beta, rec)
        rec["tree_seconds"] = time.process_time() - t1
        self.reencoded_at.append(int(ctx.step))
        self.tree_updates.append(rec)
        self._last = int(ctx.step)
        return rec

    def refresh(self, ctx) -> None:
        """The exact refresh: every target re-encoded (N calls), Nyström and the regression re-initialised (Alg. 6
        with new landmarks), the tree(s) rebuilt."""
        rng = self.reencoder.rng
        self.reencoder = RegressionReEncoder(self.n_landmarks, self.n_samples, ridge=self.ridge,
                                             method=self.landmarks, split=self.split, rng=rng)
        Z = self.reencoder.initial_encode(self._encode_fn(ctx), np.arange(ctx.n_targets, dtype=np.int64))
        self._build_trees(Z, ctx.rng)
        self.refreshed_at.append(int(ctx.step))
        self._last = self._last_refresh = int(ctx.step)

    def _periodic(self, ctx) -> str | None:
        """Run the work due at this mining step: "refresh", "reencode" or None."""
        if self.refresh_every is not None and ctx.step - self._last_refresh >= self.refresh_every:
            self.refresh(ctx)
            return "refresh"
        if ctx.step - self._last >= self.reencode_every:
            self.reencode(ctx)
            return "reencode"
        return None

    # ------------------------------------------------------------------ sampling
    def _exclusions(self, batch):
        return list(batch.positives) if self.exclude_positives else None

    def _counts(self, B, rng):
        """Draws per query and, for shared negatives, the query of each slot (None: per-query output)."""
        if not self.shared:
            return np.full(B, self.k, dtype=np.int64), None
        slots = shared_slots(B, self.k, rng, self.per_example)
        return np.bincount(slots, minlength=B).astype(np.int64), slots

    def _run(self, beta, rng, ZQ, counts, exclude):
        """One engine call per tree; a forest's candidates are merged per query by the largest logit."""
        if len(self.trees) == 1:
            return self.engine.run(self.tree, ZQ, counts, beta=beta, rng=rng, exclude=exclude)
        ptr = np.zeros(ZQ.shape[0] + 1, np.int64)
        np.cumsum(counts, out=ptr[1:])
        owner = np.repeat(np.arange(ZQ.shape[0]), counts)
        ids, lg, own, res = [], [], [], []
        for tree, part in zip(self.trees, self.parts):
            ex = None
            if exclude is not None:  # global excluded ids -> this tree's local ids
                ex = [np.searchsorted(part, e)[np.isin(e, part)] for e in exclude]
            r = self.engine.run(tree, ZQ, counts, beta=beta, rng=rng, exclude=ex)
            ids.append(part[r.ids])
            lg.append(r.logits)
            own.append(owner)
            res.append(r)
        ids, lg, own = np.concatenate(ids), np.concatenate(lg), np.concatenate(own)
        order = np.lexsort((-lg, own))  # grouped by query, best logit first
        os_ = own[order]
        rank = np.arange(order.size) - np.searchsorted(os_, np.arange(ZQ.shape[0]))[os_]
        keep = order[rank < counts[os_]]
        r = res[0]
        r.ids, r.logits, r.ptr = ids[keep], lg[keep], ptr
        r.n_clusters = sum(x.n_clusters for x in res)
        r.inner_products = sum(x.inner_products for x in res)
        r.distance_evals = sum(x.distance_evals for x in res)
        r.attempts = sum(x.attempts for x in res)
        r.exact_draws = sum(x.exact_draws for x in res)
        return r

    def mine(self, ctx, batch) -> Negatives:
        self._periodic(ctx)
        Z = self.reencoder.representations
        ZQ = self.reencoder.query_representations(batch.Q)
        B = ZQ.shape[0]
        counts, slots = self._counts(B, ctx.rng)
        exclude = self._exclusions(batch)
        r = self._run(ctx.beta, ctx.rng, ZQ, counts, exclude)
        ip = int(r.inner_products.sum())
        self.inner_products += ip
        self.last_stats = {"step": int(ctx.step), "inner_products": ip, "distance_evals": int(r.distance_evals.sum()),
                           "queries": int(np.count_nonzero(counts)),
                           "mean_clusters": float(np.mean(r.n_clusters[counts > 0])),
                           "log_gamma": r.log_gamma[counts > 0], "tv_bound": r.tv_bound[counts > 0],
                           "chain_length": r.chain_length[counts > 0]}
        n = ctx.n_targets
        beta = ctx.beta
        excl = None if exclude is None else _excluded_logits(exclude, Z, ZQ, beta)
        if not self.shared:
            ids = r.matrix()
            log_q = None
            if self.has_log_q:
                lq = r.logits.reshape(B, -1) - r.log_z[:, None]
                if excl is not None:
                    owner = np.repeat(np.arange(B), np.diff(excl[0]))
                    mass = np.bincount(owner, weights=np.exp(excl[2] - r.log_z[owner]), minlength=B)
                    lq -= np.log(np.maximum(1.0 - mass, 1e-300))[:, None]
                log_q = np.minimum(lq, 0.0)
            if self.n_uniform:
                u = ctx.rng.integers(0, n, size=(B, self.n_uniform)).astype(np.int64)
                ids = np.concatenate([ids, u], axis=1)
                if log_q is not None:
                    log_q = np.concatenate([log_q, np.full(u.shape, -math.log(n))], axis=1)
            return Negatives(ids, log_q)
        if slots is None:
            ids = r.ids
        else:  # slot j takes the next draw of its query b_j (the engine returns draws grouped by query)
            ids = np.empty(slots.size, np.int64)
            ids[np.argsort(slots, kind="stable")] = r.ids
        log_q = None
        if self.has_log_q:
            us = np.flatnonzero(counts)
            if excl is not None:
                sub = [np.arange(excl[0][u], excl[0][u + 1]) for u in us]
                eptr = np.zeros(us.size + 1, np.int64)
                np.cumsum([x.size for x in sub], out=eptr[1:])
                sel = np.concatenate(sub)
                excl = (eptr, excl[1][sel], excl[2][sel])
            log_q = mixture_log_q(beta * (ZQ[us] @ Z[ids].T), r.log_z[us], counts[us] / counts.sum(), ids, excl)
        if self.n_uniform:
            u = ctx.rng.integers(0, n, size=self.n_uniform).astype(np.int64)
            ids = np.concatenate([ids, u])
            if log_q is not None:
                log_q = np.concatenate([log_q, np.full(self.n_uniform, -math.log(n))])
        return Negatives(ids, log_q)

    # ------------------------------------------------------------------ probes and accounting
    def distribution(self, ctx, batch):
        """Per query of the batch, the law of one of its draws at the current state (no randomness taken from the
        run, no state change): ``"mh"``: the EXACT law after ``chain_length`` MH states with this query's Alg. 2
        partition (:func:`mh_law`); ``"rejection"``: P~ itself renormalised over the non-excluded targets (its draws are
        exact); ``"paper"``: no closed form exists, so an ESTIMATE: the frequency of each target among the
        selections of ``paper_probe_runs`` independent runs of the procedure (own fixed seeds), normalised; its
        TV to the exact softmax is biased upwards by the sampling noise (about sqrt(support / draws)).
        Costs N inner products per query (probes only)."""
        if self.tree is None:
            return None
        beta = ctx.beta
        Z = self.reencoder.representations
        ZQ = self.reencoder.query_representations(batch.Q)
        B = ZQ.shape[0]
        exclude = self._exclusions(batch)
        out = np.zeros((B, ctx.n_targets))
        if self.sampler == "paper":
            rng = np.random.default_rng(self.paper_probe_seed)
            for _ in range(self.paper_probe_runs):
                r = self._run(beta, rng, ZQ, np.full(B, self.k, np.int64), exclude)
                np.add.at(out, (np.repeat(np.arange(B), self.k), r.ids), 1.0)
            return out / out.sum(axis=1, keepdims=True)
        LP = beta * (ZQ @ Z.T)
        for b in range(B):
            excl = np.zeros(0, np.int64) if exclude is None else np.unique(np.asarray(exclude[b], np.int64))
            lp = LP[b]
            if self.sampler == "rejection":
                lp = lp.copy()
                lp[excl] = -np.inf
                out[b] = np.exp(lp - logsumexp(lp))
                continue
            cl = self.engine.partition(self.tree, ZQ[b], beta=beta)
            s = self.chain_length
            if s is None:
                s = certify(self.tree, ZQ[b], cl, beta=beta).chain_length(self.tv)
            sr = beta * (Z[cl.reps] @ ZQ[b])
            lq = sr[cluster_labels(self.tree, cl)[: ctx.n_targets]] - logsumexp(sr + np.log(cl.sizes))
            out[b] = mh_law(lp, lq, s, excl)
        return out

    def memory_embeddings(self, ctx) -> float:
        """Accelerator memory in full embeddings: 2 d' + s' (1 + d'/D) (module docstring)."""
        D = int(ctx.encoder.dim)
        d, s = self.n_landmarks, self.n_samples
        return float(2 * d + s * (1.0 + d / D))

    def config(self) -> dict:
        return {"name": self.name, "k": self.k, "n_landmarks": self.n_landmarks, "n_samples": self.n_samples,
                "reencode_every": self.reencode_every, "refresh_every": self.refresh_every,
                "sampler": self.sampler, "gamma": self.gamma, "m": self.m, "max_clusters": self.max_clusters,
                "chain_length": self.chain_length, "tv": self.tv, "n_top_clusters": self.n_top_clusters,
                "n_chains": self.n_chains, "temperature": self.temperature, "n_trees": self.n_trees,
                "n_uniform": self.n_uniform, "exclude_positives": self.exclude_positives, "ridge": self.ridge,
                "landmarks": self.landmarks, "split": self.split, "tree_update": self.tree_update, "U": self.U,
                "update_level": self.update_level, "prop6": self.prop6, "base": self.base, "shared": self.shared,
                "per_example": self.per_example, "start": self.engine.start}

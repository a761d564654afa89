"""The DyNNIBAL negative miner: Alg. 4 of the paper (PAPER.md §6) behind the miner interface of :mod:`refimpl.mining`.

Per run, driven by :func:`refimpl.training.train`:

* ``start`` (the first mining step, i.e. after the loop's uniform-only warm-up, ``train(uniform_warmup=...)``):
  Alg. 6 (:meth:`refimpl.nystrom.RegressionReEncoder.initial_encode`: every target encoded once, d' landmarks
  chosen among the targets, Nyström fitted) and an SG tree (:class:`refimpl.index.sgtree.SGTree`) built over the d'-dim
  Nyström target representations ``z_t`` (App. B.1; the tree stays Euclidean so the certified bounds hold).
* every mining step (``mine``): each query's representation ``z_q`` comes from its fresh embedding and the current
  (regression-refreshed) landmark embeddings L through :meth:`~refimpl.nystrom.Nystrom.transform_queries`: its row
  of KS, ``L q``, with ``split="paper"``; ``W^{+1/2} L q`` with the default ``split="symmetric"`` (same inner
  products ``<z_q, z_t>``, see "Defaults" below); the approximate softmax is
  ``P~(i|x) ∝ exp(beta <z_q, z_t_i>)`` (Eq. 1 on the representations). Per query: FindClustering (Alg. 2,
  :func:`refimpl.sampling.clustering.find_clustering`) -> the cluster proposal Q of Eq. 7 -> negatives by independent
  Metropolis-Hastings (Eq. 14, :func:`refimpl.sampling.samplers.sample_mh`, ``sampler="mh"``, default), or exact draws of
  P~ by Alg. 1 (``sampler="rejection"``), or the experiments' cluster top-k heuristic (``sampler="topk"``, not a
  softmax sampler). The query's own positives are excluded by default (``exclude_positives``).
* every ``w`` mining steps (``reencode_every``): ApproximateReEncode (Alg. 5: s' uniformly drawn targets encoded by
  the live encoder, kernel ridge regression through the landmarks, landmark embeddings and every representation
  refreshed), then the tree follows the moved representations: ``update_points`` (no repair) + Alg. 3
  ``maintain(U)`` (``tree_update="maintain"``, default), or ``rebuild_level`` (+ ``maintain(0)``), or a full rebuild.

Shared negatives (the paper's setup): the ``k`` slots are filled round-robin over a random order of the batch's
queries exactly like the baselines (:func:`refimpl.mining.base.slot_queries`); query ``b`` draws as many negatives as it
has slots. ``log_q`` of a drawn target ``n`` is that of the slot mixture ``q̄(n) = (1/k) Σ_j q_{b_j}(n)`` (balance
heuristic, as in :mod:`refimpl.mining`), where ``q_b`` is P~(.|x_b) renormalised over the targets not excluded for
``b`` and ``log Z_b`` is the sampler's own estimate (``stats["log_z"]``, clipped to its certified interval). For MH
this is the law the chains converge to (their exact law after ``chain_length`` states is what
:meth:`DyNNIBAL.distribution` computes, but evaluating it needs all N logits, which mining must not pay). For the
top-k heuristic no proposal exists: ``log_q`` is None and log-Q correction is refused. With ``shared=False`` each
query draws ``k`` negatives of its own (``ids``/``log_q`` of shape (B, k)).

Uniform negatives alongside (the experiments: 64 uniform + 64 mined): use ``train(n_uniform=64)``, which adds them
for every miner alike (log_q = -log N); the miner's own ``n_uniform`` knob (default 0) appends the same thing to
the miner's answer, for callers that do not set the loop's knob. Do not set both unless you want both.

Encoder calls (counted by the code through ``ctx.encode_targets``, purpose ``"mining"``): N at ``start`` (Alg. 6;
the d' landmarks are targets, so their embeddings come from the same N calls), then s' per re-encode (the landmark
embeddings are refreshed by the regression, Alg. 5, not by the encoder). :class:`RegressionReEncoder` encodes
feature rows; it is handed rows of target ids and an adapter that maps them to ``ctx.encode_targets(ids)``
(:class:`_ContextEncoder`), so no call escapes the counter.

Mem % (paper §5, "DyNNIBAL's accelerator memory = regression model + landmarks + regression training data"), in
units of one full D-dimensional embedding (D = ``encoder.dim``), exactly what :meth:`memory_embeddings` returns:

    landmarks              d' x D floats (the landmark embeddings L = S^T T; the query map is derived from them)
  + regression model       d' x D floats (R^T, from d'-dim coordinates to D-dim embeddings)
  + regression train data  s' x (d' + D) floats (each of the s' targets: its cached d'-dim coordinates and its
                           fresh D-dim embedding)
  = (2 d' D + s' (d' + D)) / D  =  2 d' + s' (1 + d'/D)  embeddings.

Not counted (host memory in the paper's design): the N x d' representations and the SG tree.

Defaults (PAPER.md §5-6; [unstated] ones chosen by measurement on the planted task, ``python -m refimpl.mining.dynnibal``):
``n_landmarks`` d' = 64 (paper: 64 or 128); ``n_samples`` s' = 128 = 2 d' (paper: 8192, or 256 for Zeshel; on the
demo task s' = 256 / 128 / 64 gave R@1 0.399 / 0.408 / 0.412 (seed 0) and 0.433 / 0.438 / 0.438 (seed 1), TV to the
exact softmax while mining 0.119 / 0.121 / 0.132, Mem % 14.9 / 8.5 / 5.3: s' = 2 d' keeps the d'-input regression
well-posed at almost no TV cost); ``reencode_every`` w = 25 [unstated in the paper; on the demo task (N = 6000, 400
steps) w = 10 / 25 / 100 gave test R@1 0.394 / 0.419 / 0.417, differences within noise; w = 25 costs s'/w ~ 10
encoder calls per step]; ``ridge`` = 1e-3 (nystrom.py's measured default); ``landmarks`` = "uniform" (the paper);
``split`` = "symmetric": the target / query representations ``W^{+1/2} L t`` / ``W^{+1/2} L q`` have exactly the
paper split's inner products, but distances between representations equal distances between projected embeddings,
whereas the paper split stretches them by the condition number of W = S^T K S; measured on the planted task (N =
4000, D = 32, gamma = 1e6) Alg. 2 gives ~420 clusters per query on the symmetric tree and ~3900 (every target) on
the paper-split tree. ``gamma`` = 1e6 (start level of Alg. 2 by Prop. 2: b^l <= log(gamma)/(2 beta), level -5 at
beta = 20, b = 1.3); with Prop. 2's nominal gamma = 4 the start level lies below every node of a 4000-target tree
and FindClustering returns every target as its own cluster (= brute force). ``m`` None (``clustering.default_m``:
16x finer than the start); ``max_clusters`` None; ``refine`` False (Alg. 2 as printed; True adds the certified
refinement, which at beta = 20 refines down to singletons in our miniature). ``chain_length`` = 10 states (the
experiments used 2; Eq. 6 with the certified gamma of a coarse clustering asks for astronomically long chains, so
``chain_length=None`` (Eq. 6 for ``tv``) is only practical with ``refine=True``); measured exact-law TV to P~ on the
planted task after 150 uniform steps: ~0.03 at 2 states, < 0.002 at 10. ``U`` = "measured": ``2 max_i ||z'_i -
z_i||`` over the re-encode (by the triangle inequality no pairwise distance moved more; the role of Prop. 6's U, but
measured instead of bounded); a float gives U directly; "prop6" uses Prop. 6's ``4 w eta beta L M``
(:func:`refimpl.sampling.bounds.prop6_drift`) with the constants ``prop6_eta``, ``prop6_L``, ``prop6_M`` supplied by the user
(the premise, plain SGD with gradients bounded by 2 beta M, does not hold for Adam; use it to study the bound, not
to train).
"""
from __future__ import annotations

import math
import numbers
import time

import numpy as np

from refimpl._validate import check_int, check_positive
from refimpl.mining.base import Miner, Negatives, slot_queries

__all__ = ["DyNNIBAL", "SAMPLERS", "TREE_UPDATES", "mh_law", "cluster_labels", "mixture_log_q"]

SAMPLERS = ("mh", "rejection", "topk")
TREE_UPDATES = ("maintain", "rebuild_level", "rebuild")


# ----------------------------------------------------------------------------------------------------------------
# helpers (public for tests and probes)


def cluster_labels(tree, clustering) -> np.ndarray:
    """For every target id ``< tree.n_targets``, the index (into ``clustering.nodes``) of its cluster; -1 for removed
    targets. A TreeClustering of (node, level) pairs is a partition (each node appears at most once); target i (node
    v_i) lies in cluster (u, L) iff u = v_i, or u is an ancestor of v_i whose child on the path to v_i has level < L
    (the data model's cluster(u, L)); the first such pair found walking up is its cluster. Vectorised over targets.
    """
    n = int(tree.n_targets)
    nn = max(int(tree.n_nodes), 1)
    none = np.iinfo(np.int64).min
    clev = np.full(nn, none, dtype=np.int64)
    cidx = np.full(nn, -1, dtype=np.int64)
    clev[clustering.nodes] = clustering.levels
    cidx[clustering.nodes] = np.arange(clustering.nodes.size)
    cur = np.asarray(tree.point_node[:n], dtype=np.int64).copy()
    out = np.full(n, -1, dtype=np.int64)
    todo = cur >= 0
    prev_level = np.full(n, np.iinfo(np.int64).max, dtype=np.int64)  # no child yet: own node always qualifies
    while todo.any():
        idx = np.flatnonzero(todo)
        v = cur[idx]
        L = clev[v]
        ok = (L != none) & (prev_level[idx] < L)
        ok |= (L != none) & (prev_level[idx] == np.iinfo(np.int64).max)
        out[idx[ok]] = cidx[v[ok]]
        todo[idx[ok]] = False
        rest = idx[~ok]
        prev_level[rest] = tree.node_level[cur[rest]]
        cur[rest] = tree.node_parent[cur[rest]]
        if rest.size and (cur[rest] < 0).any():
            raise RuntimeError("cluster_labels: the clustering does not cover every live target")
    return out


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


def mixture_log_q(logits, log_z, weights, drawn, excluded) -> np.ndarray:
    """log q̄(n) = log sum_u weights[u] q_u(n) at the drawn targets ``drawn`` (K ids).

    ``logits`` (U x K): beta <z_q_u, z_n> of each slot query u for each drawn target n; ``log_z`` (U,): their log Z
    (estimates); ``weights`` (U,): the fraction of slots of each query (sum 1); ``excluded``: per u, a pair (ids
    excluded for u, their logits). q_u(n) = exp(s_un - log Z_u) / (1 - P_u(excluded_u)), and 0 for excluded n:
    the softmax renormalised over the targets that u may draw.
    """
    logits = np.asarray(logits, dtype=np.float64)
    drawn = np.asarray(drawn, dtype=np.int64)
    out = np.empty_like(logits)
    for u in range(logits.shape[0]):
        ids_u, lg_u = excluded[u]
        lp = logits[u] - log_z[u]
        if len(ids_u):
            rest = 1.0 - float(np.sum(np.exp(np.asarray(lg_u) - log_z[u])))
            lp = lp - math.log(max(rest, 1e-300))
            lp = np.where(np.isin(drawn, ids_u), -np.inf, lp)
        out[u] = np.minimum(lp, 0.0) + math.log(weights[u])
    m = out.max(axis=0)
    m = np.where(np.isfinite(m), m, 0.0)
    with np.errstate(divide="ignore"):
        return m + np.log(np.exp(out - m).sum(axis=0))


class _ContextEncoder:
    """The target encoder as :class:`refimpl.nystrom.RegressionReEncoder` sees it: its "feature rows" are target
    ids (one float column, exact below 2^53), encoded by ``ctx.encode_targets`` so that every call is counted."""

    def __init__(self, ctx):
        self.ctx = ctx

    @staticmethod
    def _ids(X):
        return np.asarray(X, dtype=np.float64)[:, 0].astype(np.int64)

    def encode_targets(self, X):
        return self.ctx.encode_targets(self._ids(X), purpose="mining")

    def target_flops(self, X):
        from refimpl.nystrom import encoder_flops

        w = encoder_flops(self.ctx.encoder, self.ctx.target_features[self._ids(X)])
        return 0 if w is None else w


def _logsumexp(a) -> float:
    m = float(np.max(a))
    return m + math.log(float(np.sum(np.exp(a - m))))


# ----------------------------------------------------------------------------------------------------------------
# the miner


class DyNNIBAL(Miner):
    """DyNNIBAL (Alg. 4; PAPER.md §6): Nyström + regression re-encoding, a dynamically maintained SG tree, and
    negatives sampled per query from the approximate softmax through FindClustering + MH (see the module docstring
    for the whole procedure, the accounting and how every default was chosen).

    Parameters
    ----------
    k : mined negatives per step (shared across the batch by default).
    n_landmarks : d', Nyström landmarks (Alg. 6). n_samples : s', targets re-encoded per Alg. 5 (s' <= N).
    reencode_every : w, mining steps between re-encodes (Alg. 4: re-encode + tree update every w steps).
    sampler : "mh" (FindClustering + independent MH, Eq. 14), "rejection" (Alg. 1, exact draws of P~) or "topk" (the
        experiments' cluster top-k heuristic; biased, no log_q).
    gamma, m, max_clusters, refine : FindClustering (Alg. 2) knobs: target max P/Q (sets the start level by Prop. 2),
        deepest level (None: ``clustering.default_m``), frontier cap (Remark 2; for "topk" None means 100, the
        experiments' cap), certified refinement on/off.
    chain_length : MH states per chain (each chain yields one draw); None: Eq. 6 for total variation ``tv`` with the
        certified gamma (needs ``refine=True`` to be practical). Also the heuristic's chain length for "topk".
    n_uniform : uniform negatives appended by the miner itself (log_q = -log N); prefer ``train(n_uniform=...)``.
    exclude_positives : each query's draws exclude its own positives (P~ renormalised over the rest).
    ridge, landmarks, split : :class:`refimpl.nystrom.RegressionReEncoder` knobs (``landmarks`` = its ``method``).
    tree_update : "maintain" (update_points + Alg. 3 ``maintain(U)``), "rebuild_level" (update_points +
        ``rebuild_level(update_level)`` + ``maintain(0)``) or "rebuild" (build a new tree from scratch).
    U : "measured" (2 max_i ||z'_i - z_i||), "prop6" (Prop. 6 with ``prop6_eta``, ``prop6_L``, ``prop6_M``) or a
        float >= 0. update_level : level for "rebuild_level" (None: ``nystrom.default_level``, >= sqrt(N) clusters).
    base : SG-tree base (None: :data:`refimpl.index.sgtree.DEFAULT_BASE`). shared : shared negatives (the paper) or per
        query (B, k).

    State for inspection: ``reencoder``, ``tree``, ``started_at``, ``reencoded_at`` (steps of every re-encode),
    ``tree_updates`` (one dict per tree update: step, mode, U, max_move, seconds, statistics), ``last_stats``
    (the last mining step's sampler statistics), ``inner_products`` (total over the run, in representation space).
    """

    name = "dynnibal"

    def __init__(self, k: int = 64, *, n_landmarks: int = 64, n_samples: int = 128, reencode_every: int = 25,
                 sampler: str = "mh", gamma: float = 1e6, m: int | None = None, max_clusters: int | None = None,
                 refine: bool = False, chain_length: int | None = 10, tv: float = 0.01, n_uniform: int = 0,
                 exclude_positives: bool = True, ridge: float = 1e-3, landmarks: str = "uniform",
                 split: str = "symmetric", tree_update: str = "maintain", U="measured", update_level: int | None = None,
                 prop6_eta: float | None = None, prop6_L: float | None = None, prop6_M: float | None = None,
                 base: float | None = None, shared: bool = True):
        from refimpl.nystrom import LANDMARK_METHODS, SPLITS

        self.k = check_int("k", k, low=1)
        self.n_landmarks = check_int("n_landmarks", n_landmarks, low=1)
        self.n_samples = check_int("n_samples", n_samples, low=1)
        self.reencode_every = check_int("reencode_every", reencode_every, low=1)
        if sampler not in SAMPLERS:
            raise ValueError(f"sampler: expected one of {SAMPLERS}, got {sampler!r}")
        self.sampler = sampler
        self.gamma = check_positive("gamma", gamma)
        if self.gamma <= 1.0:
            raise ValueError(f"gamma: must be > 1, got {gamma}")
        self.m = None if m is None else check_int("m", m)
        self.max_clusters = None if max_clusters is None else check_int("max_clusters", max_clusters, low=1)
        self.refine = bool(refine)
        self.chain_length = None if chain_length is None else check_int("chain_length", chain_length, low=1)
        self.tv = check_positive("tv", tv)
        if self.tv >= 1.0:
            raise ValueError(f"tv: must be in (0, 1), got {tv}")
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
        self.has_log_q = sampler != "topk"
        self.reencoder = None
        self.tree = None
        self.started_at = None
        self._last = None
        self.reencoded_at: list[int] = []
        self.tree_updates: list[dict] = []
        self.last_stats: dict = {}
        self.inner_products = 0

    # ------------------------------------------------------------------ Alg. 6 + tree build
    def _build_tree(self, Z, rng):
        from refimpl.index.sgtree import DEFAULT_BASE, SGTree

        return SGTree.build(Z, base=DEFAULT_BASE if self.base is None else self.base, rng=rng)

    def start(self, ctx) -> None:
        """Alg. 6 (initial encoding: N encoder calls, landmarks, Nyström) and the SG tree over the representations."""
        from refimpl.nystrom import RegressionReEncoder

        n = ctx.n_targets
        if self.n_landmarks > n:
            raise ValueError(f"n_landmarks: {self.n_landmarks} landmarks requested but there are only {n} targets")
        if self.n_samples > n:
            raise ValueError(f"n_samples: s' = {self.n_samples} exceeds the number of targets {n}")
        self._enc = _ContextEncoder(ctx)
        self._rows = np.arange(n, dtype=np.float64)[:, None]
        self.reencoder = RegressionReEncoder(self.n_landmarks, self.n_samples, ridge=self.ridge,
                                             method=self.landmarks, split=self.split, rng=ctx.rng)
        Z = self.reencoder.initial_encode(self._enc, self._rows)
        self.tree = self._build_tree(Z, ctx.rng)
        self.started_at = self._last = int(ctx.step)

    # ------------------------------------------------------------------ Alg. 5 + Alg. 3
    def drift_bound(self, max_move: float, beta: float) -> float:
        """The U passed to Alg. 3 after a re-encode whose largest representation move was ``max_move``."""
        if self.U == "measured":
            return 2.0 * float(max_move)
        if self.U == "prop6":
            from refimpl.sampling.bounds import prop6_drift

            eta, L, M = self.prop6
            return float(prop6_drift(self.reencode_every, eta, beta, L, M))
        return float(self.U)

    def reencode(self, ctx) -> dict:
        """ApproximateReEncode (Alg. 5: s' encoder calls) then the tree update; returns the update record."""
        old = self.reencoder.representations
        t0 = time.perf_counter()
        new = self.reencoder.reencode(self._enc)
        t1 = time.perf_counter()
        max_move = float(np.sqrt(np.max(np.einsum("ij,ij->i", new - old, new - old))))
        rec = {"step": int(ctx.step), "mode": self.tree_update, "max_move": max_move, "reencode_seconds": t1 - t0}
        ids = np.arange(new.shape[0], dtype=np.int64)
        if self.tree_update == "rebuild":
            self.tree = self._build_tree(new, ctx.rng)
            rec.update(U=None, points_reinserted=int(new.shape[0]))
        else:
            self.tree.update_points(ids, new, repair=False)
            if self.tree_update == "maintain":
                U = self.drift_bound(max_move, ctx.beta)
                rec.update(U=U, **self.tree.maintain(U, rng=ctx.rng))
            else:
                from refimpl.nystrom import default_level

                level = default_level(self.tree) if self.update_level is None else self.update_level
                moved = self.tree.rebuild_level(level, rng=ctx.rng)
                st = self.tree.maintain(0.0, rng=ctx.rng)
                rec.update(U=0.0, level=int(level), points_reinserted=int(moved + st["points_reinserted"]),
                           clusters_rebuilt=int(st["clusters_rebuilt"]))
        rec["tree_seconds"] = time.perf_counter() - t1
        self.reencoded_at.append(int(ctx.step))
        self.tree_updates.append(rec)
        self._last = int(ctx.step)
        return rec

    # ------------------------------------------------------------------ sampling
    def _clustering(self, zq, beta):
        from refimpl.sampling.clustering import find_clustering

        return find_clustering(self.tree, zq, beta=beta, gamma=self.gamma, m=self.m, max_clusters=self.max_clusters,
                               refine=self.refine, proposal="eq7")

    def _excluded(self, batch, b):
        if not self.exclude_positives:
            return np.zeros(0, dtype=np.int64)
        return np.unique(np.asarray(batch.positives[b], dtype=np.int64))

    def _draw(self, ctx, zq, c, excl):
        """c draws for one query representation zq: (ids, log_q or None, log_z or None, stats)."""
        from refimpl.sampling import samplers

        beta = ctx.beta
        ex = excl if excl.size else None
        if self.sampler == "mh":
            cl = self._clustering(zq, beta)
            r = samplers.sample_mh(self.tree, zq, c, beta=beta, rng=ctx.rng, chain_length=self.chain_length,
                                   tv=self.tv, clustering=cl, exclude=ex)
            return r.ids, r.log_q, float(r.stats["log_z"]), r.stats
        if self.sampler == "rejection":
            r = samplers.sample_rejection(self.tree, zq, c, beta=beta, rng=ctx.rng, exclude=ex)
            return r.ids, r.log_q, float(r.stats["log_z"]), r.stats
        mc = 100 if self.max_clusters is None else self.max_clusters
        r = samplers.sample_cluster_topk_heuristic(self.tree, zq, c + excl.size, beta=beta, rng=ctx.rng,
                                                   gamma=self.gamma, m=self.m, max_clusters=mc,
                                                   chain_length=2 if self.chain_length is None else self.chain_length)
        ids = r.ids[~np.isin(r.ids, excl)][:c] if excl.size else r.ids[:c]
        return ids.astype(np.int64), None, None, r.stats

    def mine(self, ctx, batch) -> Negatives:
        if ctx.step - self._last >= self.reencode_every:
            self.reencode(ctx)
        Z = self.reencoder.representations
        ZQ = self.reencoder.query_representations(batch.Q)
        B = ZQ.shape[0]
        if self.shared:
            slots = slot_queries(B, self.k, ctx.rng)
            counts = np.bincount(slots, minlength=B)
        else:
            slots = None
            counts = np.full(B, self.k, dtype=np.int64)
        draws, ip, ncl = {}, 0, []
        for b in np.flatnonzero(counts):
            excl = self._excluded(batch, b)
            ids, lq, lz, st = self._draw(ctx, ZQ[b], int(counts[b]), excl)
            draws[int(b)] = (ids, lq, lz, excl)
            ip += int(st.get("inner_products", 0))
            ncl.append(int(st.get("n_clusters", 0)))
        self.inner_products += ip
        self.last_stats = {"step": int(ctx.step), "inner_products": ip, "queries": len(draws),
                           "mean_clusters": float(np.mean(ncl)) if ncl else 0.0}
        n = ctx.n_targets
        if not self.shared:
            k_min = min(d[0].size for d in draws.values())
            ids = np.stack([draws[b][0][:k_min] for b in range(B)])
            log_q = None if not self.has_log_q else np.stack([draws[b][1][:k_min] for b in range(B)])
            if self.n_uniform:
                u = ctx.rng.integers(0, n, size=(B, self.n_uniform)).astype(np.int64)
                ids = np.concatenate([ids, u], axis=1)
                if log_q is not None:
                    log_q = np.concatenate([log_q, np.full(u.shape, -math.log(n))], axis=1)
            return Negatives(ids, log_q)
        # shared: slot j takes the next unused draw of its query b_j (a query may return fewer, e.g. "topk")
        nxt = dict.fromkeys(draws, 0)
        out = []
        for b in slots.tolist():
            i = nxt[b]
            if i < draws[b][0].size:
                out.append(int(draws[b][0][i]))
                nxt[b] = i + 1
        ids = np.asarray(out, dtype=np.int64)
        log_q = None
        if self.has_log_q and ids.size:
            us = sorted(draws)
            weights = counts[us] / counts.sum()
            logits = ctx.beta * (ZQ[us] @ Z[ids].T)
            excl = [(draws[u][3], ctx.beta * (Z[draws[u][3]] @ ZQ[u])) for u in us]
            log_q = mixture_log_q(logits, np.array([draws[u][2] for u in us]), weights, ids, excl)
        elif self.has_log_q:
            log_q = np.zeros(0)
        if self.n_uniform:
            u = ctx.rng.integers(0, n, size=self.n_uniform).astype(np.int64)
            ids = np.concatenate([ids, u])
            if log_q is not None:
                log_q = np.concatenate([log_q, np.full(self.n_uniform, -math.log(n))])
        return Negatives(ids, log_q)

    # ------------------------------------------------------------------ probes and accounting
    def distribution(self, ctx, batch):
        """Per query of the batch, the EXACT law of one of its draws at the current state (no randomness, no state
        change): ``"mh"``: the law after ``chain_length`` MH states with this query's Alg. 2 clustering
        (:func:`mh_law`); ``"rejection"``: P~ itself (renormalised over the non-excluded targets), which Alg. 1
        samples exactly; ``"topk"``: None (no closed form). Costs N inner products per query (probes only). With
        ``exclude_positives`` the law is 0 on the query's positives, so a TV probe against the exact softmax P also
        counts P's mass on them; the rest of that TV is Nyström + regression staleness and MH's own error."""
        if self.tree is None or self.sampler == "topk":
            return None
        from refimpl.sampling.clustering import certify

        beta = ctx.beta
        Z = self.reencoder.representations
        ZQ = self.reencoder.query_representations(batch.Q)
        out = np.zeros((ZQ.shape[0], ctx.n_targets))
        for b in range(ZQ.shape[0]):
            excl = self._excluded(batch, b)
            lp = beta * (Z @ ZQ[b])
            if self.sampler == "rejection":
                lp[excl] = -np.inf
                out[b] = np.exp(lp - _logsumexp(lp[np.isfinite(lp)]))
                continue
            cl = self._clustering(ZQ[b], beta)
            s = self.chain_length
            if s is None:
                s = certify(self.tree, ZQ[b], cl, beta=beta).chain_length(self.tv)
            sr = beta * (Z[cl.reps] @ ZQ[b])
            lq = sr[cluster_labels(self.tree, cl)[: ctx.n_targets]] - _logsumexp(sr + np.log(cl.sizes))
            out[b] = mh_law(lp, lq, s, excl)
        return out

    def memory_embeddings(self, ctx) -> float:
        """Accelerator memory in full embeddings: 2 d' + s' (1 + d'/D) (module docstring)."""
        D = int(ctx.encoder.dim)
        d, s = self.n_landmarks, self.n_samples
        return float(2 * d + s * (1.0 + d / D))

    def config(self) -> dict:
        return {"name": self.name, "k": self.k, "n_landmarks": self.n_landmarks, "n_samples": self.n_samples,
                "reencode_every": self.reencode_every, "sampler": self.sampler, "gamma": self.gamma, "m": self.m,
                "max_clusters": self.max_clusters, "refine": self.refine, "chain_length": self.chain_length,
                "tv": self.tv, "n_uniform": self.n_uniform, "exclude_positives": self.exclude_positives,
                "ridge": self.ridge, "landmarks": self.landmarks, "split": self.split,
                "tree_update": self.tree_update, "U": self.U, "update_level": self.update_level,
                "prop6": self.prop6, "base": self.base, "shared": self.shared}

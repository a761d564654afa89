"""The batched mining engine: every query of a batch answered by ONE compiled call (paper §3, Eq. 3-7, 14, Alg. 2).

A :class:`MiningEngine` runs one of three named procedures over an SG tree for a batch of queries ``Q`` (B, D),
drawing ``counts[b]`` targets for query b. The clustering or envelope, the proposal and the draws of every query
happen inside one Numba function (:mod:`refimpl.sampling._engine_kernels`: the sampling layer's batch samplers,
one call per group of queries needing the same number of draws, so no query draws more than it needs); nothing is
re-validated per query, the query-free tree statistics (suffix radii, the pre-order, the C_(l) of Prop. 2) are
cached per ``tree.version``, and the output buffers are reused across calls.
The tree's points may be float32 or float64; logits, log Z bounds, gamma and TV bounds are computed in float64.

Procedures and what each guarantees (P = softmax of ``beta <q, t>`` over the non-excluded targets of the tree):

* ``"rejection"``: exact rejection sampling of P (Eq. 3-5) on an envelope refined per query: the adaptive sampler
  of :func:`refimpl.sampling.samplers.sample_adaptive` (kernel ``adaptive_batch``), run inside the engine's call.
  From C_(l) (the deepest level with at most 2 sqrt(N) or 32 sqrt(N) clusters, chosen per call by
  :func:`refimpl.sampling.samplers.adaptive_envelope_start`; its representatives scored for the batch by ONE
  GEMM; start clusters of negligible mass lumped into one tail entry), the tree cluster of largest envelope mass
  |C| e^{E_C} is split while the attempts this saves over the query's draws exceed the split's inner products;
  E_C >= every member's logit is the least of Prop. 1's bound s_r + beta ||q|| rho(C) (certified radius), a bound
  through the members' norms, and the parent's. An attempt proposes C with probability |C| e^{E_C} / sum |C'| e^{E_C'},
  a member i uniformly, and accepts it with probability e^{s_i - E_C}, so every accepted draw is an EXACT sample of P
  whatever the envelope (the tree's representations define P: for DyNNIBAL that is the approximate softmax P~ of
  Nystrom + regression); excluded ids are rejected, which renormalises P over the rest. When the envelope cannot
  pay for itself (refinement plus expected attempts >= N), the query's draws are made by brute force (still
  exact; ``exact_draws``). Alg. 2 is not run. ``log_z`` is an estimate (Z_hi x the acceptance rate) clipped to the
  envelope's certified [Z_lo, Z_hi] (over all live targets); ``log_gamma`` = log Z_hi / Z_lo bounds the envelope's
  max P/Q and the expected attempts per draw (Z_hi / Z; with exclusions Z_hi / Z over the non-excluded targets).
  Alg. 1 as printed (hierarchical rejection, errata fixed) remains available as
  :func:`refimpl.sampling.samplers.sample_rejection`.
* ``"mh"``: Alg. 2 (deepest level ``m``, 16x finer than Prop. 2's level for ``gamma`` by default; first frontier
  the root, or C_(l) at Prop. 2's level with ``start="prop2"``; the frontier capped to ``max_frontier`` clusters
  with the excess finalised: Remark 2, still a partition), the Eq. 7 proposal, and one
  independent MH chain (Eq. 14) per draw. Per query the CERTIFIED gamma >= max P/Q (``log_gamma``) and Eq. 6's
  bound exp(-(s - 1)/gamma) >= ||P - law of a draw||_TV (``tv_bound``) are reported; with ``chain_length=None``
  s is Eq. 6's length for ``tv`` (1 + gamma log(1/tv), refused beyond ``max_steps``).
* ``"paper"``: the procedure the paper's experiments ran (App. B.1, C.1): Alg. 2 with the frontier capped to 100,
  only the ``n_top_clusters`` clusters whose representatives are closest to the query, ``n_chains`` MH chains of
  length 2 at inverse temperature beta / ``temperature``, then the top-scoring distinct final states of all chains.
  NO PROPOSITION COVERS IT: dropping clusters makes Q = 0 on targets with P > 0 (max P/Q = inf, so Prop. 4 and
  Eq. 6 do not apply), chains of length 2 are not converged, and keeping the top scores is not sampling. It
  reports no log_z, no gamma (inf when clusters were dropped) and no TV bound; measure its TV to the exact softmax
  and its gradient error instead (the training probes do). A forest of trees (the paper's 100 trees merged by
  max unnormalised probability) is :func:`sample_paper` with a list of trees.

Contents: :data:`PROCEDURES`, :data:`STARTS`, :class:`EngineResult`, :class:`MiningEngine`, :func:`sample_paper`,
:func:`prop2_levels`.
"""
from __future__ import annotations

import math
from dataclasses import dataclass

import numpy as np

from refimpl._validate import as_rng, check_int, check_matrix, check_positive
from refimpl.sampling import _cluster_kernels as CK
from refimpl.sampling import _engine_kernels as EK
from refimpl.index import Clustering
from refimpl.index.search import preorder
from refimpl.sampling.clustering import level_clustering, suffix_radii, tree_clustering
from refimpl.sampling.bounds import prop2_levels
from refimpl.sampling.samplers import ATTEMPT_COST, adaptive_envelope_start

__all__ = ["PROCEDURES", "STARTS", "EngineResult", "MiningEngine", "sample_paper", "prop2_levels"]

PROCEDURES = ("rejection", "mh", "paper")
_CODES = {"rejection": EK.REJECTION, "mh": EK.MH, "paper": EK.PAPER}
STARTS = ("root", "prop2")
DEFAULT_MAX_STEPS = 10_000_000
_EMPTY = np.zeros(0, np.int64)
# the adaptive sampler's start, unused by "mh" and "paper"
_NO_START = (_EMPTY, _EMPTY, _EMPTY, _EMPTY, np.zeros(0), np.zeros(0), np.zeros(0), np.zeros(0, np.int32),
             np.int64(0))
_NO_CT = (np.zeros(1, np.int64), *(np.zeros(0, np.int32) for _ in range(6)), np.zeros(0), np.zeros(0), np.zeros(0))
_NO_S0 = np.zeros((0, 0), np.float64)


@dataclass
class EngineResult:
    """The draws of a batch: query b drew ``ids[ptr[b]:ptr[b+1]]`` with logits ``logits[...]`` (beta <q, t>).

    Per query (arrays of shape (B,)): ``log_z`` (estimate, clipped to the certified interval; NaN for "paper"),
    ``log_z_lo`` / ``log_z_hi`` (certified), ``log_gamma`` (certified log max P/Q of the proposal sampled;
    rejection: log Z_hi/Z_lo of its start partition; inf for "paper" when clusters were dropped), ``tv_bound``
    (Eq. 6 for "mh", 0 for "rejection", NaN for "paper"), ``chain_length``, ``n_clusters``, ``inner_products``,
    ``distance_evals`` (Alg. 2's distances to the query).
    """

    procedure: str
    ids: np.ndarray
    logits: np.ndarray
    ptr: np.ndarray
    log_z: np.ndarray
    log_z_lo: np.ndarray
    log_z_hi: np.ndarray
    log_gamma: np.ndarray
    tv_bound: np.ndarray
    chain_length: np.ndarray
    n_clusters: np.ndarray
    inner_products: np.ndarray
    distance_evals: np.ndarray
    attempts: np.ndarray
    exact_draws: np.ndarray

    def of(self, b: int) -> np.ndarray:
        """The ids drawn for query b."""
        return self.ids[self.ptr[b]:self.ptr[b + 1]]

    def matrix(self) -> np.ndarray:
        """The ids as a (B, k) array (every query drew the same number k)."""
        k = np.diff(self.ptr)
        if k.size and np.any(k != k[0]):
            raise ValueError("counts: queries drew different numbers of targets; use of(b)")
        return self.ids.reshape(self.ptr.size - 1, -1)


def _exclusion_csr(exclude, B, n):
    """Per-query excluded ids as CSR (ptr (B+1,), ids): sorted, unique, validated against [0, n)."""
    ptr = np.zeros(B + 1, np.int64)
    if exclude is None:
        return ptr, np.zeros(0, np.int64)
    if len(exclude) != B:
        raise ValueError(f"exclude: expected one id array per query ({B}), got {len(exclude)}")
    parts = []
    for b, e in enumerate(exclude):
        e = np.unique(np.asarray(e, dtype=np.int64).reshape(-1))
        if e.size and (e[0] < 0 or e[-1] >= n):
            raise ValueError(f"exclude[{b}]: ids must lie in [0, {n})")
        parts.append(e)
        ptr[b + 1] = ptr[b] + e.size
    return ptr, (np.concatenate(parts) if parts else np.zeros(0, np.int64))


class MiningEngine:
    """Batched negative sampling over an SG tree by one of :data:`PROCEDURES` (see the module docstring).

    Parameters
    ----------
    procedure : "rejection" (exact: Eq. 3-5 on a refined envelope with Prop. 1's bounds), "mh" (Alg. 2 + Eq. 14,
        certified gamma and Eq. 6 bound) or "paper" (the experiments' procedure, no guarantee).
    gamma : Alg. 2's target max P/Q; its start level is Prop. 2's l = max{l : b^l <= log(gamma)/(2 beta ||q||)}.
    m : Alg. 2's deepest level; None: 16x finer than the start (l - ceil(log_b 16)), per query.
    max_frontier : Remark 2's cap on Alg. 2's frontier (the excess is finalised; the output stays a partition);
        None: no cap. The paper's experiments: 100.
    n_top_clusters : "paper" only: keep the clusters of Alg. 2's output whose representatives are closest to the
        query (the paper's "top-k closest clusters", k unstated); None keeps all.
    chain_length : MH states per chain ("mh": None = Eq. 6's length for ``tv``; "paper": the experiments' 2).
    n_chains : "paper" only: chains per query; None = 2 x the draws requested.
    temperature : "paper" only: the chains target exp(beta s / temperature) (the paper's optional lower
        temperature, value unstated); 1 = none.
    tv : the TV target of Eq. 6 when ``chain_length`` is None. max_steps : attempt / chain budget per draw.
    start : Alg. 2's first frontier: "prop2" = C_(l) at Prop. 2's level l (as printed; it holds every node of
        level >= l, a fixed fraction of N at a fixed gamma), or "root" (default) = the root, so that the frontier
        cap applies from the top and far regions are finalised as coarse clusters. Either way the output is a
        partition and its certified gamma is computed and reported; Prop. 4's premise (every output cluster at
        level <= l) holds only for "prop2" without a cap.
    start_clusters : "rejection" only: the largest size of the adaptive sampler's start level (None: chosen per call;
        :func:`refimpl.sampling.samplers.sample_adaptive`); it sets only the cost.
    """

    def __init__(self, procedure: str = "mh", *, gamma: float = 1e6, m: int | None = None,
                 max_frontier: int | None = 100, n_top_clusters: int | None = 10, chain_length: int | None = None,
                 n_chains: int | None = None, temperature: float = 1.0, tv: float = 0.01,
                 max_steps: int = DEFAULT_MAX_STEPS, start: str = "root", start_clusters: float | None = None):
        if procedure not in PROCEDURES:
            raise ValueError(f"procedure: expected one of {PROCEDURES}, got {procedure!r}")
        self.procedure = procedure
        self.gamma = check_positive("gamma", gamma)
        if self.gamma <= 1.0:
            raise ValueError(f"gamma: must be > 1, got {gamma}")
        self.m = None if m is None else check_int("m", m)
        self.max_frontier = 0 if max_frontier is None else check_int("max_frontier", max_frontier, low=1)
        self.n_top_clusters = 0 if n_top_clusters is None else check_int("n_top_clusters", n_top_clusters, low=1)
        if chain_length is None and procedure == "paper":
            chain_length = 2
        self.chain_length = 0 if chain_length is None else check_int("chain_length", chain_length, low=1)
        self.n_chains = None if n_chains is None else check_int("n_chains", n_chains, low=1)
        self.temperature = check_positive("temperature", temperature)
        self.tv = check_positive("tv", tv)
        if self.tv >= 1.0:
            raise ValueError(f"tv: must be in (0, 1), got {tv}")
        self.max_steps = check_int("max_steps", max_steps, low=1)
        if start not in STARTS:
            raise ValueError(f"start: expected one of {STARTS}, got {start!r}")
        self.start = start
        self.start_clusters = None if start_clusters is None else check_positive("start_clusters", start_clusters)
        self._broken = False  # "rejection" without the radius term in its bounds: a negative control of the tests
        self._ids = np.zeros(0, np.int64)
        self._logits = np.zeros(0, np.float64)
        self._stats = np.zeros((0, EK.N_STATS), np.float64)

    def _levels(self, tree, ta, qn, beta):
        """Alg. 2's first frontier level and deepest level for queries of norms ``qn`` (see ``start`` and ``m``)."""
        base = float(ta.base)
        starts = prop2_levels(self.gamma, beta * qn, base)
        ms = starts - math.ceil(math.log(16.0) / math.log(base)) if self.m is None else np.full(qn.size, self.m)
        if self.start == "root":
            starts = np.full(qn.size, int(ta.node_level[int(tree.root)]) + 1, np.int64)
        return starts.astype(np.int64), np.asarray(ms, dtype=np.int64)

    def _frontiers(self, tree, starts):
        """Alg. 2's first frontiers in CSR form: (sptr, snodes, sidx), query b starts from
        ``snodes[sptr[sidx[b]]:sptr[sidx[b] + 1]]`` (the root, or the nodes of C_(starts[b]) fetched once per
        distinct level from the per-version cache of :func:`refimpl.sampling.clustering.level_clustering`)."""
        if self.start == "root":
            return np.array([0, 1], np.int64), np.array([int(tree.root)], np.int64), np.zeros(starts.size, np.int64)
        uniq, sidx = np.unique(starts, return_inverse=True)
        parts = [np.asarray(level_clustering(tree, int(L)).nodes, np.int64) for L in uniq]
        sptr = np.zeros(uniq.size + 1, np.int64)
        np.cumsum([p.size for p in parts], out=sptr[1:])
        return sptr, np.ascontiguousarray(np.concatenate(parts), np.int64), sidx.astype(np.int64).reshape(-1)

    def partition(self, tree, q, *, beta) -> Clustering:
        """The partition the "mh" procedure proposes from for query ``q`` (D,): Alg. 2 with this engine's start,
        deepest level and frontier cap (for probes and tests: the same clustering as inside :meth:`run`)."""
        beta = check_positive("beta", beta)
        ta = tree.arrays()
        q = check_matrix("q", np.asarray(q)[None, :], n_cols=int(tree.dim))[0]
        starts, ms = self._levels(tree, ta, np.array([np.linalg.norm(q)]), beta)
        sptr, snodes, _ = self._frontiers(tree, starts)
        nodes, levels, _, nd = CK.find_clustering_kernel(ta, q, snodes, int(starts[0]), int(ms[0]), self.max_frontier)
        return tree_clustering(tree, nodes, levels, {"distance_evals": int(nd), "start_level": int(starts[0]),
                                                     "m": int(ms[0])})

    def run(self, tree, Q, counts, *, beta, rng, exclude=None) -> EngineResult:
        """Draw ``counts[b]`` targets for every query ``Q[b]`` (one compiled call; see the module docstring).

        Parameters
        ----------
        tree : an SGTree (its ``arrays()`` view and ``version`` are used).
        Q : (B, D) queries in the tree's space (float64 or float32; cast to float64).
        counts : (B,) non-negative ints, or one int for every query.
        beta : inverse temperature of the softmax (> 0). rng : Generator or int seed (one seed for the batch is drawn
            from it, so the same rng gives the same draws).
        exclude : None or a sequence of B id arrays: targets query b must not draw (P renormalised without them).
        """
        beta = check_positive("beta", beta)
        gen = as_rng(rng)
        if int(tree.root) < 0:
            raise ValueError("tree: is empty")
        Q = check_matrix("Q", Q, n_cols=int(tree.dim))
        B = Q.shape[0]
        counts = np.broadcast_to(np.asarray(counts, dtype=np.int64), (B,)).copy() if np.ndim(counts) == 0 \
            else np.asarray(counts)
        if counts.shape != (B,) or not np.issubdtype(counts.dtype, np.integer) or (counts < 0).any():
            raise ValueError(f"counts: expected {B} non-negative integers")
        counts = counts.astype(np.int64)
        n = int(tree.n_targets)
        eptr, eids = _exclusion_csr(exclude, B, n)
        live = len(tree)
        if (counts > 0).any() and np.any(live - np.diff(eptr)[counts > 0] < 1):
            raise ValueError("exclude: excludes every target of some query")
        ta = tree.arrays()
        suf = suffix_radii(tree)
        qn = np.sqrt(np.einsum("ij,ij->i", Q, Q))
        starts, ms = self._levels(tree, ta, qn, beta)
        ptr = np.zeros(B + 1, np.int64)
        np.cumsum(counts, out=ptr[1:])
        total = int(ptr[-1])
        if self._ids.size < total:
            self._ids = np.empty(max(total, 2 * self._ids.size), np.int64)
            self._logits = np.empty(self._ids.size, np.float64)
        if self._stats.shape[0] < B:
            self._stats = np.empty((max(B, 2 * self._stats.shape[0]), EK.N_STATS), np.float64)
        n_chains = 2 * counts if self.n_chains is None else np.full(B, self.n_chains, np.int64)
        n_chains = np.maximum(n_chains, counts)
        sptr, snodes, sidx = self._frontiers(tree, starts)
        seed = int(gen.integers(0, 2 ** 62))
        order, pos = preorder(tree)
        extra = 0  # GEMM inner products per active query beyond the chosen start level's (a coarse level scored)
        act = counts > 0
        if self.procedure == "rejection":  # the adaptive sampler's start frontier, scored by one GEMM
            Qa = np.ascontiguousarray(Q[act])
            F0, Sa, margin, CT, g = adaptive_envelope_start(tree, Qa, float(np.mean(counts[act])) if act.any() else 0.0,
                                                            beta, self.start_clusters)
            S0 = np.empty((B, Sa.shape[1]), np.float64)
            S0[act] = Sa
            extra = g - Sa.shape[1]
        else:
            F0, S0, margin, CT = _NO_START, _NO_S0, 0.0, _NO_CT
        EK.engine_kernel(ta, suf, order, pos, Q, qn, beta, _CODES[self.procedure], counts, ptr, eptr, eids, seed,
                         sptr, snodes, sidx, starts, ms, self.max_frontier, self.n_top_clusters, self.chain_length,
                         n_chains.astype(np.int64), self.temperature, math.log(self.tv), self.max_steps,
                         ATTEMPT_COST, F0, S0, margin, CT, self._broken, self._ids, self._logits, self._stats)
        st = self._stats[:B]
        st[act, EK.S_INNER] += extra
        status = st[:, EK.S_STATUS]
        if np.any(status == 1):
            b = int(np.flatnonzero(status == 1)[0])
            raise RuntimeError(f"{self.procedure}: query {b} had no accepted draw within max_steps={self.max_steps}")
        if np.any(status == 2):
            b = int(np.flatnonzero(status == 2)[0])
            raise ValueError(f"chain_length: Eq. 6 asks for more than max_steps={self.max_steps} states for query "
                             f"{b} (certified log gamma {st[b, EK.S_LOG_GAMMA]:.3g}); pass chain_length")
        return EngineResult(self.procedure, self._ids[:total].copy(), self._logits[:total].copy(), ptr,
                            st[:, EK.S_LOG_Z].copy(), st[:, EK.S_LOG_Z_LO].copy(), st[:, EK.S_LOG_Z_HI].copy(),
                            st[:, EK.S_LOG_GAMMA].copy(), st[:, EK.S_TV].copy(),
                            st[:, EK.S_CHAIN].astype(np.int64), st[:, EK.S_CLUSTERS].astype(np.int64),
                            st[:, EK.S_INNER].astype(np.int64), st[:, EK.S_DIST].astype(np.int64),
                            st[:, EK.S_ATTEMPTS].astype(np.int64), st[:, EK.S_EXACT].astype(np.int64))


def sample_paper(tree, Q, k, *, beta, rng, gamma=1e6, m=None, max_frontier=100, n_top_clusters=10, chain_length=2,
                 n_chains=None, temperature=1.0, id_maps=None, exclude=None):
    """The experiments' procedure (module docstring, ``"paper"``) for a batch: ``k`` targets per query.

    ``tree`` may be one SGTree or a list of T trees (the paper's forest): each tree gives its ``k`` best
    candidates per query, and the k candidates with the largest unnormalised probability exp(beta <q, t>) over
    all trees are kept (merge by max). ``id_maps`` (one int array per tree) maps each tree's target ids to global
    ids (default: identity). NOT a softmax sampler (no proposition covers it).

    Parameters
    ----------
    Q : (B, D) or (D,) queries. k : targets per query. beta : inverse temperature. rng : Generator or int seed.
    Other knobs: see :class:`MiningEngine`.

    Returns
    -------
    (ids, logits): (B, k) global target ids (or (k,) for one query) and their logits beta <q, t>.
    """
    trees = list(tree) if isinstance(tree, (list, tuple)) else [tree]
    if not trees:
        raise ValueError("tree: an empty forest")
    Q = np.asarray(Q)
    single = Q.ndim == 1
    Q = check_matrix("Q", Q[None, :] if single else Q)
    k = check_int("k", k, low=1)
    gen = as_rng(rng)
    if id_maps is not None and len(id_maps) != len(trees):
        raise ValueError(f"id_maps: expected one map per tree ({len(trees)}), got {len(id_maps)}")
    eng = MiningEngine("paper", gamma=gamma, m=m, max_frontier=max_frontier, n_top_clusters=n_top_clusters,
                       chain_length=chain_length, n_chains=n_chains, temperature=temperature)
    if exclude is not None and len(trees) > 1:
        raise ValueError("exclude: not supported with a forest (each tree has its own target ids)")
    B = Q.shape[0]
    cand_ids, cand_s = [], []
    for t, tr in enumerate(trees):
        r = eng.run(tr, Q, k, beta=beta, rng=gen, exclude=exclude)
        ids = r.matrix()
        cand_ids.append(ids if id_maps is None else np.asarray(id_maps[t], dtype=np.int64)[ids])
        cand_s.append(r.logits.reshape(B, k))
    ids = np.concatenate(cand_ids, axis=1)
    s = np.concatenate(cand_s, axis=1)
    if len(trees) > 1:
        order = np.argsort(-s, axis=1, kind="stable")[:, :k]
        ids = np.take_along_axis(ids, order, axis=1)
        s = np.take_along_axis(s, order, axis=1)
    return (ids[0], s[0]) if single else (ids, s)

"""Sampling negatives from the softmax P(i|x) ∝ exp(beta <q, t_i>) (Eq. 1; paper §3.1-3.3).

Samplers (each returns a :class:`SampleResult` with ``ids`` int64, ``log_q`` and ``stats``; ``q`` of shape (D,)
gives (k,) results, a batch (B, D) gives (B, k) from ONE compiled call):

* :func:`sample_exact`: brute force over all N targets, streamed in blocks (a weighted reservoir per draw; Gumbel
  top-k without replacement). The reference every other sampler is tested against. N inner products per query.
* :func:`sample_flat_rejection`: Eq. 3-5 on a clustering with eps_C = beta ||q|| rho(C). Exact.
* :func:`sample_rejection`: Alg. 1, hierarchical rejection down the SG tree, errata fixed. Exact.
* :func:`sample_astar`: A* sampling over the tree's Gumbel process with the certified bounds (ours). Exact.
* :func:`sample_adaptive`: Eq. 3-5 on an envelope refined best first per query and shared by its k draws (ours).
  Exact.
* :func:`sample_mh`: independent Metropolis-Hastings (Eq. 14) with the proposal of Eq. 7 on Alg. 2's clustering;
  chain length from Eq. 6. Approximate, with the certified TV bound in ``stats``.
  (The experiments' shortcut, top clusters + short chains + top scores, is :func:`refimpl.sampling.engine.sample_paper`:
  NOT a softmax sampler.)

Start level of the rejection samplers (``level``): "auto" (default) picks, per query inside the kernel, the level
minimising the estimated cost of Prop. 3 (|C_l| inner products + k x estimated attempts per draw); "prop2" uses
Prop. 2's rule (:func:`default_level`); an int fixes it. Exactness never depends on the level.

Common options: ``exclude`` (ids; the softmax is renormalised over the other targets; for a batch either one
array for all queries or a list of arrays, one per query; excluding every target is a ValueError),
``replace`` (False: the k draws are distinct, each from the softmax renormalised over the targets not yet drawn).
A rejection sampler whose attempts for one draw reach the number N of live targets (e.g. when nearly all the mass
is excluded) makes that draw by brute force instead (N inner products, once per query): an accepted attempt and
the brute-force draw both follow P exactly, so the draw stays exact and the cost stays within ~2x brute force
(``stats["exact_fallbacks"]``).
``log_q`` is the log-probability of each draw under the distribution sampled (renormalised for the exclusions and,
without replacement, conditional on the previous draws). The tree samplers know Z only within the certified
interval of their start clustering: ``log_z="estimate"`` (default) uses their own unbiased-ratio estimate clipped
to it, ``log_z="exact"`` pays N inner products per query. ``stats["log_z"]`` holds the value used.
"""
from __future__ import annotations

import math
from dataclasses import dataclass, field

import numpy as np

from refimpl._validate import as_rng, check_ids, check_int, check_positive
from refimpl.index import N_NODES, Clustering, TreeArrays
from refimpl.index.search import preorder
from refimpl.sampling import _adaptive as AD
from refimpl.sampling import _astar as A
from refimpl.sampling import _kernels as K
from refimpl.sampling import bounds
from refimpl.softmax import logsumexp
from refimpl.sampling.clustering import (_check_clustering, _tree_cache, level_clustering,
                                         suffix_radii)

__all__ = [
    "SampleResult",
    "SamplerError",
    "sample_exact",
    "sample_flat_rejection",
    "sample_rejection",
    "sample_mh",
    "sample_astar",
    "sample_adaptive",
    "default_level",
]

DEFAULT_MAX_ATTEMPTS = 10_000_000
DEFAULT_C = 1.5
ATTEMPT_COST = 1.0  # one attempt of a rejection sampler, in inner products, in Prop. 3's cost of a start level
# the adaptive sampler starts from the deepest C_(l) with at most c sqrt(N) clusters, c in START_SQRT, chosen per
# batch by adaptive_envelope_start. The best level depends on the data, as measured at commits 48a3556-a6f3834: on
# hierarchical_points (bench sample, k = 10 and 64, N = 1e5-1e7) 2 sqrt(N) was within 7 % of the fastest and
# 32 sqrt(N) 1.5-6.3x slower; in the DyNNIBAL training step on the planted task ("rejection", bench train, N = 1e5)
# 32 sqrt(N) mines in 8.8 ms and 2, 8, 16, 64 sqrt(N) in 60.9, 49.4, 30.6, 9.8 ms (there the coarse envelopes are
# loose and refining them costs more than a finer start).
START_SQRT = (2.0, 32.0)
# the cost of one attempt in start clusters (GEMM and pass, about 8 ns a cluster; an attempt about 150 ns, cold; at
# N = 1e7, commit 6a8e196), and the queries of a batch whose coarse envelope is measured to choose the level
ATTEMPT_CLUSTERS = 18.0
START_PROBE = 4
# brute force's cost per target in attempts of the adaptive sampler, when the queries that switch are served
# together (_brute_rest): at 1b5f534 sample_exact's batched draws cost 3.8-6.4 ns a target at D = 64 and 11-12 ns at
# D = 384 (bench sample), an attempt 60-150 ns and 100-225 ns: 1/10-1/35 and 1/8-1/18. So a query switches to
# brute force when its work reaches N / 8 (a lone switching query, whose blocks are not shared, costs more)
BRUTE_SHARE = 1.0 / 8.0
_EMPTY = np.zeros(0, np.int64)


class SamplerError(RuntimeError):
    """A rejection sampler hit its attempt budget (it never returns an unaccepted proposal instead)."""


@dataclass
class SampleResult:
    """``ids`` (k,) or (B, k) int64; ``log_q`` same shape; ``stats`` dict (per-query arrays for batches)."""

    ids: np.ndarray
    log_q: np.ndarray
    stats: dict = field(default_factory=dict)


# ----------------------------------------------------------------------------------------------------------------
# input handling


def _points(points):
    """A C-contiguous float32/float64 2-D array (no copy when it already is one)."""
    if not isinstance(points, np.ndarray):
        try:
            points = np.asarray(points, dtype=np.float64)
        except (TypeError, ValueError) as exc:
            raise TypeError(f"points: cannot be converted to a float64 array ({exc})") from None
    if points.dtype not in (np.float32, np.float64):
        if points.dtype.kind in "biu" and points.dtype != np.bool_:
            points = points.astype(np.float64)
        else:
            raise TypeError(f"points: expected a real float array, got dtype {points.dtype}")
    if points.ndim != 2:
        raise ValueError(f"points: expected a 2-D array, got shape {points.shape}")
    if points.shape[0] == 0 or points.shape[1] == 0:
        raise ValueError(f"points: is empty (shape {points.shape})")
    return np.ascontiguousarray(points)


def _queries(q, dim):
    """(Q float64 (B, D), batched)."""
    if isinstance(q, np.ndarray) and q.dtype.kind not in "iuf":
        raise TypeError(f"q: expected a real float array, got dtype {q.dtype}")
    try:
        arr = np.asarray(q, dtype=np.float64)
    except (TypeError, ValueError) as exc:
        raise TypeError(f"q: cannot be converted to a float64 array ({exc})") from None
    if arr.ndim not in (1, 2):
        raise ValueError(f"q: expected a 1-D query or a 2-D batch of queries, got shape {arr.shape}")
    batched = arr.ndim == 2
    Q = np.ascontiguousarray(arr if batched else arr[None, :])
    if Q.shape[1] != dim:
        raise ValueError(f"q: expected {dim} columns, got {Q.shape[1]}")
    if Q.shape[0] == 0:
        raise ValueError("q: is empty (0 queries)")
    if not np.all(np.isfinite(Q)):
        raise ValueError("q: contains NaN or Inf")
    return Q, batched


def _exclusions(exclude, n_queries, batched, n):
    """CSR (eptr (B + 1,), eids) of the sorted unique excluded ids of each query."""
    if exclude is None:
        return np.zeros(n_queries + 1, np.int64), _EMPTY
    if batched and isinstance(exclude, (list, tuple)) and len(exclude) > 0 and not np.isscalar(exclude[0]):
        if len(exclude) != n_queries:
            raise ValueError(f"exclude: expected one id array per query ({n_queries}), got {len(exclude)}")
        parts = [np.unique(check_ids("exclude", e, n)) for e in exclude]
    else:
        parts = [np.unique(check_ids("exclude", exclude, n))] * n_queries
    eptr = np.zeros(n_queries + 1, np.int64)
    np.cumsum([p.size for p in parts], out=eptr[1:])
    return eptr, (np.concatenate(parts) if eptr[-1] else _EMPTY)


def _check_k(k, avail, replace):
    """k, after checking that every query has a target to draw (``avail``: non-excluded live targets per query)."""
    k = check_int("k", k, low=0, high=1 << 40)
    lack = int(np.min(avail))
    if k > 0 and lack == 0:
        raise ValueError("exclude: excludes every target, nothing is left to sample")
    if not replace and k > lack:
        raise ValueError(f"k: {k} draws without replacement but only {lack} targets are not excluded")
    return k


def _check_log_z(log_z):
    if log_z not in ("estimate", "exact"):
        raise ValueError(f"log_z: expected 'estimate' or 'exact', got {log_z!r}")
    return log_z


def _log_q(sids, log_z, log_z_excl, replace):
    """log q of the draws (B, k) given log Z over all targets (B,) and the log mass of the excluded ones (B,):
    log P(i) - log(1 - P(excluded) - P(earlier draws, without replacement))."""
    lz = log_z[:, None]
    p = np.exp(sids - lz)
    rest = -np.expm1(np.minimum(log_z_excl - log_z, 0.0))[:, None]
    if not replace:
        rest = rest - (np.cumsum(p, axis=1) - p)
    return sids - lz - np.log(np.maximum(rest, p))


def _result(ids, lq, stats, batched):
    if not batched:
        return SampleResult(ids[0], lq[0], {k: (v[0] if isinstance(v, np.ndarray) else v) for k, v in stats.items()})
    return SampleResult(ids, lq, stats)


def _seed(gen):
    return int(gen.integers(0, 2**62))


def _tree(tree):
    if not (hasattr(tree, "arrays") and hasattr(tree, "version")):
        raise TypeError(f"tree: expected an SGTree, got {type(tree).__name__}")
    if tree.root < 0:
        raise ValueError("tree: is empty")
    return tree


def _available(tree, eptr, eids):
    """Live targets not excluded, per query."""
    cum = np.zeros(eids.size + 1, np.int64)
    np.cumsum(tree.point_node[eids] >= 0, out=cum[1:])
    return len(tree) - (cum[eptr[1:]] - cum[eptr[:-1]])


def _exact_log_z(points, Q, beta, ids=None):
    """log Z over the rows ``ids`` of ``points`` (all rows when None) for each query of Q: (B,)."""
    out = np.empty(Q.shape[0])
    rows = points if ids is None else points[ids]
    step = max(1, (1 << 22) // max(rows.shape[0], 1))
    for b0 in range(0, Q.shape[0], step):
        out[b0:b0 + step] = logsumexp(beta * (Q[b0:b0 + step] @ rows.T.astype(np.float64, copy=False)), axis=1)
    return out


def _tree_args(tree, q, k, beta, rng, log_z, exclude, replace):
    """The checked common arguments of a tree sampler: (beta, gen, log_z, Q, batched, eptr, eids, k)."""
    beta = check_positive("beta", beta)
    gen = as_rng(rng)
    log_z = _check_log_z(log_z)
    _tree(tree)
    Q, batched = _queries(q, tree.dim)
    eptr, eids = _exclusions(exclude, Q.shape[0], batched, int(tree.n_targets))
    k = _check_k(k, _available(tree, eptr, eids), replace)
    return beta, gen, log_z, Q, batched, eptr, eids, k


def _finish(tree, Q, beta, log_z, replace, batched, ids, sids, cnt, lz):
    """The result of a tree sampler's kernel: log Z (the kernel's estimate, or exact), log_q, stats."""
    lzu = lz[:, K.LZ_EST].copy()
    if log_z == "exact":
        lzu = _exact_log_z(tree.points, Q, beta, tree.live_ids())
        cnt[:, K.INNER] += len(tree)
    return _result(ids, _log_q(sids, lzu, lz[:, K.LZ_EXCL], replace), _tree_stats(cnt, lz, lzu), batched)


def _tree_stats(cnt, lz, log_z_used):
    return {"attempts": cnt[:, K.ATTEMPTS], "proposals": cnt[:, K.ATTEMPTS], "accepted": cnt[:, K.ACCEPTED],
            "restarts": cnt[:, K.RESTARTS], "inner_products": cnt[:, K.INNER], "excluded_hits": cnt[:, K.EXCL_HITS],
            "fallbacks": cnt[:, K.FALLBACKS], "level": cnt[:, K.LEVEL], "n_clusters": cnt[:, K.N_CLUSTERS],
            "selection_inner_products": cnt[:, K.SELECT], "exact_fallbacks": cnt[:, K.EXACT],
            "lumped_clusters": cnt[:, K.LUMPED], "log_z": log_z_used, "log_z_lo": lz[:, K.LZ_LO],
            "log_z_hi": lz[:, K.LZ_HI]}


# ----------------------------------------------------------------------------------------------------------------
# brute force


EXACT_ENTRIES = 1 << 17  # logits held at once by sample_exact: a block of queries x a block of targets (1 MB of
# float64, so that the passes over it stay in cache: at N = 1e6, 64 queries, 10 draws, 4.5 ms per query against
# 9.1 ms with 2^22 and 15.4 ms with 2^24)


def sample_exact(points, q, k, *, beta, rng, exclude=None, replace=True):
    """k draws from the exact softmax over the rows of ``points`` (Eq. 1), brute force: one GEMM per block of
    queries x block of targets, so that each block of targets is read once for up to 256 queries.

    P(i) = exp(s_i - log Z), s_i = beta <q, t_i>, log Z = log sum_{i not excluded} exp(s_i). The targets are read
    block by block and every draw is kept up to date as they stream. With replacement: each of the k draws is a
    weighted reservoir of one slot. After targets 1..j the slot holds i with probability e^{s_i} / Z_j; block j+1
    of mass M replaces it with probability M / (Z_j + M) by a draw from the block's softmax (inverse CDF, one
    uniform). So at the end it holds i with probability e^{s_i} / Z, independently of the other slots. Without
    replacement: Gumbel top-k (the order of the k largest s_i + G_i, G_i iid Gumbel, is a sequential draw without
    replacement), the running top k merged with each block's. ``log_q`` exact.

    Parameters
    ----------
    points : (N, D) float64 or float32 array (float32: logits from a float32 GEMM)
    q : (D,) or (B, D) float array
    k : int >= 0
    beta : float > 0
    rng : numpy Generator or int seed
    exclude : ids, or (for a batch) one id array per query
    replace : bool

    Returns ``ids`` and ``log_q`` of shape (k,) or (B, k); ``stats``: inner_products and gemm_inner_products (N
    per query, all by GEMM), gemm32_inner_products (those of them by a float32 GEMM: N for float32 points), log_z.
    """
    points = _points(points)
    beta = check_positive("beta", beta)
    gen = as_rng(rng)
    Q, batched = _queries(q, points.shape[1])
    n = points.shape[0]
    eptr, eids = _exclusions(exclude, Q.shape[0], batched, n)
    k = _check_k(k, n - np.diff(eptr), replace)
    ids, sids, log_z = _exact_draws(points, Q, k, beta, gen, eptr, eids, replace, _EMPTY)
    lq = _log_q(sids, log_z, np.full(Q.shape[0], -np.inf), replace)
    N = np.full(Q.shape[0], n, np.int64)
    stats = {"inner_products": N, "gemm_inner_products": N,
             "gemm32_inner_products": N if points.dtype == np.float32 else np.zeros_like(N), "log_z": log_z}
    return _result(ids, lq, stats, batched)


def _exact_draws(points, Q, k, beta, gen, eptr, eids, replace, gone, f64=False):
    """:func:`sample_exact`'s draws for checked arguments, the rows ``gone`` excluded for every query, the logits by
    a GEMM in the points' precision (``f64``: in float64, as the tree samplers accumulate them): (ids (B, k),
    their logits (B, k), log Z (B,) over the targets not excluded). Without replacement a query with fewer than k
    targets left gets them first, in their sequential order, and ids of zero mass after them."""
    n = points.shape[0]
    B = Q.shape[0]
    ids = np.zeros((B, k), np.int64)
    sids = np.full((B, k), -np.inf)
    log_z = np.full(B, -np.inf)
    gk = np.full((B, k), -np.inf)  # without replacement: the Gumbel keys of the running top k
    Qc = Q.astype(np.float64 if f64 else points.dtype)
    qb = min(max(B, 1), 256)
    tb = max(1, EXACT_ENTRIES // qb)
    owner = np.repeat(np.arange(B), np.diff(eptr))  # the query of each excluded id
    for b0 in range(0, B, qb):
        b1 = min(B, b0 + qb)
        ex = (owner >= b0) & (owner < b1)
        eq, ei = owner[ex] - b0, eids[ex]
        for t0 in range(0, n, tb):
            t1 = min(n, t0 + tb)
            with np.errstate(over="ignore", invalid="ignore"):
                X = points[t0:t1].astype(np.float64, copy=False) if f64 else points[t0:t1]
                S = np.multiply(Qc[b0:b1] @ X.T, beta, dtype=np.float64)
                m = S.max(axis=1)
                if not (np.all(np.isfinite(m)) and np.all(np.isfinite(S.min(axis=1)))):
                    if not np.all(np.isfinite(points)):
                        raise ValueError("points: contains NaN or Inf")
                    raise ValueError("beta: the logits beta <q, t> overflow (not finite); rescale beta or the "
                                     "embeddings")
            inb = (ei >= t0) & (ei < t1)
            ing = gone[(gone >= t0) & (gone < t1)]
            if inb.any() or ing.size:
                S[eq[inb], ei[inb] - t0] = -np.inf  # the excluded entries (a scatter, no per-query arithmetic)
                S[:, ing - t0] = -np.inf
                m = S.max(axis=1)
            live = np.isfinite(m)  # queries with a target of this block not excluded
            if not live.any():
                continue
            m = np.where(live, m, 0.0)[:, None]
            if replace:
                S -= m
                W = np.exp(S, out=S)  # S's buffer: the weights e^{s - m}
                tot = W.sum(axis=1)
                lse = np.where(live, m[:, 0] + np.log(np.where(live, tot, 1.0)), -np.inf)
                new_z = np.logaddexp(log_z[b0:b1], lse)
                # each slot is replaced with probability M / (Z_j + M), by a draw from this block's softmax
                p = np.where(live, np.exp(lse - np.where(live, new_z, 0.0)), 0.0)
                take = gen.random((b1 - b0, k)) < p[:, None]
                r = np.flatnonzero(take.any(axis=1))  # the queries drawing from this block
                if r.size:
                    nb = t1 - t0
                    rr = np.arange(r.size)[:, None]
                    flat = (np.cumsum(W[r], axis=1) / tot[r, None] + rr).ravel()
                    u = gen.random((r.size, k)) + rr
                    idx = np.clip(np.searchsorted(flat, u, side="right") - rr * nb, 0, nb - 1)
                    tk = take[r]
                    # round-off at a row end can land on an excluded (zero-mass) entry: step back to a positive one
                    bad = tk & (W[r[:, None], idx] == 0)
                    while bad.any():
                        idx = np.where(bad, idx - 1, idx)
                        bad = tk & (W[r[:, None], np.maximum(idx, 0)] == 0)
                    ids[b0 + r] = np.where(tk, idx + t0, ids[b0 + r])
                    with np.errstate(divide="ignore"):
                        sids[b0 + r] = np.where(tk, m[r] + np.log(W[r[:, None], idx]), sids[b0 + r])
            else:
                with np.errstate(divide="ignore"):
                    lse = m[:, 0] + np.log(np.exp(S - m).sum(axis=1))
                new_z = np.where(live, np.logaddexp(log_z[b0:b1], lse), log_z[b0:b1])
            if not replace and k > 0:
                G = S + gen.gumbel(size=S.shape)
                kk = min(k, t1 - t0)
                top = np.argpartition(-G, kk - 1, axis=1)[:, :kk] if kk < t1 - t0 else np.argsort(-G, axis=1)[:, :kk]
                cand_g = np.concatenate([gk[b0:b1], np.take_along_axis(G, top, axis=1)], axis=1)
                cand_i = np.concatenate([ids[b0:b1], top + t0], axis=1)
                cand_s = np.concatenate([sids[b0:b1], np.take_along_axis(S, top, axis=1)], axis=1)
                keep = np.argsort(-cand_g, axis=1, kind="stable")[:, :k]
                ids[b0:b1] = np.take_along_axis(cand_i, keep, axis=1)
                sids[b0:b1] = np.take_along_axis(cand_s, keep, axis=1)
                gk[b0:b1] = np.take_along_axis(cand_g, keep, axis=1)
            log_z[b0:b1] = new_z
    return ids, sids, log_z


SCREEN_MAX = 0.05  # the largest float32 logit error bound for which _screened_draws is used (acceptance >= 0.9)


def _screen_error(D, beta, Q, M):
    """eps (B,): a bound on |s32 - s64| for every target t of norm <= M, where s32 = beta fl32(<fl32(q), t>) is the
    logit of a float32 GEMM (any order of summation, with or without FMA) and s64 the float64-accumulated logit of
    the tree samplers. |fl32(q)_d - q_d| <= u |q_d| and a D-term float32 dot product errs by at most
    gamma_D sum_d |a_d b_d|, gamma_D = D u / (1 - D u), u = 2^-24; so |s32 / beta - <q, t>| <= ((1 + u) gamma_D +
    u) ||q|| ||t|| <= c ||q|| M with c = (D + 2) u / (1 - (D + 2) u), whose spare u covers the float64 roundings
    (the float64 logit's own error is below 2 D 2^-53 ||q|| ||t||). Grown by 1e-6 relative and 1e-9 absolute for
    the roundings of the reservoir's logits and of eps itself."""
    u = 2.0 ** -24
    c = (D + 2) * u / (1.0 - (D + 2) * u)
    return beta * np.linalg.norm(Q, axis=1) * M * c * (1.0 + 1e-6) + 1e-9


def _screened_draws(points, Q, k, beta, gen, eptr, eids, gone, eps):
    """:func:`_exact_draws` with replacement, at the cost of float32 GEMMs, with the law of the float64 logits s64
    (the tree samplers'): candidates i are drawn by :func:`_exact_draws` from the softmax of the float32 logits
    s32, then each is accepted with probability e^{s64_i - s32_i - eps} <= 1 (eps >= |s32 - s64| for every target,
    :func:`_screen_error`), s64 computed for the candidates alone. An accepted candidate is i with probability
    proportional to e^{s32_i} e^{s64_i - s32_i} = e^{s64_i}: rejection sampling (Eq. 3-5 with the envelope
    e^{s32 + eps} >= e^{s64}), exact; the candidates are iid, so
    the first k accepted are k iid draws (acceptance >= e^{-2 eps}; a query short of k draws more). Returns (ids,
    their s64, log Z of the float32 logits, within eps of the float64 one)."""
    B = Q.shape[0]
    ids = np.zeros((B, k), np.int64)
    sids = np.zeros((B, k))
    log_z = np.full(B, -np.inf)
    todo = np.arange(B)
    need = np.full(B, k)
    while todo.size:
        m = int(need[todo].max()) + 4 + int(np.ceil(4.0 * np.max(eps[todo]) * k))  # spare candidates
        sub = np.concatenate([np.arange(eptr[b], eptr[b + 1]) for b in todo]).astype(np.int64)
        ptr = np.zeros(todo.size + 1, np.int64)
        np.cumsum(eptr[todo + 1] - eptr[todo], out=ptr[1:])
        c_ids, c_s32, lz32 = _exact_draws(points, Q[todo], m, beta, gen, ptr, eids[sub], True, gone)
        log_z[todo] = lz32  # the same float32 log Z on every pass
        s64 = beta * np.einsum("bjd,bd->bj", points[c_ids].astype(np.float64), Q[todo])
        acc = gen.random(c_ids.shape) < np.exp(s64 - c_s32 - eps[todo, None])
        for j, b in enumerate(todo):
            got = np.flatnonzero(acc[j])[:need[b]]
            t = k - need[b]
            ids[b, t:t + got.size] = c_ids[j, got]
            sids[b, t:t + got.size] = s64[j, got]
            need[b] -= got.size
        todo = todo[need[todo] > 0]
    return ids, sids, log_z


# ----------------------------------------------------------------------------------------------------------------
# start clusterings in CSR form (for the kernels)


def _csr(clusterings):
    """CSR arrays (cptr, nodes, levels, reps, sizes, radii) of one clustering per query."""
    cptr = np.zeros(len(clusterings) + 1, np.int64)
    np.cumsum([len(c) for c in clusterings], out=cptr[1:])
    cat = lambda f, dt: np.ascontiguousarray(np.concatenate([np.asarray(f(c)) for c in clusterings]), dt)  # noqa
    return (cptr, cat(lambda c: c.nodes, np.int64), cat(lambda c: c.levels, np.int64), cat(lambda c: c.reps, np.int64),
            cat(lambda c: c.sizes, np.int64), cat(lambda c: c.radii, np.float64))


_NO_CSR = (np.zeros(1, np.int64), _EMPTY, _EMPTY, _EMPTY, _EMPTY, np.zeros(0))


def _start_levels(tree, Q, beta, level):
    """(auto, CSR of the per-query start clusterings) for ``level`` = "auto" | "prop2" | int."""
    if isinstance(level, str):
        if level == "auto":
            return True, _NO_CSR
        if level != "prop2":
            raise ValueError(f"level: expected 'auto', 'prop2' or an int, got {level!r}")
        levels = [default_level(tree, beta, float(np.linalg.norm(qb))) for qb in Q]
    else:
        levels = [check_int("level", level, low=-(1 << 40), high=1 << 40)] * Q.shape[0]
    cache = {}
    cls = [cache.setdefault(L, level_clustering(tree, L)) for L in levels]
    return False, _csr(cls)


def _points_only(points):
    """TreeArrays of a points array with no tree (array partitions): empty node arrays."""
    e = np.zeros(0, np.int64)
    f = np.zeros(0)
    return TreeArrays(points, np.zeros(points.shape[0], np.int64), e, e, e, e, e, e, f, f, f, f, f, e,
                      np.array([-1, 0, 0, 0], np.int64), 2.0)


def _flat(source, Q, batched, k, beta, gen, exclude, replace, log_z, algo, upper, auto, csr, partition,
          chain_length, max_steps):
    """Run the flat kernel for a batch; returns (ids, lq, stats)."""
    if partition is not None:
        points = _points(source)
        T, suf, n = _points_only(points), np.zeros(0), points.shape[0]
        mptr, members, order, pos = partition.mptr, partition.members, _EMPTY, _EMPTY
    else:
        T, suf, n = source.arrays(), suffix_radii(source), int(source.n_targets)
        mptr, members = _EMPTY, _EMPTY
        order, pos = preorder(source)
    eptr, eids = _exclusions(exclude, Q.shape[0], batched, n)
    avail = (n - np.diff(eptr)) if partition is not None else _available(source, eptr, eids)
    k = _check_k(k, avail, replace)
    cl = np.broadcast_to(np.asarray(chain_length, np.int64), (Q.shape[0],)).copy()
    ids, sids, cnt, lz = K.flat_batch(T, suf, Q, beta, k, algo, upper, auto, ATTEMPT_COST, *csr, mptr, members,
                                      order, pos, eptr, eids, int(replace), cl, max_steps, _seed(gen))
    if cnt[:, K.STATUS].any():
        raise SamplerError(f"flat {'rejection' if algo == 0 else 'MH'}: no accepted draw after {max_steps} "
                           "proposals; use a finer clustering")
    lzu = lz[:, K.LZ_EST].copy()
    if log_z == "exact":
        lzu = _exact_log_z(T.points, Q, beta, None if partition is not None else source.live_ids())
        cnt[:, K.INNER] += n if partition is not None else len(source)
    return ids, _log_q(sids, lzu, lz[:, K.LZ_EXCL], replace), _tree_stats(cnt, lz, lzu)


def sample_flat_rejection(source, q, k, *, beta, rng, clustering=None, level="auto", exclude=None, replace=True,
                          log_z="estimate", max_proposals=DEFAULT_MAX_ATTEMPTS):
    """Flat rejection sampling, Eq. 3-5 with per-cluster eps_C (paper §3.1).

    Proposal: cluster C with probability ∝ |C| e^{s_r + eps_C}, a member i uniformly; accept with
    e^{s_i - s_r - eps_C} <= 1 (|s_i - s_r| <= eps_C = beta ||q|| rho(C) by Cauchy-Schwarz and the certified
    radius). Each proposal is accepted with probability Z / Z_hi; accepted draws are exact.

    Parameters
    ----------
    source : SGTree, or the (N, D) points of an array partition
    q : (D,) or (B, D) float array
    k : int
    clustering : Clustering, optional
        Of ``source`` at its current version (or an array partition of the points); default C_(``level``).
    level : "auto" | "prop2" | int
        Start level when no clustering is given ("auto": Prop. 3's cost, per query, inside the kernel).

    Cost per draw: Z_hi/Z proposals of one inner product each, plus |C| inner products per query.
    """
    beta = check_positive("beta", beta)
    gen = as_rng(rng)
    log_z = _check_log_z(log_z)
    max_proposals = check_int("max_proposals", max_proposals, low=1)
    partition = None
    if isinstance(source, np.ndarray) or (clustering is not None and getattr(clustering, "is_partition", False)):
        if not isinstance(clustering, Clustering) or not clustering.is_partition:
            raise ValueError("clustering: an array partition (partition_clustering) is required with a points array")
        partition = clustering
        points = _points(source)
        Q, batched = _queries(q, points.shape[1])
        if int(clustering.sizes.sum()) != points.shape[0]:
            raise ValueError(f"clustering: partitions {int(clustering.sizes.sum())} rows, points has "
                             f"{points.shape[0]}")
        auto, csr = False, _csr([clustering] * Q.shape[0])
    else:
        _tree(source)
        Q, batched = _queries(q, source.dim)
        if clustering is not None:
            _check_clustering(clustering, source)
            auto, csr = False, _csr([clustering] * Q.shape[0])
        else:
            auto, csr = _start_levels(source, Q, beta, level)
    ids, lq, st = _flat(source, Q, batched, k, beta, gen, exclude, replace, log_z, 0, True, auto, csr, partition,
                        1, max_proposals)
    return _result(ids, lq, st, batched)


# ----------------------------------------------------------------------------------------------------------------
# Alg. 1


def default_level(tree, beta, q_norm=1.0, c=None):
    """Prop. 2's level for gamma = e^{2c}: the largest l with b^l <= c / (beta ||q||), i.e. Prop. 1's per-cluster
    inflation e^{beta b^l} is about e^c (default c = DEFAULT_C = 1.5). Used when ``level="prop2"``."""
    c = DEFAULT_C if c is None else check_positive("c", c)
    return int(bounds.prop2_level(math.exp(2 * c), beta * max(q_norm, 1e-300), float(tree.base)))


def sample_rejection(tree, q, k, *, beta, rng, level="auto", exclude=None, replace=True, log_z="estimate",
                     max_attempts=DEFAULT_MAX_ATTEMPTS):
    """Exact softmax samples by Alg. 1 (hierarchical rejection down the SG tree), errata fixed.

    Start at C_(level) with the certified per-cluster bound E_C = s_r + beta ||q|| rho(C); descend level by level
    with running normalisers, the restart option and the nested self-child rule; children's bounds
    E_c = min(E, s_c + beta ||q|| MAXD(c)). Each attempt succeeds with probability Z / Z_hi(level) whatever the
    descent, and accepted draws are exact (derivation in the kernel ``alg1_batch``).

    Parameters
    ----------
    tree : SGTree
    q : (D,) or (B, D) float array
    k : int
    level : "auto" (Prop. 3's cost per query, inside the kernel; default) | "prop2" (:func:`default_level`) | int
    max_attempts : int
        Per draw; reaching it raises :class:`SamplerError` (never an unaccepted proposal).

    ``stats`` (per query): attempts (= proposals), accepted, restarts, inner_products (all logits computed,
    start-level choice and excluded ids included), selection_inner_products, level, n_clusters, log_z,
    log_z_lo, log_z_hi.
    """
    return _rejection(tree, q, k, beta=beta, rng=rng, level=level, exclude=exclude, replace=replace, log_z=log_z,
                      max_attempts=max_attempts)


def _rejection(tree, q, k, *, beta, rng, level="auto", exclude=None, replace=True, log_z="estimate",
               max_attempts=DEFAULT_MAX_ATTEMPTS, broken=False, fallback_after=0, attempt_cost=None):
    """:func:`sample_rejection` with the negative controls of the tests: ``broken`` (radius b^l as printed, no cap,
    clipped restart weights) and ``fallback_after`` (the authors' "return the unaccepted proposal after that many
    restarts"). Both make the sampler inexact; they exist so that the exactness tests can show they would fail."""
    beta, gen, log_z, Q, batched, eptr, eids, k = _tree_args(tree, q, k, beta, rng, log_z, exclude, replace)
    max_attempts = check_int("max_attempts", max_attempts, low=1)
    auto, csr = _start_levels(tree, Q, beta, level)
    attempt_cost = ATTEMPT_COST if attempt_cost is None else float(attempt_cost)
    T = tree.arrays()
    ids, sids, cnt, lz = K.alg1_batch(T, suffix_radii(tree), Q, beta, k, auto, attempt_cost, *csr, eptr, eids,
                                      int(replace), max_attempts, bool(broken), int(fallback_after), _seed(gen))
    if cnt[:, K.STATUS].any():
        b = int(np.flatnonzero(cnt[:, K.STATUS])[0])
        raise SamplerError(f"sample_rejection: no accepted draw after {max_attempts} attempts at level "
                           f"{int(cnt[b, K.LEVEL])} (acceptance ~ exp(-beta rho)); start at a lower level")
    return _finish(tree, Q, beta, log_z, replace, batched, ids, sids, cnt, lz)


# ----------------------------------------------------------------------------------------------------------------
# A* sampling


def sample_astar(tree, q, k, *, beta, rng, exclude=None, replace=True, log_z="estimate",
                 max_pops=DEFAULT_MAX_ATTEMPTS):
    """Exact softmax samples by A* sampling over the SG tree's Gumbel process (ours; Maddison, Tarlow, Minka 2014).

    Gumbel-max: with G_i iid Gumbel(0), argmax_i (s_i + G_i) is an exact draw from P(i) ∝ e^{s_i} (Eq. 1). The
    Gumbel maxima of the tree's clusters are generated top-down (a cluster of n targets has maximum ~ Gumbel(log n);
    splitting it into Alg. 1's parts -- the representative, the nested self-child, the children at the next
    occupied level -- the part holding the maximum is chosen with probability size / n and keeps it, the others
    get Gumbels conditioned below it), and explored best first by G_C + E_C, E_C = min(E_parent, s_r + beta ||q||
    rho(C)) >= every logit in C (the certified bound of Prop. 1, corrected). The first target whose exact value
    G_i + s_i tops the queue is the argmax over all targets: an exact draw, whatever the tightness of the bounds
    (which only set the cost). Excluded ids (and earlier draws without replacement) get s = -inf, which
    conditions the draw exactly on the other targets. The k draws of a query are independent searches sharing
    the query's logits.

    Parameters
    ----------
    tree : SGTree
    q : (D,) or (B, D) float array
    k : int
    exclude, replace, log_z : as for :func:`sample_rejection`; the estimate of log Z is that of the last search's
        final frontier (a partition of the targets: sum |C| e^{s_r}), clipped to its certified interval.
    max_pops : int
        Regions popped per draw before :class:`SamplerError`.

    ``stats``: attempts (= regions popped), inner_products, log_z, log_z_lo, log_z_hi.
    """
    return _astar(tree, q, k, beta=beta, rng=rng, exclude=exclude, replace=replace, log_z=log_z, max_pops=max_pops)


def _astar(tree, q, k, *, beta, rng, exclude=None, replace=True, log_z="estimate", max_pops=DEFAULT_MAX_ATTEMPTS,
           broken=False):
    """:func:`sample_astar`; ``broken=True`` drops the radius from the bounds (E = s_r): a negative control."""
    beta, gen, log_z, Q, batched, eptr, eids, k = _tree_args(tree, q, k, beta, rng, log_z, exclude, replace)
    max_pops = check_int("max_pops", max_pops, low=1)
    T = tree.arrays()
    ids, sids, cnt, lz = A.astar_batch(T, suffix_radii(tree), Q, beta, k, eptr, eids, int(replace), max_pops,
                                       bool(broken), _seed(gen))
    if cnt[:, K.STATUS].any():
        raise SamplerError(f"sample_astar: no draw after {max_pops} regions popped")
    return _finish(tree, Q, beta, "exact" if k == 0 else log_z, replace, batched, ids, sids, cnt, lz)


# ----------------------------------------------------------------------------------------------------------------
# adaptive rejection


def child_table(tree):
    """The adaptive sampler's child table of ``tree`` (:func:`refimpl.sampling._adaptive.child_table`: every node's
    children as one run of slots with their level, row, size, pre-order position, first child, certified radius
    and norm bound), O(N) once per tree version and cached. Its int32 slots need fewer than 2^31 nodes."""
    entry = _tree_cache(tree)
    out = entry.get("child_table")
    if out is None:
        ta = tree.arrays()
        if int(ta.state[N_NODES]) >= 2 ** 31:
            raise ValueError(f"child_table: {int(ta.state[N_NODES])} nodes; at most 2^31 - 1 are supported")
        order, pos = preorder(tree)
        out = AD.child_table(ta, suffix_radii(tree), pos, AD.norm_suffix(ta, order))
        entry["child_table"] = out
    return out


def adaptive_start(tree, max_clusters=None):
    """The start frontier of the adaptive sampler: C_(l) at the deepest level l with |C_(l)| <= ``max_clusters``
    (None: the finest candidate of START_SQRT, times sqrt(N): sublinear in N; the root alone if no level fits),
    cached per tree version.

    Returns (F0, R, margin, CT): F0 the clusters' arrays for the kernel (nodes, the child-table slot of the first
    child below l, pre-order start, sizes, certified radii, l), R (|C_(l)|, D) float64 their representatives'
    rows, so that one GEMM ``beta * Q @ R.T`` scores them for a batch, and margin = 2 gamma_D max_i ||t_i||
    (gamma_D = D u / (1 - D u), u = 2^-53): beta ||q|| margin bounds the rounding of two float64 dot products of D
    terms (the GEMM's and the kernel's), and is added to every bound of a cluster of more than one target; CT the
    tree's :func:`child_table`.
    """
    entry = _tree_cache(tree)
    if max_clusters is None:
        max_clusters = START_SQRT[-1] * math.sqrt(len(tree))
    key = ("adaptive_start", float(max_clusters))
    out = entry.get(key)
    if out is None:
        ta = tree.arrays()
        n_nodes = int(ta.state[N_NODES])
        alive = ta.node_point[:n_nodes] >= 0
        lv = ta.node_level[:n_nodes][alive]
        root_level = int(ta.node_level[int(tree.root)])
        levels, counts = np.unique(lv, return_counts=True)  # ascending levels
        above = np.cumsum(counts[::-1])[::-1]  # nodes with level >= levels[i]: |C_(levels[i])|
        ok = levels[above <= max(1.0, max_clusters)]
        L = int(ok.min()) if ok.size else root_level + 1
        nodes = np.ascontiguousarray(level_clustering(tree, L).nodes, np.int64)
        order, pos = preorder(tree)
        CT = child_table(tree)
        F0, R = AD.start_frontier(ta, suffix_radii(tree), CT, pos, order.shape[0], nodes, L)
        D = R.shape[1]
        u = 2.0 ** -53
        live = tree.live_ids()
        pts = np.asarray(tree.points)[live]
        rmax = float(np.sqrt(np.max(np.einsum("ij,ij->i", pts, pts)))) if live.size else 0.0
        out = (F0, R, 2.0 * D * u / (1.0 - D * u) * rmax * (1.0 + 1e-6), CT)
        entry[key] = out
    return out


def adaptive_envelope_start(tree, Q, k, beta, start_clusters=None):
    """The adaptive sampler's start for the batch ``Q`` (B, D) and k draws per query: (F0, S0, margin, CT, g) with
    S0 = beta Q R^T (B, |C_(l)|) scored by one GEMM (:func:`adaptive_start` for the rest) and g the GEMM inner
    products per query spent on it (the coarse level's included when the finer one is chosen).

    With ``start_clusters`` given, that level. Otherwise the level with at most 2 sqrt(N) clusters is scored and, on
    START_PROBE queries spread over the batch, its envelope's expected attempts per draw r = Z_hi / Z_hat (Eq. 7,
    before any refinement) are measured by the kernel's pass alone (no draw, no random number): the batch starts
    there if |C_coarse| + k r ATTEMPT_CLUSTERS <= |C_fine| + k ATTEMPT_CLUSTERS (the finer level, at most
    32 sqrt(N) clusters, credited with one attempt per draw), else from the finer level. The choice sets only the
    cost, never the law, and is a function of the batch alone (the same batch, the same draws)."""
    n = len(tree)
    if start_clusters is None:
        F0, R, margin, CT = adaptive_start(tree, START_SQRT[0] * math.sqrt(n))
        fine = adaptive_start(tree, START_SQRT[-1] * math.sqrt(n))
    else:
        F0, R, margin, CT = adaptive_start(tree, start_clusters)
        fine = None
    S0 = Q @ R.T
    S0 *= beta  # in place: one (B, |C_(l)|) array, not two
    if fine is None or fine[1].shape[0] == R.shape[0] or k <= 0 or Q.shape[0] == 0:
        return F0, S0, margin, CT, R.shape[0]
    rows = np.unique(np.linspace(0, Q.shape[0] - 1, min(Q.shape[0], START_PROBE)).astype(np.int64))
    order, pos = preorder(tree)
    ptr = np.zeros(rows.size + 1, np.int64)
    lz = AD.adaptive_batch(tree.arrays(), suffix_radii(tree), order, pos, np.ascontiguousarray(Q[rows]), beta, 0,
                           ptr, _EMPTY, 1, 1, ATTEMPT_COST, 0, F0, np.ascontiguousarray(S0[rows]), margin, CT)[3]
    ratio = float(np.mean(np.exp(lz[:, K.LZ_HI] - lz[:, K.LZ_EST])))
    if R.shape[0] + k * ratio * ATTEMPT_CLUSTERS <= fine[1].shape[0] + k * ATTEMPT_CLUSTERS:
        return F0, S0, margin, CT, R.shape[0]
    g = R.shape[0]
    F0, R, margin, CT = fine
    S0 = Q @ R.T
    S0 *= beta
    return F0, S0, margin, CT, g + R.shape[0]


def sample_adaptive(tree, q, k, *, beta, rng, exclude=None, replace=True, log_z="estimate",
                    max_attempts=DEFAULT_MAX_ATTEMPTS, start_clusters=None):
    """Exact softmax samples by adaptive rejection over the SG tree (ours): Eq. 3-5 with an envelope refined per
    query and shared by its k draws.

    Envelope: a partition of the targets into tree clusters C with certified bounds E_C >= s_i for i in C: the
    least of Prop. 1's s_r + beta ||q|| rho(C) (certified radius), beta ||q|| M_C and
    beta (||q||^2 + M_C^2 - (||q - t_r|| - rho(C))^2) / 2 (M_C >= the members' norms; expand ||q - t_i||^2), and
    of the parent's bound. It starts from C_(l), the deepest level with at most ``start_clusters`` clusters
    (:func:`adaptive_envelope_start`), whose representatives are scored for the whole batch by ONE float64 GEMM; start
    clusters whose bound is below max_r s_r - log(100 N) are lumped into one tail entry (mass <= Z / 100). Then the
    cluster of largest mass |C| e^{E_C} is split into the children at its next occupied level and the rest, while
    the attempts this could save over the k draws (k (|C| e^{E_C} - |C| e^{s_r}) / Z_hat, Z_hat of Eq. 7) exceed
    the split's inner products (the level, the tail and this rule set only the cost). Sampling: propose C with
    probability |C| e^{E_C} / sum_C' |C'| e^{E_C'}, a member i uniformly, accept with e^{s_i - E_C}. Exact: each
    attempt returns i with probability e^{s_i} / sum_C' |C'| e^{E_C'}, proportional to P(i) whatever the
    envelope (which is fixed before the draws), so accepted draws are iid softmax draws; excluded ids and, without
    replacement, earlier draws are rejected, which conditions each draw exactly on the remaining targets. A
    refined singleton is accepted without an inner product. A query whose refinement and attempts reach
    BRUTE_SHARE x N = N / 8 (brute force's cost in attempts, batched; an envelope too loose to pay; the refinement
    stops at a quarter of it) makes its remaining draws by brute force, after the kernel, together with every other
    such query of the batch: one pass over the targets in blocks (:func:`sample_exact`'s streaming draws), so that
    each block is read once for all of them (``stats["exact_fallbacks"]`` counts these draws; the switch is a
    stopping time of the iid attempts, so the draws stay exact).

    Parameters
    ----------
    tree : SGTree (float64 or float32 points; logits accumulated in float64)
    q : (D,) or (B, D) float array
    k : int
    exclude, replace, log_z : as for :func:`sample_rejection` (``log_z="estimate"``: log Z_hi + log of the
        acceptance rate, clipped to the certified interval of the final envelope; for a query that switched to
        brute force, brute force's: exact, or within _screen_error of it when its GEMMs were float32)
    max_attempts : int
        Per draw; reaching it raises :class:`SamplerError`.
    start_clusters : float > 0, optional
        The start level's largest size (>= N: every target its own start cluster; < 2: the root). Default: per
        batch, at most 2 sqrt(N) or 32 sqrt(N) clusters, by a cost estimate (:func:`adaptive_envelope_start`). The
        level, the tail and the refinement rule set only the cost, never the law.

    Cost per query: |C_(l)| GEMM inner products and the refinement's (together
    ``stats["selection_inner_products"]``) plus, per draw, Z_hi / Z attempts of at most one inner product each.
    ``stats``: attempts, accepted, inner_products (the GEMM's included), gemm_inner_products (the start level's,
    and brute force's N after a switch), gemm32_inner_products (those of them by a float32 GEMM: brute force's
    screened N), n_clusters (envelope size), lumped_clusters (start clusters in the tail), log_z, log_z_lo,
    log_z_hi.
    """
    return _adaptive(tree, q, k, beta=beta, rng=rng, exclude=exclude, replace=replace, log_z=log_z,
                     max_attempts=max_attempts, start_clusters=start_clusters)


def _adaptive(tree, q, k, *, beta, rng, exclude=None, replace=True, log_z="estimate",
              max_attempts=DEFAULT_MAX_ATTEMPTS, start_clusters=None, broken=False):
    """:func:`sample_adaptive`; ``broken=True`` drops the radius from the bounds (E = s_r): a negative control."""
    beta, gen, log_z, Q, batched, eptr, eids, k = _tree_args(tree, q, k, beta, rng, log_z, exclude, replace)
    max_attempts = check_int("max_attempts", max_attempts, low=1)
    if start_clusters is not None:
        start_clusters = check_positive("start_clusters", start_clusters)
    order, pos = preorder(tree)
    F0, S0, margin, CT, g = adaptive_envelope_start(tree, Q, k, beta, start_clusters)
    ids, sids, cnt, lz = AD.adaptive_batch(tree.arrays(), suffix_radii(tree), order, pos, Q, beta, k, eptr, eids,
                                           int(replace), max_attempts, ATTEMPT_COST, _seed(gen), F0, S0, margin, CT,
                                           bool(broken), True, BRUTE_SHARE)
    if np.any(cnt[:, K.STATUS] == 1):
        raise SamplerError(f"sample_adaptive: no accepted draw after {max_attempts} attempts")
    brute, screened = _brute_rest(tree, Q, k, beta, gen, replace, eptr, eids, ids, sids, cnt, lz)
    cnt[:, K.INNER] += g - S0.shape[1]  # a coarse level scored, then not chosen
    res = _finish(tree, Q, beta, log_z, replace, batched, ids, sids, cnt, lz)
    g = np.full(Q.shape[0], g, np.int64)  # the start level's inner products, computed by the GEMM
    g[brute] += len(tree)  # and brute force's
    g32 = np.zeros_like(g)
    if screened:
        g32[brute] = len(tree)  # by float32 GEMMs
    res.stats["gemm_inner_products"] = g if batched else g[0]
    res.stats["gemm32_inner_products"] = g32 if batched else g32[0]
    return res


def _brute_rest(tree, Q, k, beta, gen, replace, eptr, eids, ids, sids, cnt, lz):
    """The draws the adaptive kernel left to brute force (STATUS 2: its work reached BRUTE_SHARE x N), made for
    all such queries together (each block of targets read once for up to 256 queries): by :func:`_screened_draws`
    with replacement on float32 points, else by :func:`_exact_draws` in float64. A query keeps the draws it made
    before the switch (a stopping time of its iid attempts, so the rest are plain draws from P, renormalised over
    the targets not excluded and, without replacement, not drawn yet); its log Z becomes the brute-force one (exact
    in float64; from the float32 logits, within their error bound, when screened), its counters get the N inner
    products and the brute-force draws. Returns (those queries, whether their GEMMs were float32)."""
    rows = np.flatnonzero(cnt[:, K.STATUS] == 2)
    if rows.size == 0:
        return rows, False
    made = np.sum(ids[rows] >= 0, axis=1)  # the draws before the switch, a prefix of each row
    ex = [eids[eptr[b]:eptr[b + 1]] if replace else np.concatenate([eids[eptr[b]:eptr[b + 1]], ids[b, :t]])
          for b, t in zip(rows, made)]
    eptr2 = np.zeros(rows.size + 1, np.int64)
    np.cumsum([e.size for e in ex], out=eptr2[1:])
    eids2 = np.concatenate(ex).astype(np.int64)
    n = int(tree.n_targets)
    gone = np.flatnonzero(np.asarray(tree.point_node)[:n] < 0).astype(np.int64)
    rest = int((k - made).max())
    points = np.asarray(tree.points)[:n]
    screened = bool(replace and points.dtype == np.float32)
    if screened:  # the float32 logits' error bound, max ||t|| from the child table's norm bounds (sufn at the root)
        eps = _screen_error(points.shape[1], beta, Q[rows], float(child_table(tree)[-1][tree.root]))
        screened = bool(np.max(eps) <= SCREEN_MAX)
    if screened:
        d_ids, d_s, d_lz = _screened_draws(points, Q[rows], rest, beta, gen, eptr2, eids2, gone, eps)
    else:
        d_ids, d_s, d_lz = _exact_draws(points, Q[rows], rest, beta, gen, eptr2, eids2, bool(replace), gone, f64=True)
    for j, (b, t) in enumerate(zip(rows, made)):
        ids[b, t:] = d_ids[j, :k - t]
        sids[b, t:] = d_s[j, :k - t]
        terms = [d_lz[j], lz[b, K.LZ_EXCL]] + ([] if replace else list(sids[b, :t]))
        lz[b, K.LZ_EST] = np.logaddexp.reduce(terms)  # log Z over every live target
        cnt[b, K.INNER] += len(tree)
        cnt[b, K.EXACT] += k - t
        cnt[b, K.STATUS] = 0
    return rows, screened


# ----------------------------------------------------------------------------------------------------------------
# MH


def sample_mh(tree, q, k, *, beta, rng, gamma=4.0, m=None, chain_length=None, tv=0.01, proposal="eq7",
              clustering=None, max_clusters=None, refine=True, max_refine_clusters=20000, exclude=None,
              replace=True, log_z="estimate", max_steps=DEFAULT_MAX_ATTEMPTS):
    """Independent Metropolis-Hastings (Eq. 14) with the cluster proposal (Eq. 7), paper §3.2.

    The clustering comes from Alg. 2 (:func:`refimpl.sampling.clustering.find_clustering` with ``gamma``, ``m``,
    ``max_clusters``), by default followed by the certified refinement (``refine=True``) until the certified
    log max P/Q <= log gamma or ``max_refine_clusters`` clusters; or pass ``clustering`` (of the tree's current
    version). ``proposal="eq7"``: Q(i) ∝ e^{s_r(C(i))}; ``"upper"``: Q+(i) ∝ e^{s_r + eps_C}. k independent chains
    of s states, each started from Q; the last state of each chain is a draw. Default s from Eq. 6 for total
    variation ``tv`` with the *certified* gamma: s = 1 + ceil(gamma log(1/tv)); ``stats["tv_bound"]`` =
    exp(-(s - 1)/gamma_cert). Without replacement, chains run one after the other, each excluding the ids drawn.

    Parameters
    ----------
    tree : SGTree
    q : (D,) or (B, D) float array
    k : int
    gamma : float > 1; m, max_clusters, refine, max_refine_clusters: as in find_clustering
    chain_length : int, optional
    tv : float in (0, 1)

    One compiled call for the whole batch: every query's clustering (Alg. 2 and its certified refinement, or the
    given one), its certificate and chain length, and the chains.
    """
    beta = check_positive("beta", beta)
    gamma = check_positive("gamma", gamma)
    gen = as_rng(rng)
    log_z = _check_log_z(log_z)
    if proposal not in ("eq7", "upper"):
        raise ValueError(f"proposal: expected 'eq7' or 'upper', got {proposal!r}")
    if chain_length is not None:
        chain_length = check_int("chain_length", chain_length, low=1)
    tv = check_positive("tv", tv)
    if tv >= 1:
        raise ValueError(f"tv: must be in (0, 1), got {tv}")
    max_steps = check_int("max_steps", max_steps, low=1)
    _tree(tree)
    if gamma <= 1.0:
        raise ValueError(f"gamma: must be > 1, got {gamma}")
    Q, batched = _queries(q, tree.dim)
    T = tree.arrays()
    order, pos = preorder(tree)
    gnodes = glevels = _EMPTY
    sptr, snodes = np.zeros(2, np.int64), _EMPTY
    sidx = starts = ms = np.zeros(Q.shape[0], np.int64)
    if clustering is not None:
        _check_clustering(clustering, tree)
        if clustering.is_partition:
            raise ValueError("clustering: sample_mh needs tree clusters, got an array partition")
        gnodes = np.ascontiguousarray(clustering.nodes, np.int64)
        glevels = np.ascontiguousarray(clustering.levels, np.int64)
    else:  # Alg. 2's start level (Prop. 2, capped above the root) and deepest level, per query
        base = float(tree.base)
        qn = np.sqrt(np.einsum("ij,ij->i", Q, Q))
        starts = np.minimum(bounds.prop2_levels(gamma, beta * np.maximum(qn, 1e-300), base),
                            int(tree.node_level[tree.root]) + 1).astype(np.int64)
        if m is None:
            ms = starts - math.ceil(math.log(16.0) / math.log(base))
        else:
            ms = np.full(Q.shape[0], check_int("m", m, low=-(1 << 40), high=int(starts.min())), np.int64)
        uniq, sidx = np.unique(starts, return_inverse=True)
        parts = [np.asarray(level_clustering(tree, int(L)).nodes, np.int64) for L in uniq]
        sptr = np.zeros(uniq.size + 1, np.int64)
        np.cumsum([x.size for x in parts], out=sptr[1:])
        snodes = np.ascontiguousarray(np.concatenate(parts), np.int64)
        sidx = sidx.astype(np.int64).reshape(-1)
    if chain_length is not None and chain_length > max_steps:
        raise SamplerError(f"sample_mh: chain length {chain_length} exceeds max_steps={max_steps}")
    mc = 0 if max_clusters is None else check_int("max_clusters", max_clusters, low=1)
    mr = (1 << 62) if max_refine_clusters is None else check_int("max_refine_clusters", max_refine_clusters, low=1)
    n = int(tree.n_targets)
    eptr, eids = _exclusions(exclude, Q.shape[0], batched, n)
    k = _check_k(k, _available(tree, eptr, eids), replace)
    ids, sids, cnt, lz, lg, s, cip, too_long = K.mh_batch(
        T, suffix_radii(tree), order, pos, Q, beta, k, sptr, snodes, sidx, starts, np.asarray(ms, np.int64), mc,
        bool(refine), proposal == "upper", math.log(gamma), mr, gnodes, glevels,
        0 if chain_length is None else chain_length, math.log(tv), max_steps, eptr, eids, int(replace), _seed(gen))
    if too_long:
        raise SamplerError(f"sample_mh: the chain length of Eq. 6 (certified log gamma {lg.max():.3g}) exceeds "
                           f"max_steps={max_steps}; refine the clustering (larger max_refine_clusters) or pass "
                           "chain_length")
    if cnt[:, K.STATUS].any():
        raise SamplerError(f"flat MH: no accepted draw after {max_steps} proposals; use a finer clustering")
    lzu = lz[:, K.LZ_EST].copy()
    if log_z == "exact":
        lzu = _exact_log_z(T.points, Q, beta, tree.live_ids())
        cnt[:, K.INNER] += len(tree)
    st = _tree_stats(cnt, lz, lzu)
    st.update(chain_length=s, log_gamma=lg, tv_bound=np.exp(-(s - 1) / np.exp(np.minimum(lg, 700.0))),
              refine_inner_products=cip)
    st["inner_products"] = st["inner_products"] + cip
    return _result(ids, _log_q(sids, lzu, lz[:, K.LZ_EXCL], replace), st, batched)



"""Sampling negatives from the softmax P(i|x) ∝ exp(beta <q, t_i>) (PAPER.md §3; paper §3.1-3.3).

Samplers (each returns a :class:`SampleResult` with ``ids`` int64, ``log_q`` and ``stats``):

* :func:`sample_exact`: brute force over all N targets (inverse CDF; Gumbel top-k without replacement). The
  reference every other sampler is tested against. Cost N inner products per query.
* :func:`sample_flat_rejection`: Eq. 3-5 on a clustering with per-cluster eps_C = beta ||q|| rho(C): propose a
  cluster ∝ |C| e^{s_r + eps_C}, a member uniformly, accept with e^{s_i - s_r - eps_C}. Exact.
* :func:`sample_rejection`: Alg. 1, hierarchical rejection down the SG tree, errata fixed (kernel docstring in
  :mod:`refimpl.sampling._kernels`). Exact; never returns an unaccepted draw (raises after ``max_attempts``).
* :func:`sample_mh`: independent Metropolis-Hastings (Eq. 14) with the cluster proposal of Eq. 7 on the clustering
  of Alg. 2 (certified refinement by default); chain length from Eq. 6 for a requested TV, or given. Approximate:
  TV <= exp(-(s - 1)/gamma) with the certified gamma, reported in ``stats``.
* :func:`sample_cluster_topk_heuristic`: the experiments' shortcut (top clusters, chains of length 2, keep the
  top-scoring targets of all chains). NOT a softmax sampler (biased towards high scores; tests show it fails the
  exactness test); provided because the paper's numbers were produced with it.

Start level of the rejection samplers (``level``): "auto" (default) picks, per query, the level minimising the
estimated U-shaped cost of Prop. 3 (|C_l| inner products + k x estimated attempts per draw, :func:`choose_level`);
"prop2" uses Prop. 2's rule (:func:`default_level`); an int fixes it. Exactness never depends on the level.

Common options: ``exclude`` (positive ids; the softmax is renormalised over the other targets, for batches a list
of arrays, one per query), ``replace`` (False: the k draws are distinct, each drawn from the softmax renormalised
over the targets not yet drawn), batches (``q`` of shape (B, D) -> ``ids`` (B, k)).

``log_q`` is the log-probability of each draw under the distribution sampled: log P(i) renormalised for the
exclusions (and, without replacement, conditional on the previous draws). sample_exact computes it exactly. The
tree samplers know P only up to Z: with ``log_z="estimate"`` (default) they use an estimate of Z from their own
proposals (flat rejection and MH: the importance-sampling estimate Z_hat_prop * mean(e^{s_i - lw_C}); Alg. 1:
Z_hat_hi * successes / attempts), clipped to the certified interval [Z_lo, Z_hi] of the start clustering;
``log_z="exact"`` pays N inner products for the exact value. ``stats["log_z"]`` holds the value used.
"""
from __future__ import annotations

import math
from dataclasses import dataclass, field

import numpy as np

from refimpl.sampling import _cluster_kernels as CK
from refimpl.sampling import _kernels as K
from refimpl._validate import as_rng, check_int, check_matrix, check_positive
from refimpl.sampling.clustering import (ArrayClustering, TreeClustering, _tree_points, certify, find_clustering,
                                level_clustering, tree_arrays)

__all__ = [
    "SampleResult",
    "SamplerError",
    "sample_exact",
    "sample_flat_rejection",
    "sample_rejection",
    "sample_mh",
    "sample_cluster_topk_heuristic",
    "default_level",
    "choose_level",
    "topk",
]

DEFAULT_MAX_ATTEMPTS = 10_000_000
DEFAULT_C = 1.5


class SamplerError(RuntimeError):
    """A rejection sampler hit its attempt budget (it never returns an unaccepted proposal instead)."""


@dataclass
class SampleResult:
    """``ids`` (k,) or (B, k) int64; ``log_q`` same shape; ``stats`` dict (per-query lists for batches)."""

    ids: np.ndarray
    log_q: np.ndarray
    stats: dict = field(default_factory=dict)


# ----------------------------------------------------------------------------------------------------------------
# input handling


def _queries(q, dim):
    arr = np.asarray(q)
    if arr.ndim == 1:
        return check_matrix("q", arr[None, :], n_cols=dim), False
    if arr.ndim == 2:
        return check_matrix("q", arr, n_cols=dim), True
    raise ValueError(f"q: expected a 1-D query or a 2-D batch of queries, got shape {arr.shape}")


def _excludes(exclude, n_queries, batched, n):
    from refimpl._validate import check_ids

    if exclude is None:
        return [np.zeros(0, np.int64)] * n_queries
    if batched and isinstance(exclude, (list, tuple)) and len(exclude) > 0 and not np.isscalar(exclude[0]):
        if len(exclude) != n_queries:
            raise ValueError(f"exclude: expected one id array per query ({n_queries}), got {len(exclude)}")
        return [np.unique(check_ids("exclude", e, n)) for e in exclude]
    e = np.unique(check_ids("exclude", exclude, n))
    return [e] * n_queries


def _check_k(k, n_avail, replace):
    k = check_int("k", k, low=0)
    if not replace and k > n_avail:
        raise ValueError(f"k: {k} draws without replacement but only {n_avail} targets are not excluded")
    return k


def _check_log_z(log_z):
    if log_z not in ("estimate", "exact"):
        raise ValueError(f"log_z: expected 'estimate' or 'exact', got {log_z!r}")
    return log_z


def _log_q(sids, log_z, excl_logits, replace):
    """log q of each draw given log Z over all targets: renormalised for exclusions, conditional without replacement."""
    k = sids.shape[0]
    z = math.exp(log_z - log_z)  # 1.0, everything relative to Z
    rest = z - float(np.sum(np.exp(excl_logits - log_z)))
    out = np.empty(k)
    for t in range(k):
        pt = math.exp(sids[t] - log_z)
        r = max(rest, pt)
        out[t] = sids[t] - log_z - math.log(r)
        if not replace:
            rest -= pt
    return out


def _collect(results, batched, stats_keys=None):
    ids = np.stack([r[0] for r in results])
    lq = np.stack([r[1] for r in results])
    stats = {}
    for key in results[0][2]:
        vals = [r[2][key] for r in results]
        stats[key] = vals if batched else vals[0]
    if not batched:
        ids, lq = ids[0], lq[0]
    return SampleResult(ids, lq, stats)


def _seed(gen):
    return int(gen.integers(0, 2**62))


# ----------------------------------------------------------------------------------------------------------------
# brute force


def sample_exact(points, q, k, *, beta, rng, exclude=None, replace=True):
    """k draws from the exact softmax over the rows of ``points`` (Eq. 1), brute force.

    With replacement: inverse CDF on the cumulative softmax (one uniform per draw). Without replacement: Gumbel
    top-k (the order of the top k perturbed logits is a sequential draw without replacement). ``log_q`` exact.
    Cost: N inner products per query (``stats["inner_products"]``).
    """
    points = _points_light(points)
    beta = check_positive("beta", beta)
    gen = as_rng(rng)
    Q, batched = _queries(q, points.shape[1])
    n = points.shape[0]
    excl = _excludes(exclude, Q.shape[0], batched, n)
    results = []
    for b in range(Q.shape[0]):
        kk = _check_k(k, n - excl[b].size, replace)
        s = beta * (points @ Q[b])
        if not np.all(np.isfinite(s)):
            check_matrix("points", points)  # names the NaN/Inf if it is in the points
            raise ValueError("points: logits overflow (beta * <q, t> is not finite)")
        if excl[b].size:
            s[excl[b]] = -np.inf
        m = np.max(s)
        w = np.exp(s - m)
        log_z = m + math.log(float(np.sum(w)))
        if replace:
            cdf = np.cumsum(w)
            ids = np.searchsorted(cdf, gen.random(kk) * cdf[-1], side="right")
            ids = np.minimum(ids, n - 1).astype(np.int64)
            lq = s[ids] - log_z
        else:
            g = s + gen.gumbel(size=n)
            ids = np.argsort(-g, kind="stable")[:kk].astype(np.int64)
            lq = _log_q(s[ids], log_z, np.zeros(0), False)
        results.append((ids, lq, {"inner_products": n, "log_z": log_z}))
    return _collect(results, batched)


def _points_light(points):
    """points as a C-contiguous float64 2-D array; finiteness is checked on the logits (O(N), not O(N D))."""
    if isinstance(points, np.ndarray) and points.dtype == np.float64 and points.ndim == 2 and \
            points.flags.c_contiguous and points.shape[0] > 0:
        return points
    return check_matrix("points", points)


def _exact_log_z(points, q, beta, tree=None):
    """log Z over all targets (the live targets of ``tree`` when given)."""
    s = beta * ((points if tree is None else points[tree.live_ids()]) @ q)
    m = np.max(s)
    return m + math.log(float(np.sum(np.exp(s - m))))


# ----------------------------------------------------------------------------------------------------------------
# flat rejection and MH on a clustering


def _flat_setup(source, clustering, q, beta, lw_mode):
    from refimpl.sampling import bounds

    points = source if isinstance(source, np.ndarray) else _tree_points(source)
    if isinstance(clustering, ArrayClustering):
        pt = lv = fc = ns = cnt = np.zeros(0, np.int64)
    else:
        pt, lv, fc, ns, cnt, _ = tree_arrays(clustering.tree)
    cn, cl, cs, mptr, mem = clustering.proposal_arrays()
    sr = clustering.stats.pop("rep_logits", None) if isinstance(clustering, TreeClustering) else None
    if sr is None:
        sr = beta * (points[clustering.reps] @ q)
    eps = np.asarray(bounds.cluster_eps(beta, float(np.linalg.norm(q)), clustering.radii), dtype=np.float64)
    lw = sr + eps if lw_mode == "upper" else sr.copy()
    ref = float(np.max(lw))
    cum = np.cumsum(cs * np.exp(lw - ref))
    log_zprop = ref + math.log(float(cum[-1]))
    lo, hi = bounds.log_partition_bounds(sr, cs.astype(np.float64), eps)
    return points, (cum, lw, cn, cl, cs, mptr, mem, pt, lv, fc, ns, cnt), log_zprop, (float(lo), float(hi))


def _run_flat(source, clustering, Q, batched, k, beta, gen, exclude, replace, log_z, algo, chain_length,
              max_steps, lw_mode, extra_stats):
    points = source if isinstance(source, np.ndarray) else _tree_points(source)
    n = points.shape[0]
    excl = _excludes(exclude, Q.shape[0], batched, n)
    results = []
    for b in range(Q.shape[0]):
        kk = _check_k(k, n - excl[b].size, replace)
        clus = clustering(Q[b]) if callable(clustering) else clustering
        pts, arr, log_zprop, (lo, hi) = _flat_setup(source, clus, Q[b], beta, lw_mode)
        ids, sids, cnt, isum = K.flat_kernel(pts, Q[b], beta, kk, algo, *arr[:2], *arr[2:7], *arr[7:],
                                             excl[b], int(replace), chain_length, max_steps, _seed(gen))
        if cnt[4]:
            raise SamplerError(f"flat {'rejection' if algo == 0 else 'MH'}: no accepted draw after {max_steps} "
                               "proposals; use a finer clustering")
        ip = int(cnt[2]) + len(clus) + int(excl[b].size)
        if log_z == "exact":
            lz = _exact_log_z(pts, Q[b], beta, None if isinstance(source, np.ndarray) else source)
            ip += len(source) if not isinstance(source, np.ndarray) else n
        else:
            props = max(int(cnt[0]), 1)
            lz = min(max(log_zprop + math.log(max(isum / props, 1e-300)), lo), hi)
        el = beta * (pts[excl[b]] @ Q[b]) if excl[b].size else np.zeros(0)
        st = {"proposals": int(cnt[0]), "accepted": int(cnt[1]), "inner_products": ip,
              "excluded_hits": int(cnt[3]), "n_clusters": len(clus), "log_z": lz, "log_z_lo": lo, "log_z_hi": hi}
        st.update(extra_stats(clus) if extra_stats else {})
        results.append((ids, _log_q(sids, lz, el, replace), st))
    return _collect(results, batched)


def sample_flat_rejection(source, q, k, *, beta, rng, clustering=None, level="auto", exclude=None, replace=True,
                          log_z="estimate", max_proposals=DEFAULT_MAX_ATTEMPTS):
    """Flat rejection sampling, Eq. 3-5 with per-cluster eps_C (PAPER.md §3).

    ``source`` is an SGTree (``clustering`` a TreeClustering, or ``level`` for C_(level)) or the points array
    (``clustering`` an ArrayClustering). Proposal: cluster C with probability ∝ |C| e^{s_r + eps_C}, a member i
    uniformly; accept with e^{s_i - s_r - eps_C} <= 1 (|s_i - s_r| <= eps_C by Cauchy-Schwarz and the certified
    radius). Each proposal is accepted with probability Z / Z_hi; accepted draws are exact. Cost per draw:
    Z_hi/Z proposals of one inner product each, plus |C| inner products per query. ``level``: "auto" (default,
    :func:`choose_level` per query), "prop2" (:func:`default_level`) or an int.
    """
    beta = check_positive("beta", beta)
    gen = as_rng(rng)
    log_z = _check_log_z(log_z)
    points = source if isinstance(source, np.ndarray) else _tree_points(source)
    Q, batched = _queries(q, points.shape[1])
    max_proposals = check_int("max_proposals", max_proposals, low=1)
    extra = None
    if clustering is None:
        if isinstance(source, np.ndarray):
            raise ValueError("clustering: required when source is a points array")
        if int(source.root) < 0:
            raise ValueError("tree: is empty")
        kk = check_int("k", k, low=0)
        memo = {}
        info = {}

        def clustering(qb):
            L, cl, spent = _start(source, qb, beta, kk, level, memo)
            info.update(level=L, selection_inner_products=spent)
            return cl

        def extra(cl):
            return dict(info)

    r = _run_flat(source, clustering, Q, batched, k, beta, gen, exclude, replace, log_z, 0, 1, max_proposals,
                  "upper", extra)
    if extra is not None:
        sel = r.stats["selection_inner_products"]
        ips = r.stats["inner_products"]
        r.stats["inner_products"] = [a + b for a, b in zip(ips, sel)] if batched else ips + sel
    return r


def _start(tree, qb, beta, k, level, memo, exclude=None):
    """Start clustering for a query: (level, TreeClustering, inner products spent choosing it)."""
    if isinstance(level, str):
        if level == "auto":
            L, cl, sr, ip = choose_level(tree, qb, beta, k, exclude=exclude)
            cl.stats["rep_logits"] = sr
            return L, cl, ip
        if level == "prop2":
            L = default_level(tree, beta, float(np.linalg.norm(qb)))
        else:
            raise ValueError(f"level: expected 'auto', 'prop2' or an int, got {level!r}")
    else:
        L = check_int("level", level)
    if L not in memo:
        memo[L] = level_clustering(tree, L)
    return L, memo[L], 0


# ----------------------------------------------------------------------------------------------------------------
# Alg. 1


def default_level(tree, beta, q_norm=1.0, c=None):
    """Prop. 2's level for gamma = e^{2c}: the largest l with b^l <= c / (beta ||q||), i.e. Prop. 1's per-cluster
    inflation e^{beta b^l} is about e^c (default c = DEFAULT_C = 1.5). Used when ``level="prop2"``."""
    from refimpl.sampling import bounds

    c = DEFAULT_C if c is None else check_positive("c", c)
    return int(bounds.prop2_level(math.exp(2 * c), beta * max(q_norm, 1e-300), float(tree.base)))


def choose_level(tree, q, beta, k, attempt_cost=1.0, exclude=None):
    """Start level minimising the U-shaped cost of Prop. 3 for this query (our default, ``level="auto"``).

    Walks the level clusterings C_(l) from the root's level down (kernel ``level_profile``); the estimated cost of
    level l in inner products is |C_l| + k * attempt_cost * Z_hi(l) / Z_hat(l), where Z_hi/Z_hat (Z_hat =
    sum |C| e^{s_r}, Eq. 7's normaliser, standing in for Z, minus the mass of the ``exclude``d targets, whose draws
    are rejections) estimates the attempts per draw; the walk stops
    before computing the logits of a level whose cluster count alone exceeds the best cost so far. The logits of
    the chosen clusters are reused, so choosing costs only the representatives of the levels walked.
    Returns (level, TreeClustering, rep logits, inner products spent beyond the chosen clusters).
    """
    from refimpl.sampling.clustering import suffix_radii

    pts = _tree_points(tree)
    pt, lv, fc, ns, cnt, maxd = tree_arrays(tree)
    qn = float(np.linalg.norm(q))
    lze = -np.inf
    if exclude is not None and len(exclude):
        se = beta * (pts[np.asarray(exclude, dtype=np.int64)] @ q)
        lze = float(se.max() + np.log(np.exp(se - se.max()).sum()))
    L, nb, nodes, logits, ip = CK.level_profile(pts, q, beta, beta * qn, int(tree.root), int(k), float(attempt_cost),
                                               lze, pt, lv, fc, ns, cnt, maxd, suffix_radii(tree))
    cl = TreeClustering.from_nodes(tree, nodes, np.full(nodes.shape[0], L, np.int64))
    return int(L), cl, logits, int(ip) - int(nb)


def sample_rejection(tree, q, k, *, beta, rng, level="auto", exclude=None, replace=True, log_z="estimate",
                     max_attempts=DEFAULT_MAX_ATTEMPTS, _mode=0, _fallback_after=0):
    """Exact softmax samples by Alg. 1 (hierarchical rejection down the SG tree, PAPER.md §3), errata fixed.

    Start at C_(level) (``level``: "auto" = :func:`choose_level` per query, the default; "prop2" =
    :func:`default_level`; or an int) with the certified per-cluster bound E_C = s_r + beta ||q||
    rho(C); descend level by level with running normalisers, the restart option and the nested self-child rule;
    children's bounds use MAXD and are capped by their parent's so that the restart weight is never negative.
    Each attempt succeeds with probability Z / Z_hi(level) whatever the descent; accepted draws are exact. A draw
    that is not accepted within ``max_attempts`` attempts raises :class:`SamplerError` (never an unaccepted
    proposal). ``stats``: attempts (= proposals), accepted, restarts, inner_products (start reps + children
    logits + excluded ids), distance_evals (radii of the start clusters), start level, n_clusters.

    ``_mode=1`` (radius b^l, no cap, clipped restart) and ``_fallback_after`` (the authors' "return the
    unaccepted proposal after that many restarts") are deliberately broken negative controls for the tests.
    """
    beta = check_positive("beta", beta)
    gen = as_rng(rng)
    log_z = _check_log_z(log_z)
    points = _tree_points(tree)
    Q, batched = _queries(q, points.shape[1])
    n = int(len(tree)) if hasattr(tree, "__len__") else points.shape[0]
    if int(tree.root) < 0:
        raise ValueError("tree: is empty")
    max_attempts = check_int("max_attempts", max_attempts, low=1)
    excl = _excludes(exclude, Q.shape[0], batched, points.shape[0])
    pt, lv, fc, ns, cnt, maxd = tree_arrays(tree)
    base = float(tree.base)
    results = []
    clus_cache = {}
    for b in range(Q.shape[0]):
        kk = _check_k(k, n - excl[b].size, replace)
        cache_size = 1 << int(min(max(math.ceil(math.log2(128 * max(kk, 1))), 10), 18))
        qb = Q[b]
        qn = float(np.linalg.norm(qb))
        L, cl, spent = _start(tree, qb, beta, kk, level, clus_cache, excl[b])
        sr = cl.stats.pop("rep_logits", None)
        if sr is None:
            sr = beta * (points[cl.reps] @ qb)
        if _mode == 1:
            eps = np.where(cl.sizes > 1, beta * qn * base ** L, 0.0)
        else:
            eps = beta * qn * cl.radii
        cE = sr + eps
        ids, sids, c = K.alg1_kernel(points, qb, beta, beta * qn, base, kk, cl.nodes, np.full(len(cl), L, np.int64),
                                     cl.sizes, cE, sr, pt, lv,
                                     fc, ns, cnt, maxd, excl[b], int(replace), max_attempts, int(_mode),
                                     int(_fallback_after), cache_size, _seed(gen))
        if c[4]:
            raise SamplerError(f"sample_rejection: no accepted draw after {max_attempts} attempts at level {L} "
                               "(acceptance ~ exp(-beta rho)); start at a lower level")
        ref = float(np.max(cE))
        log_zhi = ref + math.log(float(np.sum(cl.sizes * np.exp(cE - ref))))
        lo_terms = sr - eps
        log_zlo = float(np.max(lo_terms)) + math.log(float(np.sum(cl.sizes * np.exp(lo_terms - np.max(lo_terms)))))
        ip = int(c[2]) + len(cl) + int(excl[b].size) + spent
        if log_z == "exact":
            lz = _exact_log_z(points, qb, beta, tree)
            ip += n
        else:
            succ = int(c[1]) + int(c[3])
            lz = log_zhi + math.log(max(succ, 1) / max(int(c[0]), 1))
            lz = min(max(lz, log_zlo), log_zhi)
        el = beta * (points[excl[b]] @ qb) if excl[b].size else np.zeros(0)
        st = {"attempts": int(c[0]), "proposals": int(c[0]), "accepted": int(c[1]), "restarts": int(c[5]),
              "inner_products": ip, "distance_evals": int(cl.stats.get("distance_evals", 0)),
              "excluded_hits": int(c[3]), "fallbacks": int(c[6]), "level": L, "n_clusters": len(cl),
              "log_z": lz, "log_z_lo": log_zlo, "log_z_hi": log_zhi}
        results.append((ids, _log_q(sids, lz, el, replace), st))
    return _collect(results, batched)


# ----------------------------------------------------------------------------------------------------------------
# MH


def sample_mh(tree, q, k, *, beta, rng, gamma=4.0, m=None, chain_length=None, tv=0.01, proposal="eq7",
              clustering=None, max_clusters=None, refine=True, max_refine_clusters=20000, exclude=None,
              replace=True, log_z="estimate", max_steps=DEFAULT_MAX_ATTEMPTS):
    """Independent Metropolis-Hastings (Eq. 14) with the cluster proposal (Eq. 7), PAPER.md §3.

    The clustering comes from Alg. 2 (:func:`refimpl.sampling.clustering.find_clustering` with ``gamma``, ``m``,
    ``max_clusters``), by default followed by the certified refinement (``refine=True``) until the certified
    log max P/Q <= log gamma or ``max_refine_clusters`` clusters; or pass ``clustering``. ``proposal="eq7"``:
    Q(i) ∝ e^{s_r(C(i))} (the paper's); ``"upper"``: Q+(i) ∝ e^{s_r + eps_C} (ours; its certified gamma ignores
    low-mass clusters). k independent chains of ``chain_length`` states, each started from Q; the last state of
    each chain is a draw. Default chain length from Eq. 6 for total variation ``tv`` with the *certified* gamma:
    s = 1 + ceil(gamma log(1/tv)). ``stats["tv_bound"]`` = exp(-(s - 1)/gamma_cert) (Eq. 6), the certified bound
    on ||P - law of each draw||_TV. Without replacement, chains are run one after the other, each excluding
    the ids already drawn (P = 0 for them).
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
    points = _tree_points(tree)
    Q, batched = _queries(q, points.shape[1])
    state = {}

    def make(qb):
        if clustering is not None:
            cl = clustering
        else:
            cl = find_clustering(tree, qb, beta=beta, gamma=gamma, m=m, max_clusters=max_clusters, refine=refine,
                                 proposal=proposal, max_refine_clusters=max_refine_clusters)
        cert = cl.stats.get("certificate") if isinstance(cl, TreeClustering) else None
        if cert is None:
            cert = certify(tree, qb, cl, beta=beta)
        s = chain_length if chain_length is not None else cert.chain_length(tv, proposal)
        state["s"], state["cert"] = s, cert
        return cl

    def extra(cl):
        cert = state["cert"]
        return {"chain_length": state["s"], "log_gamma": cert.log_gamma if proposal == "eq7" else cert.log_gamma_upper,
                "tv_bound": cert.mh_tv_bound(state["s"], proposal), "refine_inner_products": cert.inner_products}

    excl = _excludes(exclude, Q.shape[0], batched, points.shape[0])
    results = []
    for b in range(Q.shape[0]):
        cl = make(Q[b])
        if state["s"] > max_steps:
            raise SamplerError(f"sample_mh: chain length {state['s']} from Eq. 6 exceeds max_steps={max_steps}; "
                               "refine the clustering (larger max_refine_clusters) or pass chain_length")
        r = _run_flat(tree, cl, Q[b:b + 1], False, k, beta, gen, excl[b], replace, log_z, 1, state["s"],
                      max(max_steps, state["s"]), proposal, extra)
        r.stats["inner_products"] += state["cert"].inner_products
        results.append((r.ids, r.log_q, r.stats))
    return _collect(results, batched)


def sample_cluster_topk_heuristic(tree, q, k, *, beta, rng, gamma=4.0, m=None, max_clusters=100, n_chains=None,
                                  chain_length=2):
    """The experiments' shortcut (PAPER.md §3 "what the experiments actually ran"). NOT a softmax sampler.

    Alg. 2 with the frontier capped to the ``max_clusters`` closest clusters (Remark 2), ``n_chains`` (default 2k)
    independent MH chains of length 2 with the Eq. 7 proposal, then the k top-scoring distinct targets among the
    chains' final states (fewer if the chains found fewer). The selection by score makes the output biased towards
    the highest logits; ``log_q`` is log Q(i) of the cluster proposal (what a log-Q correction would use), not the
    inclusion probability of the procedure, which has no closed form.
    """
    beta = check_positive("beta", beta)
    gen = as_rng(rng)
    k = check_int("k", k, low=0)
    n_chains = 2 * k if n_chains is None else check_int("n_chains", n_chains, low=1)
    points = _tree_points(tree)
    Q, batched = _queries(q, points.shape[1])
    results = []
    for b in range(Q.shape[0]):
        cl = find_clustering(tree, Q[b], beta=beta, gamma=gamma, m=m, max_clusters=max_clusters)
        r = _run_flat(tree, cl, Q[b:b + 1], False, n_chains, beta, gen, None, True, "estimate", 1, chain_length,
                      DEFAULT_MAX_ATTEMPTS, "eq7", None)
        ids = r.ids
        s = beta * (points[ids] @ Q[b])
        uniq, first = np.unique(ids, return_index=True)
        order = np.argsort(-s[first], kind="stable")[:k]
        sel = uniq[order]
        # log Q(i) of the Eq. 7 proposal: s_rep(C(i)) - log Z_hat
        sr = beta * (points[cl.reps] @ Q[b])
        lz_hat = float(np.max(sr)) + math.log(float(np.sum(cl.sizes * np.exp(sr - np.max(sr)))))
        lab = _labels_of(cl, sel)
        lq = sr[lab] - lz_hat
        st = dict(r.stats)
        st["inner_products"] += len(sel)
        results.append((sel.astype(np.int64), lq, st))
    if not batched:
        return SampleResult(results[0][0], results[0][1], results[0][2])
    return SampleResult([r[0] for r in results], [r[1] for r in results], {"per_query": [r[2] for r in results]})


def _labels_of(cl, ids):
    """Index of the cluster of ``cl`` containing each target id (walks up from the target's node).

    Target i (node v_i) is in cluster (u, L) iff u is v_i or an ancestor of v_i whose child on the path to v_i
    has level < L; the clustering being a partition, the first such cluster found walking up is the one.
    """
    tree = cl.tree
    lv = np.asarray(tree.node_level)
    parent = np.asarray(tree.node_parent)
    pnode = np.asarray(tree.point_node)
    by_node = {}
    for j, (v, L) in enumerate(zip(cl.nodes.tolist(), cl.levels.tolist())):
        by_node.setdefault(v, []).append((L, j))
    out = np.empty(len(ids), np.int64)
    for x, i in enumerate(np.asarray(ids).tolist()):
        v, prev, found = int(pnode[i]), -1, -1
        while v >= 0 and found < 0:
            for L, j in by_node.get(v, ()):
                if prev < 0 or lv[prev] < L:
                    found = j
                    break
            prev, v = v, int(parent[v])
        if found < 0:
            raise RuntimeError(f"clustering does not cover target {i}")
        out[x] = found
    return out


def topk(tree, q, k, **kwargs):
    """Exact maximum inner product search: re-export of :func:`refimpl.index.search.topk` (``refimpl/__init__.py`` maps
    ``topk`` to this module; the implementation lives in refimpl/search.py)."""
    from refimpl.index.search import topk as _topk

    return _topk(tree, q, k, **kwargs)

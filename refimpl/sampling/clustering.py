"""Clusterings for the cluster proposal of Eq. 7: level clusterings, FindClustering (Alg. 2), certified refinement
and per-query certificates (PAPER.md §3).

A clustering is a partition of the live targets. Two kinds:

* :class:`TreeClustering`: clusters ``(v, L)`` of an SG tree (COMMON.md data model): ``{p_v}`` plus the subtrees of
  the children of ``v`` with level ``< L``. Built by :func:`level_clustering` (C_(L)), :func:`find_clustering`
  (Alg. 2) or :func:`refine_clustering` (certified, best first).
* :class:`ArrayClustering`: any partition given as arrays (labels and representatives), for the flat samplers
  without a tree.

Both carry ``reps`` (target ids), ``sizes`` and ``radii`` with ``radii[j] >= max_{i in C_j} ||t_i - t_rep||``
(PAPER.md §2 erratum: the true radius, MAXD-based for trees, never b^L).

Certificates (:func:`certify`, PAPER.md §3 "certified form"): with ``eps_C = beta ||q|| rho(C)``,
``Z_lo = sum |C| e^{s_r - eps_C} <= Z <= Z_hi = sum |C| e^{s_r + eps_C}``; for the proposal of Eq. 7
(``Q(i) ∝ e^{s_r(C(i))}``) ``max P/Q <= e^{max eps_C} Z_hat / Z_lo`` (``Z_hat = sum |C| e^{s_r}``); for the
"upper" proposal ``Q+(i) ∝ e^{s_r + eps_C}`` used by flat rejection, ``max P/Q+ <= Z_hi / Z_lo``. The TV distance
between P and a proposal with ``max P/Q <= gamma`` is ``<= 1 - 1/gamma``, and independent MH started from Q is
within ``exp(-(s - 1)/gamma)`` of P after s states (Eq. 6).
"""
from __future__ import annotations

import heapq
import math
import weakref
from dataclasses import dataclass, field

import numpy as np

from refimpl.sampling import _cluster_kernels as K
from refimpl._validate import check_int, check_matrix, check_positive, check_vector

__all__ = [
    "TreeClustering",
    "ArrayClustering",
    "Certificate",
    "level_clustering",
    "find_clustering",
    "refine_clustering",
    "certify",
    "tree_arrays",
]

PROPOSALS = ("eq7", "upper")


def tree_arrays(tree):
    """The node arrays of ``tree`` in the order the kernels take them (int64/float64, no copy when possible)."""
    n = int(tree.n_nodes)
    i64 = lambda a: np.ascontiguousarray(np.asarray(a)[:n], dtype=np.int64)  # noqa: E731
    return (i64(tree.node_point), i64(tree.node_level), i64(tree.node_first_child), i64(tree.node_next_sibling),
            i64(tree.node_count), np.ascontiguousarray(np.asarray(tree.node_maxd)[:n], dtype=np.float64))


def _pdist(tree):
    return np.ascontiguousarray(np.asarray(tree.node_pdist)[: int(tree.n_nodes)], dtype=np.float64)


_SUF_CACHE = weakref.WeakKeyDictionary()


def _fingerprint(tree):
    """Cheap change detector: every SGTree mutation (insert/remove/update_points/rebuild/maintain) changes the node
    count, the root, the target count or the exact parent distances / radii, hence one of these numbers."""
    n = int(tree.n_nodes)
    return (n, int(tree.root), int(getattr(tree, "n_targets", 0)), id(tree.node_maxd), id(tree.node_pdist),
            float(np.sum(tree.node_maxd[:n])), float(np.sum(tree.node_pdist[:n])))


def suffix_radii(tree):
    """Per-node suffix maxima of PDIST + MAXD over child lists (:func:`refimpl.sampling._cluster_kernels.suffix_radii`).

    Query-independent; cached per tree and recomputed whenever the tree's arrays change (detected by a
    fingerprint of sums over the node arrays: O(N) additions instead of the O(N) pass itself on every query)."""
    fp = _fingerprint(tree)
    try:
        hit = _SUF_CACHE.get(tree)
    except TypeError:
        hit = None
    if hit is not None and hit[0] == fp:
        return hit[1]
    pt, lv, fc, ns, cnt, maxd = tree_arrays(tree)
    suf = K.suffix_radii(int(tree.n_nodes), fc, ns, _pdist(tree), maxd)
    try:
        _SUF_CACHE[tree] = (fp, suf)
    except TypeError:
        pass
    return suf


def _tree_points(tree):
    return np.ascontiguousarray(tree.points, dtype=np.float64)


@dataclass
class TreeClustering:
    """Clusters ``(nodes[j], levels[j])`` of an SG tree; ``reps`` target ids, ``sizes``, certified ``radii``."""

    tree: object
    nodes: np.ndarray
    levels: np.ndarray
    reps: np.ndarray
    sizes: np.ndarray
    radii: np.ndarray
    stats: dict = field(default_factory=dict)

    def __len__(self):
        return int(self.nodes.shape[0])

    @classmethod
    def from_nodes(cls, tree, nodes, levels, stats=None):
        nodes = np.ascontiguousarray(nodes, dtype=np.int64)
        levels = np.ascontiguousarray(levels, dtype=np.int64)
        pt, lv, fc, ns, cnt, maxd = tree_arrays(tree)
        sizes, radii, nd = K.cluster_info(suffix_radii(tree), nodes, levels, pt, lv, fc, ns, cnt, maxd)
        st = dict(stats or {})
        return cls(tree, nodes, levels, pt[nodes], sizes, radii, st)

    def proposal_arrays(self):
        """(cnodes, clevels, csizes, mptr, members) for the flat kernels (tree mode: empty mptr)."""
        e = np.zeros(0, np.int64)
        return self.nodes, self.levels, self.sizes, e, e

    def members(self, j):
        """Target ids of cluster j (walks the subtree; for tests and small clusters)."""
        pt, lv, fc, ns, cnt, _ = tree_arrays(self.tree)
        v, L = int(self.nodes[j]), int(self.levels[j])
        return np.array([K._member(pt, lv, fc, ns, cnt, v, L, u) for u in range(int(self.sizes[j]))], np.int64)


@dataclass
class ArrayClustering:
    """A partition of the rows of ``points`` given by ``labels``; representative of each cluster (default: its
    first member); exact radii. ``members[mptr[j]:mptr[j+1]]`` are the members of cluster j."""

    reps: np.ndarray
    sizes: np.ndarray
    radii: np.ndarray
    mptr: np.ndarray
    members: np.ndarray

    def __len__(self):
        return int(self.reps.shape[0])

    @classmethod
    def from_labels(cls, points, labels, reps=None):
        points = check_matrix("points", points)
        labels = np.asarray(labels)
        if labels.shape != (points.shape[0],):
            raise ValueError(f"labels: expected shape ({points.shape[0]},), got {labels.shape}")
        if not np.issubdtype(labels.dtype, np.integer):
            raise TypeError(f"labels: expected integers, got dtype {labels.dtype}")
        uniq, inv = np.unique(labels, return_inverse=True)
        order = np.argsort(inv, kind="stable")
        sizes = np.bincount(inv, minlength=uniq.size).astype(np.int64)
        mptr = np.zeros(uniq.size + 1, np.int64)
        np.cumsum(sizes, out=mptr[1:])
        members = order.astype(np.int64)
        if reps is None:
            reps = members[mptr[:-1]]
        else:
            reps = np.asarray(reps, dtype=np.int64)
            if reps.shape != (uniq.size,):
                raise ValueError(f"reps: expected one representative per cluster ({uniq.size}), got {reps.shape}")
            if np.any(inv[reps] != np.arange(uniq.size)):
                raise ValueError("reps: each representative must belong to its cluster (clusters in sorted label order)")
        d = np.linalg.norm(points[members] - points[np.repeat(reps, sizes)], axis=1)
        radii = np.zeros(uniq.size)
        np.maximum.at(radii, np.repeat(np.arange(uniq.size), sizes), d)
        return cls(reps, sizes, radii, mptr, members)

    def proposal_arrays(self):
        e = np.zeros(len(self), np.int64)
        return e, e, self.sizes, self.mptr, self.members

    def members_of(self, j):
        return self.members[self.mptr[j]:self.mptr[j + 1]]


def level_clustering(tree, level):
    """C_(level) of PAPER.md §2 as a :class:`TreeClustering` (one cluster per node with node_level >= level)."""
    level = check_int("level", level)
    pt, lv, fc, ns, cnt, maxd = tree_arrays(tree)
    nodes, _ = K.level_cluster_nodes(int(tree.root), level, lv, fc, ns, cnt)
    return TreeClustering.from_nodes(tree, nodes, np.full(nodes.shape[0], level, np.int64))


# ----------------------------------------------------------------------------------------------------------------
# certificates


@dataclass
class Certificate:
    """Certified bounds of a clustering for one query (all logs natural).

    log_z_lo <= log Z <= log_z_hi; log_gamma >= log max P/Q for Eq. 7's proposal; log_gamma_upper >= log max P/Q+
    for the upper proposal; tv_bound >= ||P - Q||_TV (Eq. 7), tv_bound_upper likewise for Q+.
    """

    log_z_lo: float
    log_z_hi: float
    log_z_hat: float
    log_gamma: float
    log_gamma_upper: float
    tv_bound: float
    tv_bound_upper: float
    n_clusters: int
    inner_products: int

    def gamma(self, proposal="eq7"):
        return math.exp(self.log_gamma if proposal == "eq7" else self.log_gamma_upper)

    def mh_tv_bound(self, s, proposal="eq7"):
        """Eq. 6: ||P - Q_MH||_TV <= exp(-(s - 1)/gamma) after a chain of s states started from Q."""
        return math.exp(-(s - 1) / self.gamma(proposal))

    def chain_length(self, tv, proposal="eq7"):
        """Smallest s with exp(-(s - 1)/gamma) <= tv (Eq. 6: s >= 1 + gamma log(1/tv))."""
        return 1 + max(0, math.ceil(self.gamma(proposal) * math.log(1.0 / tv) - 1e-12))


def _certificate(rep_logits, sizes, eps, inner_products):
    from refimpl.sampling import bounds

    lo, hi = bounds.log_partition_bounds(rep_logits, sizes, eps)
    lg = float(bounds.certified_log_max_ratio(rep_logits, sizes, eps))
    lz_hat = float(_logsumexp(rep_logits + np.log(sizes)))
    lg_up = float(hi - lo)
    return Certificate(float(lo), float(hi), lz_hat, lg, lg_up, float(-math.expm1(-lg)), float(-math.expm1(-lg_up)),
                       int(len(sizes)), int(inner_products))


def _logsumexp(a):
    m = np.max(a)
    return m + np.log(np.sum(np.exp(a - m)))


def _query(q, dim):
    return check_vector("q", q, size=dim)


def certify(tree, q, clustering, *, beta):
    """Certificate (:class:`Certificate`) of ``clustering`` (a TreeClustering or ArrayClustering) for query ``q``.

    Uses refimpl.sampling.bounds (cluster_eps, log_partition_bounds, certified_log_max_ratio) with eps_C = beta ||q|| rho(C).
    ``tree`` may be an SGTree or the points array (for an ArrayClustering). Cost: |clustering| inner products.
    """
    from refimpl.sampling import bounds

    beta = check_positive("beta", beta)
    points = tree if isinstance(tree, np.ndarray) else _tree_points(tree)
    q = _query(q, points.shape[1])
    s = beta * (points[clustering.reps] @ q)
    eps = np.asarray(bounds.cluster_eps(beta, float(np.linalg.norm(q)), clustering.radii), dtype=np.float64)
    return _certificate(s, clustering.sizes.astype(np.float64), eps, len(clustering))


# ----------------------------------------------------------------------------------------------------------------
# Alg. 2 and the certified refinement


def default_m(start_level, base):
    """Our default deepest level for Alg. 2 [unstated in the paper for a general base]: 16x finer than the start,
    m = start - ceil(log_b 16)."""
    return int(start_level - math.ceil(math.log(16.0) / math.log(base)))


def find_clustering(tree, q, *, beta, gamma, m=None, max_clusters=None, refine=False, proposal="eq7",
                    max_refine_clusters=None):
    """FindClustering (Alg. 2, PAPER.md §3) with the union fix of line 13.

    Start level l from Prop. 2 (``bounds.prop2_level(gamma, beta ||q||, base)``: the paper's rule with the query
    norm folded into beta, identical for unit-norm queries); for k = l, ..., m + 1 the frontier's clusters are
    replaced by their children at level k - 1 and a child F with ||q - t_F|| > b^k + b^m is final. Returns
    output U F_m as a :class:`TreeClustering`. ``max_clusters`` caps the frontier (Remark 2; the excess is finalised,
    so the result is always a partition). ``m`` defaults to :func:`default_m`.

    Prop. 4 claims max P/Q <= gamma for the result; that is not certified here (the paper's radius is b^k).
    With ``refine=True`` the result is then refined by :func:`refine_clustering` until the *certified*
    log max P/Q (for ``proposal``) is <= log gamma or ``max_refine_clusters`` is reached. The certificate of the
    result is in ``result.stats["certificate"]`` when refined; call :func:`certify` otherwise.
    """
    from refimpl.sampling import bounds

    beta = check_positive("beta", beta)
    gamma = check_positive("gamma", gamma)
    if gamma <= 1.0:
        raise ValueError(f"gamma: must be > 1, got {gamma}")
    points = _tree_points(tree)
    q = _query(q, points.shape[1])
    if int(tree.root) < 0:
        raise ValueError("tree: is empty")
    qn = float(np.linalg.norm(q))
    base = float(tree.base)
    level = int(bounds.prop2_level(gamma, beta * max(qn, 1e-300), base))
    m = default_m(level, base) if m is None else check_int("m", m)
    mc = 0 if max_clusters is None else check_int("max_clusters", max_clusters, low=1)
    pt, lv, fc, ns, cnt, maxd = tree_arrays(tree)
    nodes, levels, nd = K.find_clustering_kernel(points, q, int(tree.root), level, m, base, mc, pt, lv, fc, ns, cnt)
    cl = TreeClustering.from_nodes(tree, nodes, levels, {"distance_evals": int(nd), "start_level": level, "m": m})
    if refine:
        cl = refine_clustering(tree, q, cl, beta=beta, gamma=gamma, proposal=proposal,
                               max_clusters=max_refine_clusters)
    return cl


def _split(tree_pts, arrs, v, L):
    """Children of cluster (v, L) at the next occupied level: [(v, Lc)] + [(c, Lc) for c at level Lc], or None."""
    pt, lv, fc, ns, cnt, maxd = arrs
    c = fc[v]
    while c != -1 and lv[c] >= L:
        c = ns[c]
    if c == -1:
        return None
    Lc = int(lv[c])
    out = [v]
    while c != -1 and lv[c] == Lc:
        out.append(int(c))
        c = ns[c]
    return np.array(out, np.int64), Lc


def refine_clustering(tree, q, clustering, *, beta, gamma, proposal="eq7", max_clusters=None):
    """Certified refinement (ours, PAPER.md §3 certified form): split, best first, the clusters that contribute most
    to the certified bound until log max P/Q <= log gamma (for ``proposal``) or ``max_clusters`` clusters.

    ``proposal="eq7"``: the bound is max eps_C + log Z_hat/Z_lo, so the cluster with the largest eps_C is split
    first (every cluster must end with eps_C <= log gamma). ``proposal="upper"``: the bound is log Z_hi/Z_lo and
    the cluster with the largest |C| e^{s_r} (e^{eps_C} - e^{-eps_C}) is split first. A split replaces (v, L) by its
    children at the next occupied level (the nested self-child (v, Lc) and the children at level Lc).
    Returns a :class:`TreeClustering` whose ``stats["certificate"]`` is the final :class:`Certificate` and
    ``stats["certified"]`` whether the target was reached.
    """
    from refimpl.sampling import bounds

    beta = check_positive("beta", beta)
    gamma = check_positive("gamma", gamma)
    if proposal not in PROPOSALS:
        raise ValueError(f"proposal: expected one of {PROPOSALS}, got {proposal!r}")
    if max_clusters is None:
        max_clusters = 1 << 62
    max_clusters = check_int("max_clusters", max_clusters, low=1)
    points = _tree_points(tree)
    q = _query(q, points.shape[1])
    qn = float(np.linalg.norm(q))
    arrs = tree_arrays(tree)
    pt, lv, fc, ns, cnt, maxd = arrs
    log_g = math.log(gamma)
    nodes = list(map(int, clustering.nodes))
    levels = list(map(int, clustering.levels))
    s = list(beta * (points[clustering.reps] @ q))
    sizes = list(map(int, clustering.sizes))
    eps = list(np.asarray(bounds.cluster_eps(beta, qn, clustering.radii), dtype=np.float64))
    ip = len(nodes)
    nd = 0
    alive = [True] * len(nodes)
    ref = max(si + ei for si, ei in zip(s, eps))

    def prio(j):
        if proposal == "eq7":
            return -eps[j]
        return -sizes[j] * math.exp(s[j] - ref) * (math.exp(eps[j]) - math.exp(-eps[j]))

    def sums():
        sa, na, ea = np.array(s), np.array(sizes, float), np.array(eps)
        idx = np.flatnonzero(alive)
        return sa[idx], na[idx], ea[idx]

    heap = [(prio(j), j) for j in range(len(nodes)) if eps[j] > 0]
    heapq.heapify(heap)
    n_alive = len(nodes)
    zh = sum(sizes[j] * math.exp(s[j] - ref) for j in range(len(nodes)))
    zlo = sum(sizes[j] * math.exp(s[j] - eps[j] - ref) for j in range(len(nodes)))
    zhi = sum(sizes[j] * math.exp(s[j] + eps[j] - ref) for j in range(len(nodes)))

    def bound():
        if proposal == "eq7":
            me = -heap[0][0] if heap else 0.0
            return me + math.log(max(zh, 1e-300)) - math.log(max(zlo, 1e-300))
        return math.log(max(zhi, 1e-300)) - math.log(max(zlo, 1e-300))

    splits = 0
    while heap and bound() > log_g and n_alive < max_clusters:
        _, j = heapq.heappop(heap)
        sp = _split(points, arrs, nodes[j], levels[j])
        if sp is None:
            continue
        kids, Lc = sp
        ks, kr, dd = K.cluster_info(suffix_radii(tree), kids, np.full(kids.shape[0], Lc, np.int64), pt, lv, fc, ns, cnt,
                                    maxd)
        kl = np.empty(kids.shape[0])
        kl[0] = s[j]
        if kids.shape[0] > 1:
            kl[1:] = beta * (points[pt[kids[1:]]] @ q)
            ip += kids.shape[0] - 1
        ke = np.asarray(bounds.cluster_eps(beta, qn, kr), dtype=np.float64)
        alive[j] = False
        zh -= sizes[j] * math.exp(s[j] - ref)
        zlo -= sizes[j] * math.exp(s[j] - eps[j] - ref)
        zhi -= sizes[j] * math.exp(s[j] + eps[j] - ref)
        for x in range(kids.shape[0]):
            nodes.append(int(kids[x]))
            levels.append(Lc)
            s.append(float(kl[x]))
            sizes.append(int(ks[x]))
            eps.append(float(ke[x]))
            alive.append(True)
            jj = len(nodes) - 1
            zh += sizes[jj] * math.exp(s[jj] - ref)
            zlo += sizes[jj] * math.exp(s[jj] - eps[jj] - ref)
            zhi += sizes[jj] * math.exp(s[jj] + eps[jj] - ref)
            if eps[jj] > 0:
                heapq.heappush(heap, (prio(jj), jj))
        n_alive += kids.shape[0] - 1
        splits += 1
        if splits % 64 == 0:  # recompute the running sums exactly (cancellation)
            sa, na, ea = sums()
            zh = float(np.sum(na * np.exp(sa - ref)))
            zlo = float(np.sum(na * np.exp(sa - ea - ref)))
            zhi = float(np.sum(na * np.exp(sa + ea - ref)))
    idx = np.flatnonzero(alive)
    st = dict(clustering.stats)
    st["distance_evals"] = st.get("distance_evals", 0) + nd
    out = TreeClustering.from_nodes(tree, np.array(nodes, np.int64)[idx], np.array(levels, np.int64)[idx], st)
    sa, na, ea = sums()
    cert = _certificate(sa, na, ea, ip)
    out.stats.update(certificate=cert, splits=splits, inner_products=ip,
                     certified=(cert.log_gamma if proposal == "eq7" else cert.log_gamma_upper) <= log_g + 1e-9)
    return out

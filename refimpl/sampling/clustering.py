"""Clusterings for the cluster proposal of Eq. 7: C_(l), FindClustering (Alg. 2), certified refinement, per-query
certificates and the cluster of each target (paper §3).

Every clustering is a :class:`refimpl.index.Clustering`: clusters (v, L) of an SG tree (stamped with the tree's
``version``; a clustering is refused on a tree of another version) or a partition given as arrays. Both carry
``reps``, ``sizes`` and ``radii`` with ``radii[j] >= max_{i in C_j} ||t_i - t_rep||`` (the true radius, never b^L).

Certificates (:func:`certify`): with ``eps_C = beta ||q|| rho(C)``,
``Z_lo = sum |C| e^{s_r - eps_C} <= Z <= Z_hi = sum |C| e^{s_r + eps_C}``; for the proposal of Eq. 7
(``Q(i) ∝ e^{s_r(C(i))}``) ``max P/Q <= e^{max eps_C} Z_hat / Z_lo`` (``Z_hat = sum |C| e^{s_r}``); for the
"upper" proposal ``Q+(i) ∝ e^{s_r + eps_C}`` used by flat rejection, ``max P/Q+ <= Z_hi / Z_lo``. The TV distance
between P and a proposal with ``max P/Q <= gamma`` is ``<= 1 - 1/gamma``, and independent MH started from Q is
within ``exp(-(s - 1)/gamma)`` of P after s states (Eq. 6).

Contents: :func:`suffix_radii` (per tree version), :func:`tree_clustering`, :func:`partition_clustering`,
:func:`level_clustering`, :func:`cluster_members`, :func:`cluster_labels`, :class:`Certificate`, :func:`certify`,
:func:`find_clustering` (Alg. 2), :func:`refine_clustering`.
"""
from __future__ import annotations

import math
import weakref
from dataclasses import dataclass

import numpy as np

from refimpl._validate import check_int, check_matrix, check_positive, check_vector
from refimpl.index import Clustering
from refimpl.sampling import _cluster_kernels as K
from refimpl.sampling import bounds

__all__ = [
    "Clustering",
    "Certificate",
    "suffix_radii",
    "tree_clustering",
    "partition_clustering",
    "level_clustering",
    "cluster_members",
    "cluster_labels",
    "certify",
    "find_clustering",
    "refine_clustering",
    "default_m",
    "logits",
]

PROPOSALS = ("eq7", "upper")

# per tree: {"version": v, "suf": suffix radii or None, "level": {L: Clustering}}; an entry of an older version is
# dropped on first use, so nothing derived from a previous tree state is ever returned
_CACHE: "weakref.WeakKeyDictionary" = weakref.WeakKeyDictionary()


def _tree_cache(tree) -> dict:
    version = tree.version
    entry = _CACHE.get(tree)
    if entry is None or entry["version"] != version:
        entry = {"version": version, "suf": None, "level": {}}
        _CACHE[tree] = entry
    return entry


def _check_tree(tree, name="tree"):
    if not (hasattr(tree, "arrays") and hasattr(tree, "version")):
        raise TypeError(f"{name}: expected an SGTree, got {type(tree).__name__}")
    if tree.root < 0:
        raise ValueError(f"{name}: is empty")
    return tree


def _check_clustering(clustering, tree=None, name="clustering"):
    """``clustering`` must be a Clustering; of ``tree``'s current version when ``tree`` is an SGTree."""
    if not isinstance(clustering, Clustering):
        raise TypeError(f"{name}: expected a refimpl.index.Clustering, got {type(clustering).__name__}")
    if tree is not None:
        clustering.check_tree(tree, name)
    return clustering


def logits(points, ids, q, beta) -> np.ndarray:
    """beta <q, t_i> for the rows ``ids`` of ``points`` (float32 rows are promoted: float64 accumulation)."""
    rows = points[ids]
    return beta * (rows.astype(np.float64, copy=False) @ q)


def suffix_radii(tree) -> np.ndarray:
    """Per node c: the maximum of PDIST + MAXD over c and the siblings after it (kernel ``suffix_radii``).

    rho(v, L) = min(MAXD(v), suf[first child of v below L]). Query-independent: computed once per tree
    ``version`` (O(N)) and cached; every mutation gives the tree a new version, so a stale value is never used."""
    entry = _tree_cache(tree)
    if entry["suf"] is None:
        entry["suf"] = K.suffix_radii(tree.arrays())
    return entry["suf"]


def tree_clustering(tree, nodes, levels, stats=None) -> Clustering:
    """The clustering with clusters (nodes[j], levels[j]) of ``tree`` (sizes, certified radii, version stamp).

    Parameters
    ----------
    tree : SGTree
    nodes, levels : (C,) int
        Tree nodes and the cluster levels; the pairs must partition the live targets (not checked here; see
        :func:`cluster_labels`).
    """
    nodes = np.ascontiguousarray(nodes, dtype=np.int64)
    levels = np.ascontiguousarray(levels, dtype=np.int64)
    sizes, radii, _ = K.cluster_info(tree.arrays(), suffix_radii(tree), nodes, levels)
    lv = int(levels[0]) if levels.size and np.all(levels == levels[0]) else None
    return Clustering(lv, nodes, tree.node_point[nodes].astype(np.int64), sizes, radii, levels=levels,
                      tree_version=tree.version, stats=dict(stats or {}))


def partition_clustering(points, labels, reps=None) -> Clustering:
    """A partition of the rows of ``points`` given by integer ``labels`` (clusters in sorted label order).

    Parameters
    ----------
    points : (N, D) float array
    labels : (N,) int array
    reps : (C,) int array, optional
        One representative per cluster, a member of it (default: its first member).

    Returns a :class:`Clustering` with exact radii max_{i in C} ||t_i - t_rep(C)|| and the members listed.
    """
    points = check_matrix("points", points)
    labels = np.asarray(labels)
    if labels.shape != (points.shape[0],):
        raise ValueError(f"labels: expected shape ({points.shape[0]},), got {labels.shape}")
    if not np.issubdtype(labels.dtype, np.integer):
        raise TypeError(f"labels: expected integers, got dtype {labels.dtype}")
    uniq, inv = np.unique(labels, return_inverse=True)
    members = np.argsort(inv, kind="stable").astype(np.int64)
    sizes = np.bincount(inv, minlength=uniq.size).astype(np.int64)
    mptr = np.zeros(uniq.size + 1, np.int64)
    np.cumsum(sizes, out=mptr[1:])
    if reps is None:
        reps = members[mptr[:-1]]
    else:
        reps = np.asarray(reps)
        if reps.shape != (uniq.size,):
            raise ValueError(f"reps: expected one representative per cluster ({uniq.size}), got {reps.shape}")
        if not np.issubdtype(reps.dtype, np.integer):
            raise TypeError(f"reps: expected integers, got dtype {reps.dtype}")
        reps = reps.astype(np.int64)
        if np.any((reps < 0) | (reps >= points.shape[0])) or np.any(inv[reps] != np.arange(uniq.size)):
            raise ValueError("reps: each representative must belong to its cluster (clusters in sorted label order)")
    d = np.linalg.norm(points[members] - points[np.repeat(reps, sizes)], axis=1)
    radii = np.zeros(uniq.size)
    np.maximum.at(radii, np.repeat(np.arange(uniq.size), sizes), d)
    none = np.full(uniq.size, -1, np.int64)
    return Clustering(None, none, reps, sizes, radii, levels=none, mptr=mptr, members=members)


def level_clustering(tree, level) -> Clustering:
    """C_(level) (one cluster (v, level) per node with level >= level, the root always): ``tree.clustering(level)``,
    cached per tree version."""
    level = check_int("level", level, low=-(1 << 40), high=1 << 40)
    entry = _tree_cache(tree)
    cl = entry["level"].get(level)
    if cl is None:
        cl = tree.clustering(level)
        if cl.tree_version is None:
            cl.tree_version = tree.version
        entry["level"][level] = cl
    return cl


def cluster_members(tree, clustering, j) -> np.ndarray:
    """Target ids of cluster ``j`` of ``clustering`` (``tree`` an SGTree, or None for an array partition)."""
    if clustering.is_partition:
        return clustering.members[clustering.mptr[j]:clustering.mptr[j + 1]]
    _check_clustering(clustering, tree)
    T = tree.arrays()
    v, L = int(clustering.nodes[j]), int(clustering.levels[j])
    return np.array([K._member(T, v, L, u) for u in range(int(clustering.sizes[j]))], np.int64)


def cluster_labels(tree, clustering) -> np.ndarray:
    """The cluster of each target: for every id ``< tree.n_targets`` (``len(points)`` for an array partition) the
    index of its cluster in ``clustering``, -1 for removed targets.

    Target i (node v_i) lies in cluster (u, L) iff u = v_i, or u is an ancestor of v_i whose child on the path to
    v_i has level < L; the clustering being a partition (each node at most once), the first such pair found
    walking up is its cluster. Vectorised over targets (one step up the tree per round).

    Parameters
    ----------
    tree : SGTree, or the (N, D) points of an array partition
    clustering : Clustering of ``tree`` at its current version
    """
    _check_clustering(clustering, None)
    if clustering.is_partition:
        out = np.full(np.asarray(tree).shape[0], -1, np.int64)
        out[clustering.members] = np.repeat(np.arange(len(clustering)), clustering.sizes)
        return out
    _check_clustering(clustering, tree)
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
    top = np.iinfo(np.int64).max
    prev_level = np.full(n, top, dtype=np.int64)  # no child yet: the target's own node always qualifies
    while todo.any():
        idx = np.flatnonzero(todo)
        v = cur[idx]
        L = clev[v]
        ok = (L != none) & ((prev_level[idx] < L) | (prev_level[idx] == top))
        out[idx[ok]] = cidx[v[ok]]
        todo[idx[ok]] = False
        rest = idx[~ok]
        prev_level[rest] = tree.node_level[cur[rest]]
        cur[rest] = tree.node_parent[cur[rest]]
        if rest.size and (cur[rest] < 0).any():
            raise ValueError("clustering: does not cover every live target of the tree")
    return out


# ----------------------------------------------------------------------------------------------------------------
# certificates


@dataclass
class Certificate:
    """Certified bounds of a clustering for one query (all logs natural).

    log_z_lo <= log Z <= log_z_hi; log_gamma >= log max P/Q for Eq. 7's proposal; log_gamma_upper >= log max P/Q+
    for the upper proposal; tv_bound >= ||P - Q||_TV (Eq. 7), tv_bound_upper likewise for Q+. ``tree_version``:
    the version of the tree it certifies (None for an array partition).
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
    tree_version: int | None = None

    def gamma(self, proposal="eq7"):
        return math.exp(self.log_gamma if proposal == "eq7" else self.log_gamma_upper)

    def mh_tv_bound(self, s, proposal="eq7"):
        """Eq. 6: ||P - Q_MH||_TV <= exp(-(s - 1)/gamma) after a chain of s states started from Q."""
        return math.exp(-(s - 1) / self.gamma(proposal))

    def chain_length(self, tv, proposal="eq7"):
        """Smallest s with exp(-(s - 1)/gamma) <= tv (Eq. 6: s >= 1 + gamma log(1/tv))."""
        return 1 + max(0, math.ceil(self.gamma(proposal) * math.log(1.0 / tv) - 1e-12))


def _certificate(rep_logits, sizes, eps, inner_products, tree_version):
    lo, hi = bounds.log_partition_bounds(rep_logits, sizes, eps)
    lg = float(bounds.certified_log_max_ratio(rep_logits, sizes, eps))
    lz_hat = float(bounds.log_proposal_normalizer(rep_logits, sizes))
    lg_up = float(hi - lo)
    return Certificate(float(lo), float(hi), lz_hat, lg, lg_up, float(-math.expm1(-lg)), float(-math.expm1(-lg_up)),
                       int(len(sizes)), int(inner_products), tree_version)


def _source(tree, clustering):
    """(points, tree or None) for a clustering: an SGTree with a clustering of its version, or the points array
    with an array partition."""
    if isinstance(tree, np.ndarray):
        if not clustering.is_partition:
            raise TypeError("tree: this clustering is of an SGTree; pass that tree, not a points array")
        return check_matrix("tree", tree), None
    _check_tree(tree)
    _check_clustering(clustering, tree)
    return tree.points, tree


def certify(tree, q, clustering, *, beta) -> Certificate:
    """Certificate (:class:`Certificate`) of ``clustering`` for query ``q`` (paper §3, certified form of Prop. 1/4).

    eps_C = beta ||q|| rho(C) (bounds.cluster_eps); (log Z_lo, log Z_hi) by bounds.log_partition_bounds; log gamma
    by bounds.certified_log_max_ratio.

    Parameters
    ----------
    tree : SGTree, or the (N, D) points of an array partition
    q : (D,) float array
    clustering : Clustering of ``tree`` at its current version (ValueError otherwise)
    beta : float > 0

    Cost: |clustering| inner products.
    """
    beta = check_positive("beta", beta)
    _check_clustering(clustering)
    points, t = _source(tree, clustering)
    q = check_vector("q", q, size=points.shape[1])
    s = logits(points, clustering.reps, q, beta)
    eps = bounds.cluster_eps(beta, float(np.linalg.norm(q)), clustering.radii)
    return _certificate(s, clustering.sizes.astype(np.float64), eps, len(clustering),
                        None if t is None else t.version)


# ----------------------------------------------------------------------------------------------------------------
# Alg. 2 and the certified refinement


def default_m(start_level, base):
    """Our default deepest level for Alg. 2 [unstated in the paper for a general base]: 16x finer than the start,
    m = start - ceil(log_b 16)."""
    return int(start_level - math.ceil(math.log(16.0) / math.log(base)))


def find_clustering(tree, q, *, beta, gamma, m=None, max_clusters=None, refine=False, proposal="eq7",
                    max_refine_clusters=None) -> Clustering:
    """FindClustering (Alg. 2) with the union fix of line 13.

    Start level l from Prop. 2 (``bounds.prop2_level(gamma, beta ||q||, base)``: the paper's rule with the query
    norm folded into beta, identical for unit-norm queries); for k = l, ..., m + 1 the frontier's clusters are
    replaced by their children at level k - 1 and a child F with ||q - t_F|| > b^k + b^m is final.

    Parameters
    ----------
    tree : SGTree
    q : (D,) float array
    beta, gamma : float (gamma > 1)
    m : int, optional
        Deepest level (default :func:`default_m`).
    max_clusters : int, optional
        Caps the frontier (Remark 2; the excess is finalised, so the result is always a partition).
    refine : bool
        Then refine (:func:`refine_clustering`) until the *certified* log max P/Q (for ``proposal``) is
        <= log gamma or ``max_refine_clusters`` clusters. Prop. 4's max P/Q <= gamma is not certified otherwise
        (its radius is b^k).

    Returns the clustering (stamped with the tree's version); its certificate is in ``stats["certificate"]``
    when refined (call :func:`certify` otherwise).
    """
    beta = check_positive("beta", beta)
    gamma = check_positive("gamma", gamma)
    if gamma <= 1.0:
        raise ValueError(f"gamma: must be > 1, got {gamma}")
    _check_tree(tree)
    T = tree.arrays()
    q = check_vector("q", q, size=T.points.shape[1])
    qn = float(np.linalg.norm(q))
    base = float(tree.base)
    level = int(bounds.prop2_level(gamma, beta * max(qn, 1e-300), base))
    level = min(level, int(tree.node_level[tree.root]) + 1)  # every level above holds the single cluster {root}
    m = default_m(level, base) if m is None else check_int("m", m, low=-(1 << 40), high=level)
    mc = 0 if max_clusters is None else check_int("max_clusters", max_clusters, low=1)
    start = level_clustering(tree, level).nodes
    nodes, levels, _, nd = K.find_clustering_kernel(T, q, start, level, m, mc)
    cl = tree_clustering(tree, nodes, levels, {"distance_evals": int(nd), "start_level": level, "m": m})
    if refine:
        cl = refine_clustering(tree, q, cl, beta=beta, gamma=gamma, proposal=proposal,
                               max_clusters=max_refine_clusters)
    return cl


def refine_clustering(tree, q, clustering, *, beta, gamma, proposal="eq7", max_clusters=None) -> Clustering:
    """Certified refinement (ours; certified form of Prop. 4): split, best first, the clusters that contribute most
    to the certified bound until log max P/Q <= log gamma (for ``proposal``) or ``max_clusters`` clusters.

    ``proposal="eq7"``: the bound is max eps_C + log Z_hat/Z_lo, so the cluster with the largest eps_C is split
    first (every cluster must end with eps_C <= log gamma). ``proposal="upper"``: the bound is log Z_hi/Z_lo and
    the cluster with the largest |C| e^{s_r} (e^{eps_C} - e^{-eps_C}) is split first. A split replaces (v, L) by its
    children at the next occupied level (the nested self-child (v, Lc) and the children at level Lc).

    Parameters
    ----------
    tree : SGTree
    q : (D,) float array
    clustering : Clustering of ``tree`` at its current version
    beta, gamma : float (gamma > 1)

    Returns a clustering whose ``stats["certificate"]`` is the final :class:`Certificate` and
    ``stats["certified"]`` whether the target was reached.
    """
    beta = check_positive("beta", beta)
    gamma = check_positive("gamma", gamma)
    if proposal not in PROPOSALS:
        raise ValueError(f"proposal: expected one of {PROPOSALS}, got {proposal!r}")
    if max_clusters is None:
        max_clusters = 1 << 62
    max_clusters = check_int("max_clusters", max_clusters, low=1)
    _check_tree(tree)
    _check_clustering(clustering, tree)
    T = tree.arrays()
    q = check_vector("q", q, size=T.points.shape[1])
    log_g = math.log(gamma)
    nodes, levels, sr, sizes, radii, ip, splits = K.refine_kernel(
        T, suffix_radii(tree), q, beta, np.ascontiguousarray(clustering.nodes, np.int64),
        np.ascontiguousarray(clustering.levels, np.int64), logits(T.points, clustering.reps, q, beta),
        np.ascontiguousarray(clustering.sizes, np.int64), np.ascontiguousarray(clustering.radii, np.float64), log_g,
        proposal == "upper", max_clusters)
    out = tree_clustering(tree, nodes, levels, clustering.stats)
    cert = _certificate(sr, sizes.astype(np.float64), bounds.cluster_eps(beta, float(np.linalg.norm(q)), radii),
                        int(ip), tree.version)
    out.stats.update(certificate=cert, splits=int(splits), inner_products=int(ip),
                     certified=(cert.log_gamma if proposal == "eq7" else cert.log_gamma_upper) <= log_g + 1e-9)
    return out

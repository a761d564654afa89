"""Exact maximum inner product search (MIPS) on an :class:`refimpl.index.sgtree.SGTree` by branch and bound.

``topk(tree, q, k)`` returns the k targets with the largest <q, t>, ties broken by the smaller id: identical to
:func:`brute_force_topk`, which scores every target with the same Numba inner-product routine (so that both see
bit-identical scores; the scores agree with NumPy's ``T @ q`` to rounding).

Upper bound of <q, t> over the subtree of node v (representative p, radius r = MAXD(v), M2 >= every ||t||^2 below,
MAXNORM): with d = ||q - p||,

* linear (Cauchy-Schwarz):  <q, t> <= <q, p> + ||q|| r;
* ball  (law of cosines):  <q, t> = (||q||^2 + ||t||^2 - ||q - t||^2) / 2 <= (||q||^2 + M2 - max(0, d - r)^2) / 2;
* norm:  <q, t> <= ||q|| sqrt(M2).

``bound="ball"`` (default) uses the minimum of the three, ``bound="linear"`` the first only. With the ball bound a
child c of an expanded node v is first tested WITHOUT reading its row: ||q - t|| >= |d(q, p_v) - PDIST(c)| - MAXD(c)
for every t below c (triangle inequality), which gives a ball bound for c's whole subtree, p_c included. On unit-
norm data the ball bound is the nearest-neighbour bound and prunes far better (the linear bound cannot prune a
subtree whose radius exceeds the gap between its representative's score and the k-th best score). A node is pruned
when its bound is below the current k-th best score minus a rounding slack of 1e-9 (||q|| + max||t||)^2, so no true
top-k target is lost to floating-point error. Best-first order (a max-heap on the bound). The search is bound by
memory latency (random rows), so the surviving children's rows are prefetched a few ahead; a surviving subtree
of at most ``scan`` targets is scored as one range of the tree's pre-order (:func:`preorder`), without the node
visits that bound tests inside it would cost. Rows may be stored
in float32: scores and bounds are accumulated in float64 from the stored values, so they hold exactly as for
float64 rows.
"""
from __future__ import annotations

import math
import weakref
from dataclasses import dataclass

import numpy as np
import scipy.sparse as sp
from numba import njit

from refimpl.index._arrays import N_NODES, ROOT
from refimpl.index._distance import dot, dot_sqdist, prefetch_row
from refimpl.index._domain import MAX_ABS
from refimpl.index.sgtree import SGTree
from refimpl._validate import check_ids, check_int, check_matrix

PF = 4  # rows prefetched ahead

SCAN = 256  # subtrees of at most this many targets are scanned as one pre-order range (no bounds inside)

__all__ = ["topk", "brute_force_topk", "TopKResult", "preorder"]


@dataclass
class TopKResult:
    """``ids`` (B, k) int64 and ``scores`` (B, k) float64, best first (1-D for a 1-D query); ``stats``: inner
    products computed and nodes expanded, per query (arrays of length B)."""

    ids: np.ndarray
    scores: np.ndarray
    stats: dict


# ---------------------------------------------------------------- one binary heap (root = the worst by rank)
# (small helpers are inlined: an out-of-line call that takes arrays costs more than the work itself)
@njit(cache=True, inline="always")
def _better(s1, i1, s2, i2):
    """Is (score s1, id i1) ranked before (s2, i2)? Larger score first, then smaller id."""
    return s1 > s2 or (s1 == s2 and i1 < i2)


@njit(cache=True, inline="always")
def _sift_up(hs, hi, j, s, i):
    """Slot for (s, i) entering at slot j of the heap: ancestors ranked after it move down."""
    while j > 0:
        p = (j - 1) // 2
        if not _better(hs[p], hi[p], s, i):
            break
        hs[j] = hs[p]
        hi[j] = hi[p]
        j = p
    return j


@njit(cache=True, inline="always")
def _sift_down(hs, hi, size, s, i):
    """Slot for (s, i) entering at the root of hs[:size]: children ranked after it move up."""
    j = 0
    while True:
        c = 2 * j + 1
        if c >= size:
            return j
        if c + 1 < size and _better(hs[c], hi[c], hs[c + 1], hi[c + 1]):
            c += 1
        if _better(hs[c], hi[c], s, i):
            return j
        hs[j] = hs[c]
        hi[j] = hi[c]
        j = c


@njit(cache=True, inline="always")
def _push(hs, hi, size, s, i):
    j = _sift_up(hs, hi, size, s, i)
    hs[j] = s
    hi[j] = i
    return size + 1


@njit(cache=True, inline="always")
def _pop(hs, hi, size):
    """Remove the root (the worst); returns the new size."""
    size -= 1
    if size > 0:
        j = _sift_down(hs, hi, size, hs[size], hi[size])
        hs[j] = hs[size]
        hi[j] = hi[size]
    return size


@njit(cache=True, inline="always")
def _offer(hs, hi, size, k, s, i):
    """Keep the k best (s, i) seen: returns the new size."""
    if size < k:
        return _push(hs, hi, size, s, i)
    if _better(s, i, hs[0], hi[0]):
        j = _sift_down(hs, hi, size, s, i)
        hs[j] = s
        hi[j] = i
    return size


@njit(cache=True)
def _drain(hs, hi, size, out_ids, out_scores, qi):
    """Empty the top-k heap into row qi of the outputs, best first."""
    for r in range(size - 1, -1, -1):
        out_scores[qi, r] = hs[0]
        out_ids[qi, r] = hi[0]
        size = _pop(hs, hi, size)


# ---------------------------------------------------------------- the tree's pre-order
@njit(cache=True)
def _preorder_kernel(T):
    """(order, pos): order[t] = the target at pre-order position t (children in list order), pos[v] = the position
    of node v's representative (-1 for a node slot not in the tree)."""
    n_nodes = T.state[N_NODES]
    pos = np.full(n_nodes, -1, np.int64)
    root = T.state[ROOT]
    if root < 0:
        return np.zeros(0, np.int64), pos
    order = np.empty(T.node_count[root], np.int64)
    t = 0
    v = root
    while True:
        pos[v] = t
        order[t] = T.node_point[v]
        t += 1
        if T.node_first_child[v] != -1:
            v = T.node_first_child[v]
            continue
        while v != root and T.node_next_sibling[v] == -1:
            v = T.node_parent[v]
        if v == root:
            break
        v = T.node_next_sibling[v]
    return order, pos


# per tree: (version, order, pos); a weak reference, dropped with the tree
_PREORDER: "weakref.WeakKeyDictionary" = weakref.WeakKeyDictionary()


def preorder(tree):
    """(order, pos) of ``tree``'s pre-order: order (len(tree),) int64 = the targets in pre-order (children in list
    order, i.e. by descending level), pos (nodes,) int64 = the position of each node's representative. The subtree
    of node v is order[pos[v] : pos[v] + node_count[v]], and the children of v below a level L form one contiguous
    suffix of it. O(N) once per tree version, then cached (a mutation gives the tree a new version)."""
    entry = _PREORDER.get(tree)
    if entry is None or entry[0] != tree.version:
        entry = (tree.version, *_preorder_kernel(tree.arrays()))
        _PREORDER[tree] = entry
    return entry[1], entry[2]


# ---------------------------------------------------------------- bounds and kernels
@njit(cache=True, inline="always")
def _bound(dt, d2, qn, qn2, r, m2, ball):
    ub = dt + qn * r
    if ball:
        nb = qn * math.sqrt(m2)
        if nb < ub:
            ub = nb
        dl = math.sqrt(d2) - r
        if dl > 0.0:
            bb = 0.5 * (qn2 + m2 - dl * dl)
            if bb < ub:
                ub = bb
    return ub


@njit(cache=True, inline="always")  # called per child: T must not be passed out of line
def _pruned(T, c, dqv, qn2, kth):
    """The parent-distance test: ||q - t|| >= |d(q, p_v) - PDIST(c)| - MAXD(c) for every t below child c, so the
    ball bound of c's subtree is known without reading its row."""
    dl = abs(dqv - T.node_pdist[c]) - T.node_maxd[c]
    return dl > 0.0 and 0.5 * (qn2 + T.node_maxnorm[c] - dl * dl) < kth


@njit(cache=True)
def _topk_kernel(T, Q, k, ball, order, pos, scan, out_ids, out_scores, n_ip, n_exp):
    P = T.points
    root = T.state[ROOT]
    n_nodes = T.state[N_NODES]
    hs = np.empty(k)
    hi = np.empty(k, dtype=np.int64)
    cb = np.empty(n_nodes + 1)  # candidates: key -bound (so the root of the shared heap is the largest bound)
    cv = np.empty(n_nodes + 1, dtype=np.int64)
    dq = np.empty(n_nodes)  # ||q - p_v|| of every candidate v
    surv = np.empty(n_nodes + 1, dtype=np.int64)
    m2root = T.node_maxnorm[root]
    for qi in range(Q.shape[0]):
        qn2 = dot(Q, qi, Q, qi)
        qn = math.sqrt(qn2)
        slack = 1e-9 * (qn + math.sqrt(m2root)) ** 2
        nip = 1
        nexp = 0
        dt, d2 = dot_sqdist(Q, qi, P, T.node_point[root])
        size = _offer(hs, hi, 0, k, dt, T.node_point[root])
        nc = 0
        if T.node_first_child[root] != -1:
            dq[root] = math.sqrt(d2)
            nc = _push(cb, cv, 0, -_bound(dt, d2, qn, qn2, T.node_maxd[root], T.node_maxnorm[root], ball), root)
        while nc > 0:
            v = cv[0]
            if size == k and -cb[0] < hs[0] - slack:
                break
            nc = _pop(cb, cv, nc)
            nexp += 1
            if T.node_count[v] <= scan:  # a small subtree: score its range of the pre-order, no bounds inside
                t0 = pos[v] + 1
                t1 = pos[v] + T.node_count[v]
                for t in range(t0, min(t0 + PF, t1)):
                    prefetch_row(P, order[t])
                for t in range(t0, t1):
                    if t + PF < t1:
                        prefetch_row(P, order[t + PF])
                    x = order[t]
                    size = _offer(hs, hi, size, k, dot(Q, qi, P, x), x)
                nip += t1 - t0
                continue
            dqv = dq[v]
            # pass 1 (node arrays only): the parent-distance test
            ns = 0
            c = T.node_first_child[v]
            while c != -1:
                if not (ball and size == k and _pruned(T, c, dqv, qn2, hs[0] - slack)):
                    surv[ns] = c
                    if ns < PF:
                        prefetch_row(P, T.node_point[c])
                    ns += 1
                c = T.node_next_sibling[c]
            # pass 2: inner products, rows prefetched PF survivors ahead (memory-level parallelism)
            for si in range(ns):
                if si + PF < ns:
                    prefetch_row(P, T.node_point[surv[si + PF]])
                c = surv[si]
                if ball and size == k and _pruned(T, c, dqv, qn2, hs[0] - slack):
                    continue  # the k-th best improved since pass 1
                x = T.node_point[c]
                dt, d2 = dot_sqdist(Q, qi, P, x)
                nip += 1
                size = _offer(hs, hi, size, k, dt, x)
                if T.node_first_child[c] != -1:
                    b = _bound(dt, d2, qn, qn2, T.node_maxd[c], T.node_maxnorm[c], ball)
                    if size < k or b >= hs[0] - slack:
                        dq[c] = math.sqrt(d2)
                        nc = _push(cb, cv, nc, -b, c)
        _drain(hs, hi, size, out_ids, out_scores, qi)
        n_ip[qi] = nip
        n_exp[qi] = nexp


@njit(cache=True)
def _brute_kernel(Q, k, points, ids, out_ids, out_scores):
    hs = np.empty(k)
    hi = np.empty(k, dtype=np.int64)
    for qi in range(Q.shape[0]):
        size = 0
        for t in range(ids.shape[0]):
            if t + PF < ids.shape[0]:
                prefetch_row(points, ids[t + PF])
            size = _offer(hs, hi, size, k, dot(Q, qi, points, ids[t]), ids[t])
        _drain(hs, hi, size, out_ids, out_scores, qi)


def _queries(q, dim):
    arr = np.asarray(q) if not sp.issparse(q) else q
    one = getattr(arr, "ndim", 0) == 1
    Q = check_matrix("q", arr.reshape(1, -1) if one else arr, n_cols=dim)
    if np.abs(Q).max() > MAX_ABS:
        raise ValueError(f"q: values must have magnitude <= {MAX_ABS:g}")
    return Q, one


def topk(tree, q, k: int, *, bound: str = "ball", scan: int = SCAN) -> TopKResult:
    """Exact top-k maximum inner product search, one compiled call for the whole batch (paper §3.5).

    Returns the k targets t with the largest <q, t>, ties by the smaller id: identical to
    :func:`brute_force_topk` (same inner-product routine). Branch and bound, best first, with the bounds of the
    module docstring; a node is pruned when its bound is below the k-th best score minus a rounding slack.

    Parameters
    ----------
    tree : SGTree (non-empty).
    q : (D,) query or (B, D) batch of queries (finite reals).
    k : number of results, 1 <= k <= len(tree).
    bound : "ball" (default: min of the linear, ball and norm bounds, plus the parent-distance test) or "linear"
        (<q, p> + ||q|| MAXD only).
    scan : int >= 0
        A surviving subtree of at most ``scan`` targets is scored as one range of the tree's pre-order
        (:func:`preorder`; rows prefetched, no bound tests inside): more inner products, each far cheaper than a
        node visit. 0 disables it. The result is the same exact top-k for every value.
    """
    if not isinstance(tree, SGTree):
        raise TypeError(f"tree: expected an SGTree, got {type(tree).__name__}")
    if bound not in ("ball", "linear"):
        raise ValueError(f"bound: expected 'ball' or 'linear', got {bound!r}")
    if len(tree) == 0:
        raise ValueError("tree: is empty")
    k = check_int("k", k, low=1, high=len(tree))
    scan = check_int("scan", scan, low=0)
    Q, one = _queries(q, tree.dim)
    nq = Q.shape[0]
    ids = np.empty((nq, k), dtype=np.int64)
    scores = np.empty((nq, k))
    n_ip = np.empty(nq, dtype=np.int64)
    n_exp = np.empty(nq, dtype=np.int64)
    order, pos = preorder(tree) if scan > 0 else (np.zeros(0, np.int64), np.zeros(0, np.int64))
    _topk_kernel(tree.arrays(), Q, k, bound == "ball", order, pos, scan, ids, scores, n_ip, n_exp)
    stats = {"inner_products": n_ip, "nodes_expanded": n_exp}
    if one:
        return TopKResult(ids[0], scores[0], {key: val[0] for key, val in stats.items()})
    return TopKResult(ids, scores, stats)


def brute_force_topk(points, q, k: int, *, ids=None) -> TopKResult:
    """Top-k of <q, points[i]> over ``ids`` (default all rows) with the inner-product routine of :func:`topk`;
    ties by the smaller id.

    Parameters
    ----------
    points : (N, D) float64 or float32 rows.
    q : (D,) or (B, D) queries.
    k : 1 <= k <= len(ids).
    ids : optional 1-D int array of row indices to score.
    """
    P = np.asarray(points)
    P = check_matrix("points", P, dtype=np.float32 if P.dtype == np.float32 else np.float64)
    Q, one = _queries(q, P.shape[1])
    ids = np.arange(P.shape[0], dtype=np.int64) if ids is None else check_ids("ids", ids, P.shape[0])
    k = check_int("k", k, low=1, high=ids.shape[0])
    out_ids = np.empty((Q.shape[0], k), dtype=np.int64)
    out_scores = np.empty((Q.shape[0], k))
    _brute_kernel(Q, k, P, ids, out_ids, out_scores)
    n = np.full(Q.shape[0], ids.shape[0], dtype=np.int64)
    if one:
        return TopKResult(out_ids[0], out_scores[0], {"inner_products": n[0]})
    return TopKResult(out_ids, out_scores, {"inner_products": n})

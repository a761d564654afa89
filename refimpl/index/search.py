"""Exact maximum inner product search (MIPS) on an :class:`refimpl.index.sgtree.SGTree` by branch and bound.

``topk(tree, q, k)`` returns the k targets with the largest <q, t>, ties broken by the smaller id: identical to
:func:`brute_force_topk`, which scores every target with the same Numba inner-product routine (so that both see
bit-identical scores; the scores agree with NumPy's ``T @ q`` to rounding).

Upper bound of <q, t> over the subtree of node v (representative p, radius r = MAXD(v), M2 >= every ||t||^2 below,
MAXNORM): with d = ||q - p||,

* linear (Cauchy-Schwarz, the issue's bound):  <q, t> <= <q, p> + ||q|| r;
* ball  (law of cosines):  <q, t> = (||q||^2 + ||t||^2 - ||q - t||^2) / 2 <= (||q||^2 + M2 - max(0, d - r)^2) / 2;
* norm:  <q, t> <= ||q|| sqrt(M2).

``bound="ball"`` (default) uses the minimum of the three, ``bound="linear"`` the first only. With the ball bound a
child c of an expanded node v is first tested WITHOUT reading its row: ||q - t|| >= |d(q, p_v) - PDIST(c)| - MAXD(c)
for every t below c (triangle inequality), which gives a ball bound for c's whole subtree, p_c included. On unit-
norm data the ball bound is the nearest-neighbour bound and prunes far better (the linear bound cannot prune a
subtree whose radius exceeds the gap between its representative's score and the k-th best score). A node is pruned
when its bound is below the current k-th best score minus a rounding slack of 1e-9 (||q|| + max||t||)^2, so no true
top-k target is lost to floating-point error. Best-first order (a max-heap on the bound). The search is bound by
memory latency (random 512-byte rows), so the surviving children's rows are prefetched a few ahead.
"""
from __future__ import annotations

import math
from dataclasses import dataclass

import numpy as np
from numba import njit

from refimpl.index._kernels import prefetch_row
from refimpl._validate import check_int, check_matrix

PF = 4  # rows prefetched ahead

__all__ = ["topk", "brute_force_topk", "TopKResult"]


@dataclass
class TopKResult:
    """``ids`` (n_queries, k) int64 and ``scores`` (n_queries, k) float64, best first (1-D for a 1-D query);
    ``stats``: inner products computed and nodes expanded, per query (arrays)."""

    ids: np.ndarray
    scores: np.ndarray
    stats: dict


@njit(cache=True)
def _dot_d2(Q, qi, P, pi):
    """(<q, p>, ||q - p||^2) in one pass, four accumulators (fixed summation order: deterministic)."""
    D = Q.shape[1]
    a0 = 0.0
    a1 = 0.0
    a2 = 0.0
    a3 = 0.0
    s0 = 0.0
    s1 = 0.0
    s2 = 0.0
    s3 = 0.0
    k = 0
    while k + 4 <= D:
        x0 = Q[qi, k]
        x1 = Q[qi, k + 1]
        x2 = Q[qi, k + 2]
        x3 = Q[qi, k + 3]
        y0 = P[pi, k]
        y1 = P[pi, k + 1]
        y2 = P[pi, k + 2]
        y3 = P[pi, k + 3]
        a0 += x0 * y0
        a1 += x1 * y1
        a2 += x2 * y2
        a3 += x3 * y3
        s0 += (x0 - y0) * (x0 - y0)
        s1 += (x1 - y1) * (x1 - y1)
        s2 += (x2 - y2) * (x2 - y2)
        s3 += (x3 - y3) * (x3 - y3)
        k += 4
    while k < D:
        a0 += Q[qi, k] * P[pi, k]
        s0 += (Q[qi, k] - P[pi, k]) * (Q[qi, k] - P[pi, k])
        k += 1
    return (a0 + a1) + (a2 + a3), (s0 + s1) + (s2 + s3)


@njit(cache=True)
def _better(s1, i1, s2, i2):
    """Is (score s1, id i1) ranked before (s2, i2)?"""
    return s1 > s2 or (s1 == s2 and i1 < i2)


@njit(cache=True)
def _sift_down(hs, hi, size, s, i):
    """Slot for (s, i) placed at the root of the min-heap hs[:size], hi[:size]: children ranked below it move up.
    The caller writes (s, i) into the returned slot."""
    j = 0
    while True:
        c = 2 * j + 1
        if c >= size:
            break
        if c + 1 < size and _better(hs[c], hi[c], hs[c + 1], hi[c + 1]):
            c += 1
        if _better(hs[c], hi[c], s, i):
            break
        hs[j] = hs[c]
        hi[j] = hi[c]
        j = c
    return j


@njit(cache=True)
def _offer(hs, hi, size, k, s, i):
    """Top-k as a min-heap on rank (hs[0], hi[0] = the worst kept). Returns the new size."""
    if size < k:
        j = size
        size += 1
    elif _better(s, i, hs[0], hi[0]):
        j = _sift_down(hs, hi, size, s, i)
        hs[j] = s
        hi[j] = i
        return size
    else:
        return size
    while j > 0:  # sift up
        p = (j - 1) // 2
        if _better(hs[p], hi[p], s, i):
            hs[j] = hs[p]
            hi[j] = hi[p]
            j = p
        else:
            break
    hs[j] = s
    hi[j] = i
    return size


@njit(cache=True)
def _bound(dot, d2, qn, qn2, r, m2, ball):
    ub = dot + qn * r
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


@njit(cache=True)
def _topk_kernel(Q, k, points, root, NP, NFC, NNS, NMaxd, NMaxn, NPdist, n_nodes, ball, out_ids, out_scores, n_ip,
                 n_exp):
    hs = np.empty(k)
    hi = np.empty(k, dtype=np.int64)
    cap = n_nodes + 1
    cb = np.empty(cap)  # candidate max-heap: bound, node
    cv = np.empty(cap, dtype=np.int64)
    cd = np.empty(cap)  # ||q - p_v|| of the candidate
    surv = np.empty(cap, dtype=np.int64)  # children of the expanded node that survive the parent-distance test
    m2root = NMaxn[root]
    for qi in range(Q.shape[0]):
        qn2 = 0.0
        for t in range(Q.shape[1]):
            qn2 += Q[qi, t] * Q[qi, t]
        qn = math.sqrt(qn2)
        slack = 1e-9 * (qn + math.sqrt(m2root)) ** 2
        size = 0
        nip = 1
        nexp = 0
        dot, d2 = _dot_d2(Q, qi, points, NP[root])
        size = _offer(hs, hi, size, k, dot, NP[root])
        nc = 0
        if NFC[root] != -1:
            cb[0] = _bound(dot, d2, qn, qn2, NMaxd[root], NMaxn[root], ball)
            cv[0] = root
            cd[0] = math.sqrt(d2)
            nc = 1
        while nc > 0:
            ub = cb[0]
            v = cv[0]
            lv_d = cd[0]
            if size == k and ub < hs[0] - slack:
                break
            # pop
            nc -= 1
            lb = cb[nc]
            lv = cv[nc]
            ld = cd[nc]
            j = 0
            while True:
                c = 2 * j + 1
                if c >= nc:
                    break
                if c + 1 < nc and cb[c + 1] > cb[c]:
                    c += 1
                if cb[c] <= lb:
                    break
                cb[j] = cb[c]
                cv[j] = cv[c]
                cd[j] = cd[c]
                j = c
            if nc > 0:
                cb[j] = lb
                cv[j] = lv
                cd[j] = ld
            nexp += 1
            dqv = lv_d
            # pass 1 (node arrays only): the parent-distance test. ||q - t|| >= |d(q, p_v) - PDIST(c)| - MAXD(c)
            # for every t below c, so c's subtree (p_c included) is skipped without reading its row
            ns = 0
            c = NFC[v]
            while c != -1:
                keep = True
                if ball and size == k:
                    dl = abs(dqv - NPdist[c]) - NMaxd[c]
                    if dl > 0.0 and 0.5 * (qn2 + NMaxn[c] - dl * dl) < hs[0] - slack:
                        keep = False
                if keep:
                    surv[ns] = c
                    if ns < PF:
                        prefetch_row(points, NP[c])
                    ns += 1
                c = NNS[c]
            # pass 2: inner products, rows prefetched PF survivors ahead (memory-level parallelism)
            for si in range(ns):
                if si + PF < ns:
                    prefetch_row(points, NP[surv[si + PF]])
                c = surv[si]
                if ball and size == k:  # the k-th best may have improved since pass 1
                    dl = abs(dqv - NPdist[c]) - NMaxd[c]
                    if dl > 0.0 and 0.5 * (qn2 + NMaxn[c] - dl * dl) < hs[0] - slack:
                        continue
                x = NP[c]
                dot, d2 = _dot_d2(Q, qi, points, x)
                nip += 1
                size = _offer(hs, hi, size, k, dot, x)
                if NFC[c] != -1:
                    b = _bound(dot, d2, qn, qn2, NMaxd[c], NMaxn[c], ball)
                    if size < k or b >= hs[0] - slack:
                        j = nc  # push (sift up)
                        nc += 1
                        while j > 0:
                            p = (j - 1) // 2
                            if cb[p] < b:
                                cb[j] = cb[p]
                                cv[j] = cv[p]
                                cd[j] = cd[p]
                                j = p
                            else:
                                break
                        cb[j] = b
                        cv[j] = c
                        cd[j] = math.sqrt(d2)
        # heap -> sorted best first
        for r in range(size - 1, -1, -1):
            out_scores[qi, r] = hs[0]
            out_ids[qi, r] = hi[0]
            # pop the worst
            size -= 1
            ls = hs[size]
            li = hi[size]
            j = _sift_down(hs, hi, size, ls, li)
            if size > 0:
                hs[j] = ls
                hi[j] = li
        n_ip[qi] = nip
        n_exp[qi] = nexp


@njit(cache=True)
def _brute_kernel(Q, k, points, ids, out_ids, out_scores):
    hs = np.empty(k)
    hi = np.empty(k, dtype=np.int64)
    for qi in range(Q.shape[0]):
        size = 0
        for t in range(ids.shape[0]):
            dot, d2 = _dot_d2(Q, qi, points, ids[t])
            size = _offer(hs, hi, size, k, dot, ids[t])
        order = np.empty(size, dtype=np.int64)
        for r in range(size):
            order[r] = r
        # insertion sort of the k kept (k small)
        for a in range(1, size):
            b = order[a]
            j = a - 1
            while j >= 0 and _better(hs[b], hi[b], hs[order[j]], hi[order[j]]):
                order[j + 1] = order[j]
                j -= 1
            order[j + 1] = b
        for r in range(size):
            out_ids[qi, r] = hi[order[r]]
            out_scores[qi, r] = hs[order[r]]


def _queries(q, dim):
    arr = np.asarray(q)
    one = arr.ndim == 1
    Q = check_matrix("q", arr.reshape(1, -1) if one else arr, n_cols=dim)
    return Q, one


def topk(tree, q, k: int, *, bound: str = "ball") -> TopKResult:
    """Exact top-k MIPS of one query (1-D ``q``) or a batch (2-D, one query per row) by branch and bound.

    Identical to :func:`brute_force_topk` (ties by smaller id). ``k`` in [1, len(tree)]. ``bound``: "ball"
    (default, see the module docstring) or "linear" (<q, p> + ||q|| MAXD only)."""
    if bound not in ("ball", "linear"):
        raise ValueError(f"bound: expected 'ball' or 'linear', got {bound!r}")
    if len(tree) == 0:
        raise ValueError("tree: is empty")
    k = check_int("k", k, low=1, high=len(tree))
    Q, one = _queries(q, tree.dim)
    if np.abs(Q).max() > 1e140:
        raise ValueError("q: values must have magnitude <= 1e140")
    nq = Q.shape[0]
    ids = np.empty((nq, k), dtype=np.int64)
    scores = np.empty((nq, k))
    n_ip = np.empty(nq, dtype=np.int64)
    n_exp = np.empty(nq, dtype=np.int64)
    _topk_kernel(Q, k, tree.points, tree.root, tree.node_point, tree.node_first_child, tree.node_next_sibling,
                 tree.node_maxd, tree.node_maxnorm, tree.node_pdist, tree.n_nodes, bound == "ball", ids, scores,
                 n_ip, n_exp)
    stats = {"inner_products": n_ip, "nodes_expanded": n_exp}
    if one:
        return TopKResult(ids[0], scores[0], {key: val[0] for key, val in stats.items()})
    return TopKResult(ids, scores, stats)


def brute_force_topk(points, q, k: int, *, ids=None) -> TopKResult:
    """Top-k of <q, points[i]> over ``ids`` (default all rows) with the same inner-product routine as
    :func:`topk`; ties by smaller id."""
    P = check_matrix("points", points)
    Q, one = _queries(q, P.shape[1])
    ids = np.arange(P.shape[0], dtype=np.int64) if ids is None else np.ascontiguousarray(ids, dtype=np.int64)
    k = check_int("k", k, low=1, high=ids.shape[0])
    out_ids = np.empty((Q.shape[0], k), dtype=np.int64)
    out_scores = np.empty((Q.shape[0], k))
    _brute_kernel(Q, k, P, ids, out_ids, out_scores)
    n = np.full(Q.shape[0], ids.shape[0], dtype=np.int64)
    if one:
        return TopKResult(out_ids[0], out_scores[0], {"inner_products": n[0]})
    return TopKResult(out_ids, out_scores, {"inner_products": n})

"""Numba kernels of the batch construction of :mod:`refimpl.index.sgtree`: the divisive build (``build``,
``rebuild``) and the rebuild of emptied clusters (Alg. 3, rebuild_level). Same conventions as
:mod:`refimpl.index._kernels` (one TreeArrays ``T``).

Two speed paths, neither of which changes the tree (tested array by array against the plain scan):

* locality: a task whose segment has at most ``gather`` points has its rows copied once into a contiguous buffer,
  and its whole subtree is built from that buffer (the same stored values, so the same distances);
* the assignment step (nearest covering member of a group) gets, for a block of points, every squared distance to
  the group's new children from one matrix product, with a proven rounding bound, and computes the exact distance
  only for the children that could win (the filter of :func:`_assign`).
"""
from __future__ import annotations

import math

import numpy as np
from numba import njit

from refimpl.index._arrays import N_DIST, ROOT
from refimpl.index._distance import dist, prefetch_row
from refimpl.index._kernels import INF, _alloc, _link_child, duplicate_level, insert_one, level_ceil, tdist, tsqnorm

PF = 4  # rows prefetched ahead in the scans (memory-level parallelism)
GATHER_BYTES = 1 << 20  # a gathered segment's rows (fits in a core's L2 cache)
GATHER_MIN = 32  # the gather threshold in rows is at least this (very wide rows)
GEMM_MIN_KIDS = 2  # the assignment step goes through a matrix product from this many kids of a group...
GEMM_MAX_KIDS = 1 << 14  # ... up to this many (their float64 rows are copied)
GEMM_BLOCK = 128  # points per matrix product


def gather_rows(points) -> int:
    """Largest segment (in rows) gathered into a contiguous buffer by :func:`batch_place` for this point matrix."""
    return max(GATHER_MIN, GATHER_BYTES // max(1, points.shape[1] * points.itemsize))


@njit(cache=True)
def _assign(P, s, e, k, kids, krow, rad, rw, dv, sqv, lab, dbest, cnt, pdist, kmat, ksq, xblk, bidx):
    """The assignment step of :func:`batch_place`: every point of [s, e) that is not a new child (lab != -1) goes
    to the nearest covering member of the group (self = 0 when d(x, p_u) <= rad, child q = q + 1 when
    d(x, c_q) <= rad), the first one winning ties; lab, dbest (its distance) and cnt (bucket sizes) are filled.

    Candidates are pruned by the triangle inequality |d(x, p_u) - PDIST(c)| and, with GEMM_MIN_KIDS <= k <= rows of
    kmat, by a matrix product: one product per block of points gives every ||x||^2 + ||c||^2 - 2<x, c> up to a
    proven rounding bound, and only children with that value <= tau^2 + bound (tau = min(rad, current best)) can
    win. Both prunings only skip children that cannot win, so the result is that of the plain scan. Bound: each
    sum has at most D + 2 terms of magnitude <= ||x||^2 + ||c||^2, so the product's error and the exact
    distance's are each <= 2 gamma_(D+2) (||x||^2 + ||c||^2) (gamma_n = n u / (1 - n u), u = 2^-53); we use
    8 (D + 4) u (||x||^2 + ||c||^2 + tau^2). Returns the number of exact distances computed."""
    D = P.shape[1]
    eps = 8.0 * (D + 4) * 2.0 ** -53
    filt = GEMM_MIN_KIDS <= k <= kmat.shape[0]
    if filt:
        for q in range(k):
            r = krow[q]
            a = 0.0
            for j in range(D):
                y = np.float64(P[r, j])
                kmat[q, j] = y
                a += y * y
            ksq[q] = a
    G = np.zeros((1, 1))
    nd = 0
    i = s
    while i < e:
        nb = 0
        while i < e and nb < xblk.shape[0]:
            if i + PF < e and lab[i + PF] != -1:
                prefetch_row(P, rw[i + PF])
            if lab[i] != -1:
                if filt:
                    r = rw[i]
                    for j in range(D):
                        xblk[nb, j] = P[r, j]
                bidx[nb] = i
                nb += 1
            i += 1
        if filt and nb > 0:
            G = np.dot(xblk[:nb], kmat[:k].T)
        for b in range(nb):
            t = bidx[b]
            if dv[t] <= rad:
                best = 0
                bd = dv[t]
            else:
                best = -1
                bd = INF
            tau = bd if bd < rad else rad
            t2 = tau * tau
            xs2 = sqv[t]
            for q in range(k):
                if filt and xs2 + ksq[q] - 2.0 * G[b, q] > t2 + eps * (xs2 + ksq[q] + t2):
                    continue  # d(x, c) > tau: c neither covers x nor beats the current best
                lb = abs(dv[t] - pdist[kids[q]])
                if lb > rad or lb >= bd:
                    continue
                dc = dist(P, rw[t], P, krow[q])
                nd += 1
                if dc <= rad and dc < bd:
                    bd = dc
                    best = q + 1
            lab[t] = best
            dbest[t] = bd
            cnt[best] += 1
    return nd


@njit(cache=True)
def batch_place(T, v, L, xs, dv, gather, max_kids):
    """Divisive batch construction: place the targets xs (with dv[i] = d(xs[i], p_v) <= b^L) in cluster (v, L).

    Same invariants as repeated insertion (it is insertion in a coarse-to-fine order): for the current cluster
    (u, L) with point set S, l* = the first level at which some point of S leaves the self-child's cover
    (capped at L-1); a greedy net (scan order) of the points not covered by the self-child at l* becomes the new
    children of level l* (pairwise and from p_u > b^l*, so separated; covering d <= b^(l*+1) by the choice of l*);
    every other point goes to the nearest covering member of the group, the self-child winning ties; recurse.
    Identical copies of p_u become duplicate children below all others. Counts and MAXD are exact (every point's
    distance to every ancestor is computed on the way down), MIND exact. xs and dv are scratch (reordered).
    Speed only (the tree is the same whatever they are): a task of at most ``gather`` points (>= 2) is built from
    a contiguous copy of its rows (0: never); a group of GEMM_MIN_KIDS to ``max_kids`` new children is assigned by
    the filter of :func:`_assign` (0: never)."""
    n = xs.shape[0]
    if n == 0:
        return
    # ancestors above v (the caller detached these points from v's subtree: counts only, MAXD stays valid)
    sqv = np.empty(n)  # squared norms, permuted along with xs and dv
    for i in range(n):
        if i + PF < n:
            prefetch_row(T.points, xs[i + PF])
        sqv[i] = tsqnorm(T, xs[i])
    a = T.node_parent[v]
    while a != -1:
        T.node_count[a] += n
        for i in range(n):
            if sqv[i] > T.node_maxnorm[a]:
                T.node_maxnorm[a] = sqv[i]
        a = T.node_parent[a]
    # int32 scratch (ids, nodes, positions < 2^31: SGTree's capacity limit) to halve the build's extra memory
    rw = xs.astype(np.int32)  # row of each point in the row source of its task (T.points: the target id)
    lab = np.empty(n, dtype=np.int32)
    dbest = np.empty(n)
    tmp = np.empty((n, 2), dtype=np.int32)
    tmp_d = np.empty((n, 2))
    kids = np.empty(n, dtype=np.int32)
    krow = np.empty(n, dtype=np.int32)
    cnt = np.empty(n + 2, dtype=np.int32)
    st = np.empty((n + 1, 4), dtype=np.int32)  # task stack: node, level, start, end
    g = min(gather, n)
    kmat = np.empty((min(n, max_kids), T.points.shape[1]))  # kid rows (float64) of the filtered assignment
    ksq = np.empty(kmat.shape[0])
    xblk = np.empty((GEMM_BLOCK, T.points.shape[1]))
    bidx = np.empty(GEMM_BLOCK, dtype=np.int64)
    buf = np.empty((max(g, 1), T.points.shape[1]), dtype=T.points.dtype)
    st[0, 0] = v
    st[0, 1] = L
    st[0, 2] = 0
    st[0, 3] = n
    top = 1
    local = False  # the task at stack index lo and every task it pushes read their rows from buf
    lo = 0
    while top > 0:
        top -= 1
        u, lev, s, e = st[top, 0], st[top, 1], st[top, 2], st[top, 3]
        if local and top < lo:
            local = False
        if not local and 2 <= e - s <= g:  # gather the segment's rows; its whole subtree is built from buf
            for i in range(s, e):
                if i + PF < e:
                    prefetch_row(T.points, xs[i + PF])
                for j in range(T.points.shape[1]):
                    buf[i - s, j] = T.points[xs[i], j]
                rw[i] = i - s
            local = True
            lo = top
        P = buf if local else T.points
        T.node_count[u] += e - s
        tail = T.node_first_child[u]
        if tail != -1:
            while T.node_next_sibling[tail] != -1:
                tail = T.node_next_sibling[tail]
        for i in range(s, e):
            if dv[i] > T.node_maxd[u]:
                T.node_maxd[u] = dv[i]
            if sqv[i] > T.node_maxnorm[u]:
                T.node_maxnorm[u] = sqv[i]
        # duplicates of p_u to the end of the segment
        e0 = e
        L0 = lev
        j = e
        i = s
        while i < j:
            if dv[i] == 0.0:
                j -= 1
                t = xs[i]
                xs[i] = xs[j]
                xs[j] = t
                t = rw[i]
                rw[i] = rw[j]
                rw[j] = t
                td = dv[i]
                dv[i] = dv[j]
                dv[j] = td
                td = sqv[i]
                sqv[i] = sqv[j]
                sqv[j] = td
            else:
                i += 1
        ndup_start = j
        e = j
        while e > s:
            dmax = 0.0
            for i in range(s, e):
                if dv[i] > dmax:
                    dmax = dv[i]
            ls = level_ceil(dmax, T.base) - 1
            if ls > lev - 1:
                ls = lev - 1
            rad = math.pow(T.base, ls)
            # greedy net of the points the self-child does not cover
            k = 0
            gmin = INF
            for i in range(s, e):
                lab[i] = 0
                if i + PF < e and dv[i + PF] > rad:
                    prefetch_row(P, rw[i + PF])
                if dv[i] > rad:
                    far = True
                    xmin = INF  # lower bound of x's distance to the kids (exact where computed): for MIND
                    for q in range(k):
                        lb = abs(dv[i] - T.node_pdist[kids[q]])
                        if lb > rad:
                            if lb < xmin:
                                xmin = lb
                            continue
                        dc = dist(P, rw[i], P, krow[q])
                        T.state[N_DIST] += 1
                        if dc < xmin:
                            xmin = dc
                        if dc <= rad:
                            far = False
                            break
                    if far:
                        if xmin < gmin:
                            gmin = xmin
                        if dv[i] < gmin:
                            gmin = dv[i]
                        c = _alloc(T, xs[i], ls, u, dv[i])
                        # append at the tail of u's child list (levels only decrease along the self-chain)
                        if tail == -1:
                            T.node_first_child[u] = c
                        else:
                            T.node_next_sibling[tail] = c
                        tail = c
                        kids[k] = c
                        krow[k] = rw[i]
                        k += 1
                        lab[i] = -1
            if gmin < T.node_mind[u]:
                T.node_mind[u] = gmin
            if gmin - rad < T.node_sepslack[u]:  # separation slack of the new group (inf - rad if no kid)
                T.node_sepslack[u] = gmin - rad
            # assignment: nearest covering member of the group (self wins ties)
            for q in range(k + 2):
                cnt[q] = 0
            T.state[N_DIST] += _assign(P, s, e, k, kids, krow, rad, rw, dv, sqv, lab, dbest, cnt, T.node_pdist, kmat,
                                       ksq, xblk, bidx)
            # counting sort: self first, then child 1..k (child reps themselves dropped)
            acc = s
            for q in range(k + 1):
                c = cnt[q]
                cnt[q] = acc
                acc += c
            for i in range(s, e):
                q = lab[i]
                if q == -1:
                    continue
                p = cnt[q]
                tmp[p, 0] = xs[i]
                tmp[p, 1] = rw[i]
                tmp_d[p, 0] = dbest[i]
                tmp_d[p, 1] = sqv[i]
                cnt[q] = p + 1
            for i in range(s, acc):
                xs[i] = tmp[i, 0]
                rw[i] = tmp[i, 1]
                dv[i] = tmp_d[i, 0]
                sqv[i] = tmp_d[i, 1]
            # cnt[q] is now the end of bucket q: child q+1 owns [cnt[q], cnt[q+1])
            for q in range(k):
                st[top, 0] = kids[q]
                st[top, 1] = ls
                st[top, 2] = cnt[q]
                st[top, 3] = cnt[q + 1]
                top += 1
            e = cnt[0]
            lev = ls
        # duplicates of p_u: one duplicate level (an existing duplicate child's, else below every child of u)
        if ndup_start < e0:
            dl = duplicate_level(T, u, L0)
            for i in range(ndup_start, e0):
                c = _alloc(T, xs[i], dl, u, 0.0)
                _link_child(T, u, c)
            T.node_mind[u] = 0.0


@njit(cache=True)
def batch_build(T, perm, gather, max_kids):
    """Build over the targets perm (empty tree): root = perm[0] at level ceil(log_b max distance), then
    :func:`batch_place` with the remaining points in perm order (the greedy nets scan in this order). perm is
    scratch (reordered)."""
    n = perm.shape[0]
    r = _alloc(T, perm[0], 0, -1, 0.0)
    T.state[ROOT] = r
    xs = perm[1:]  # scratch (reordered)
    dv = np.empty(n - 1)
    dmax = 0.0
    for i in range(n - 1):
        if i + PF < n - 1:
            prefetch_row(T.points, xs[i + PF])
        dv[i] = tdist(T, xs[i], perm[0])
        if dv[i] > dmax:
            dmax = dv[i]
    if dmax > 0.0:
        T.node_level[r] = level_ceil(dmax, T.base)
    batch_place(T, r, T.node_level[r], xs, dv, gather, max_kids)


@njit(cache=True)
def rebuild_segments(T, out, starts, start_levels, m, gather, max_kids):
    """Reinsert the m targets detached by :func:`detach_clusters`: each run of equal starts (v, l) is rebuilt by
    :func:`batch_place` under the same representative with the points still within b^l of it; the others (and
    runs whose start was freed) are inserted from the root afterwards."""
    rest = np.empty(m, dtype=np.int64)
    nrest = 0
    i = 0
    while i < m:
        v = starts[i]
        j = i
        while j < m and starts[j] == v and start_levels[j] == start_levels[i]:
            j += 1
        if v == -1:
            for t in range(i, j):
                rest[nrest] = out[t]
                nrest += 1
        else:
            lev = start_levels[i]
            rad = math.pow(T.base, lev)
            xs = np.empty(j - i, dtype=np.int64)
            dv = np.empty(j - i)
            k = 0
            for t in range(i, j):
                d = tdist(T, out[t], T.node_point[v])
                if d <= rad:
                    xs[k] = out[t]
                    dv[k] = d
                    k += 1
                else:
                    rest[nrest] = out[t]
                    nrest += 1
            batch_place(T, v, lev, xs[:k], dv[:k], gather, max_kids)
        i = j
    for t in range(nrest):
        insert_one(T, rest[t], -1, 0, 0)

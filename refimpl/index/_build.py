"""Numba kernels of the batch construction of :mod:`refimpl.index.sgtree`: the divisive build and the rebuild of
emptied clusters (Alg. 3, rebuild_level). Same conventions as :mod:`refimpl.index._kernels` (one TreeArrays ``T``)."""
from __future__ import annotations

import math

import numpy as np
from numba import njit

from refimpl.index._arrays import N_DIST, ROOT
from refimpl.index._distance import prefetch_row
from refimpl.index._kernels import INF, _alloc, _link_child, duplicate_level, insert_one, level_ceil, tdist, tsqnorm

PF = 4  # rows prefetched ahead in the scans (memory-level parallelism)


@njit(cache=True)
def batch_place(T, v, L, xs, dv):
    """Divisive batch construction: place the targets xs (with dv[i] = d(xs[i], p_v) <= b^L) in cluster (v, L).

    Same invariants as repeated insertion (it is insertion in a coarse-to-fine order): for the current cluster
    (u, L) with point set S, l* = the first level at which some point of S leaves the self-child's cover
    (capped at L-1); a greedy net (scan order) of the T.points not covered by the self-child at l* becomes the new
    children of level l* (pairwise and from p_u > b^l*, so separated; covering d <= b^(l*+1) by the choice of l*);
    every other point goes to the nearest covering member of the group, the self-child winning ties; recurse.
    Identical copies of p_u become duplicate children below all others. Counts and MAXD are exact (every point's
    distance to every ancestor is computed on the way down), MIND exact. xs and dv are scratch (reordered)."""
    n = xs.shape[0]
    if n == 0:
        return
    # ancestors above v (the caller detached these T.points from v's subtree: counts only, MAXD stays valid)
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
    lab = np.empty(n, dtype=np.int64)
    dbest = np.empty(n)
    tmp_x = np.empty(n, dtype=np.int64)
    tmp_d = np.empty(n)
    tmp_s = np.empty(n)
    kids = np.empty(n, dtype=np.int64)
    cnt = np.empty(n + 2, dtype=np.int64)
    # task stack: node, level, start, end
    st_v = np.empty(n + 1, dtype=np.int64)
    st_l = np.empty(n + 1, dtype=np.int64)
    st_s = np.empty(n + 1, dtype=np.int64)
    st_e = np.empty(n + 1, dtype=np.int64)
    top = 0
    st_v[0] = v
    st_l[0] = L
    st_s[0] = 0
    st_e[0] = n
    top = 1
    while top > 0:
        top -= 1
        u = st_v[top]
        lev = st_l[top]
        s = st_s[top]
        e = st_e[top]
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
            # greedy net of the T.points the self-child does not cover
            k = 0
            gmin = INF
            for i in range(s, e):
                lab[i] = 0
                if i + PF < e and dv[i + PF] > rad:
                    prefetch_row(T.points, xs[i + PF])
                if dv[i] > rad:
                    x = xs[i]
                    far = True
                    xmin = INF  # lower bound of x's distance to the kids (exact where computed): for MIND
                    for q in range(k):
                        c = kids[q]
                        lb = abs(dv[i] - T.node_pdist[c])
                        if lb > rad:
                            if lb < xmin:
                                xmin = lb
                            continue
                        dc = tdist(T, x, T.node_point[c])
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
                        c = _alloc(T, x, ls, u, dv[i])
                        # append at the tail of u's child list (levels only decrease along the self-chain)
                        if tail == -1:
                            T.node_first_child[u] = c
                        else:
                            T.node_next_sibling[tail] = c
                        tail = c
                        kids[k] = c
                        k += 1
                        lab[i] = -1
            if gmin < T.node_mind[u]:
                T.node_mind[u] = gmin
            if gmin - rad < T.node_sepslack[u]:  # separation slack of the new group (inf - rad if no kid)
                T.node_sepslack[u] = gmin - rad
            # assignment: nearest covering member of the group (self wins ties)
            for q in range(k + 2):
                cnt[q] = 0
            for i in range(s, e):
                if i + PF < e and lab[i + PF] != -1:
                    prefetch_row(T.points, xs[i + PF])
                if lab[i] == -1:
                    continue
                x = xs[i]
                if dv[i] <= rad:
                    best = 0
                    bd = dv[i]
                else:
                    best = -1
                    bd = INF
                for q in range(k):
                    c = kids[q]
                    lb = abs(dv[i] - T.node_pdist[c])
                    if lb > rad or lb >= bd:
                        continue
                    dc = tdist(T, x, T.node_point[c])
                    T.state[N_DIST] += 1
                    if dc <= rad and dc < bd:
                        bd = dc
                        best = q + 1
                lab[i] = best
                dbest[i] = bd
                cnt[best] += 1
            # counting sort: self first, then child 1..k (child reps themselves dropped)
            off = np.empty(k + 1, dtype=np.int64)
            acc = s
            for q in range(k + 1):
                off[q] = acc
                acc += cnt[q]
            pos = off.copy()
            for i in range(s, e):
                q = lab[i]
                if q == -1:
                    continue
                tmp_x[pos[q]] = xs[i]
                tmp_d[pos[q]] = dbest[i]
                tmp_s[pos[q]] = sqv[i]
                pos[q] += 1
            for i in range(s, acc):
                xs[i] = tmp_x[i]
                dv[i] = tmp_d[i]
                sqv[i] = tmp_s[i]
            for q in range(k):
                st_v[top] = kids[q]
                st_l[top] = ls
                st_s[top] = off[q + 1]
                st_e[top] = off[q + 1] + cnt[q + 1]
                top += 1
            e = s + cnt[0]
            lev = ls
        # duplicates of p_u: one duplicate level (an existing duplicate child's, else below every child of u)
        if ndup_start < e0:
            dl = duplicate_level(T, u, L0)
            for i in range(ndup_start, e0):
                c = _alloc(T, xs[i], dl, u, 0.0)
                _link_child(T, u, c)
            T.node_mind[u] = 0.0


@njit(cache=True)
def batch_build(T, perm):
    """Build over the targets perm (empty tree): root = perm[0] at level ceil(log_b max distance), then
    :func:`batch_place` with the remaining T.points in perm order (the greedy nets scan in this order)."""
    n = perm.shape[0]
    r = _alloc(T, perm[0], 0, -1, 0.0)
    T.state[ROOT] = r
    xs = perm[1:].copy()
    dv = np.empty(n - 1)
    dmax = 0.0
    for i in range(n - 1):
        dv[i] = tdist(T, xs[i], perm[0])
        if dv[i] > dmax:
            dmax = dv[i]
    if dmax > 0.0:
        T.node_level[r] = level_ceil(dmax, T.base)
    batch_place(T, r, T.node_level[r], xs, dv)


@njit(cache=True)
def rebuild_segments(T, out, starts, start_levels, m):
    """Reinsert the m targets detached by :func:`detach_clusters`: each run of equal starts (v, l) is rebuilt by
    :func:`batch_place` under the same representative with the T.points still within b^l of it; the others (and
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
            batch_place(T, v, lev, xs[:k], dv[:k])
        i = j
    for t in range(nrest):
        insert_one(T, rest[t], -1, 0, 0)

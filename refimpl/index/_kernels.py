"""Numba kernels that mutate an SG tree (:mod:`refimpl.index.sgtree`; read its docstring first).

Every kernel takes the tree as one :class:`refimpl.index.TreeArrays` ``T`` (first argument) and reads its counters
by the named constants ``ROOT``, ``N_NODES``, ``FREE_TOP``, ``N_DIST``. The Python caller guarantees the node
capacity (``n_nodes + #new nodes <= len(node_point)``). Contents: node allocation and linking, the duplicate-level
rule, unlinking, insertion (SG descent), detaching clusters / subtrees / removed targets, the statistics after
moved points, Alg. 3's marking pass, C_(l), and the recomputation of every statistic (used by ``load``).
"""
from __future__ import annotations

import math

import numpy as np
from numba import njit

from refimpl.index._arrays import FREE_TOP, N_DIST, N_NODES, ROOT
from refimpl.index._distance import dist, sqnorm

INF = np.inf


@njit(cache=True)
def tdist(T, i, j):
    """Distance between targets i and j of the tree."""
    return dist(T.points, i, T.points, j)


@njit(cache=True)
def tsqnorm(T, i):
    """Squared norm of target i."""
    return sqnorm(T.points, i)


@njit(cache=True)
def level_ceil(d, base):
    """Smallest integer l with base**l >= d (d > 0)."""
    lv = int(math.ceil(math.log(d) / math.log(base)))
    while math.pow(base, lv) < d:
        lv += 1
    while math.pow(base, lv - 1) >= d:
        lv -= 1
    return lv


@njit(cache=True)
def _alloc(T, x, level, parent, pdist):
    if T.state[FREE_TOP] > 0:
        T.state[FREE_TOP] -= 1
        v = T.free_stack[T.state[FREE_TOP]]
    else:
        v = T.state[N_NODES]
        T.state[N_NODES] += 1
    T.node_point[v] = x
    T.node_level[v] = level
    T.node_parent[v] = parent
    T.node_first_child[v] = -1
    T.node_next_sibling[v] = -1
    T.node_maxd[v] = 0.0
    T.node_mind[v] = INF
    T.node_sepslack[v] = INF
    T.node_count[v] = 1
    T.node_pdist[v] = pdist
    T.node_maxnorm[v] = tsqnorm(T, x)
    T.point_node[x] = v
    return v


@njit(cache=True)
def _link_child(T, v, c):
    """Insert node c into v's child list, after every child of level >= level(c) (keeps descending order)."""
    lc = T.node_level[c]
    prev = -1
    cur = T.node_first_child[v]
    while cur != -1 and T.node_level[cur] >= lc:
        prev = cur
        cur = T.node_next_sibling[cur]
    T.node_next_sibling[c] = cur
    if prev == -1:
        T.node_first_child[v] = c
    else:
        T.node_next_sibling[prev] = c


@njit(cache=True)
def duplicate_level(T, u, L):
    """Level of a new copy of p_u in cluster (u, L): the level of u's existing duplicate child if any, else one
    below u's lowest child (level(u) - 1 without children), capped at L - 1. Separation is waived only between
    identical points, so a copy never breaks it and a chain of copies never descends forever."""
    p = T.node_point[u]
    lev = T.node_level[u] - 1
    c = T.node_first_child[u]
    while c != -1:
        if tdist(T, T.node_point[c], p) == 0.0:
            lev = T.node_level[c]
            break
        lev = T.node_level[c] - 1
        c = T.node_next_sibling[c]
    return lev if lev < L - 1 else L - 1


@njit(cache=True)
def _subtract_count(T, a, k):
    """count -= k on node a and all its ancestors."""
    while a != -1:
        T.node_count[a] -= k
        a = T.node_parent[a]


@njit(cache=True)
def _unlink(T, v):
    """Cut node v (not the root) from its parent's child list and subtract its count along the ancestors."""
    par = T.node_parent[v]
    prev = -1
    c = T.node_first_child[par]
    while c != v:
        prev = c
        c = T.node_next_sibling[c]
    if prev == -1:
        T.node_first_child[par] = T.node_next_sibling[v]
    else:
        T.node_next_sibling[prev] = T.node_next_sibling[v]
    _subtract_count(T, par, T.node_count[v])


@njit(cache=True)
def insert_one(T, x, v, L, anc_mode):
    """Insert target x starting at cluster (v, L) (v = -1: from the root, raising its level if needed).

    Precondition for v != -1: d(x, p_v) <= b^L. anc_mode: 0 = do not touch the ancestors of v (caller did),
    1 = count += 1 and MAXNORM on the ancestors of v (x was already their descendant, so their MAXD stays valid).
    Greedy SG descent (sgtree.py docstring, "Insertion"): at each child group (level l, descending) descend into the
    nearest child covering x (d <= b^l) if it is strictly nearer than p_v; otherwise attach x at the first level
    where the self-child p_v does not cover it. A point identical to p_v becomes a duplicate child.
    """
    sq = tsqnorm(T, x)
    if v == -1:
        v = T.state[ROOT]
        if v == -1:
            T.state[ROOT] = _alloc(T, x, 0, -1, 0.0)
            return
        d0 = tdist(T, x, T.node_point[v])
        if d0 > 0.0 and math.pow(T.base, T.node_level[v]) < d0:
            T.node_level[v] = level_ceil(d0, T.base)
        L = T.node_level[v]
    elif anc_mode == 1:
        a = T.node_parent[v]
        while a != -1:
            T.node_count[a] += 1
            if sq > T.node_maxnorm[a]:
                T.node_maxnorm[a] = sq
            a = T.node_parent[a]
    while True:
        p = T.node_point[v]
        d0 = tdist(T, x, p)
        T.state[N_DIST] += 1
        T.node_count[v] += 1
        if d0 > T.node_maxd[v]:
            T.node_maxd[v] = d0
        if sq > T.node_maxnorm[v]:
            T.node_maxnorm[v] = sq
        if d0 == 0.0:
            c = _alloc(T, x, duplicate_level(T, v, L), v, 0.0)
            _link_child(T, v, c)
            T.node_mind[v] = 0.0
            return
        l_att = level_ceil(d0, T.base) - 1
        if l_att > L - 1:
            l_att = L - 1
        best = -1
        bestd = d0
        cur_level = L  # sentinel (no child group seen yet)
        rad = 0.0
        gmin = INF
        c = T.node_first_child[v]
        while c != -1:
            lc = T.node_level[c]
            if lc >= L:
                c = T.node_next_sibling[c]
                continue
            if lc < l_att:
                break
            if lc != cur_level:
                if best != -1:
                    break
                cur_level = lc
                rad = math.pow(T.base, lc)
            # triangle inequality: |d0 - PDIST(c)| <= d(x, p_c); skip c when it cannot cover x nor be nearer
            lb = abs(d0 - T.node_pdist[c])
            if (lb <= rad and lb < bestd) or (lc == l_att and lb < gmin and lb < d0):
                dc = tdist(T, x, T.node_point[c])
                T.state[N_DIST] += 1
                if dc <= rad and dc < bestd:
                    best = c
                    bestd = dc
                if lc == l_att and dc < gmin:
                    gmin = dc
            c = T.node_next_sibling[c]
        if best != -1:
            v = best
            L = T.node_level[best]
            continue
        c = _alloc(T, x, l_att, v, d0)
        _link_child(T, v, c)
        m = d0 if d0 < gmin else gmin
        if m < T.node_mind[v]:
            T.node_mind[v] = m
        sl = m - math.pow(T.base, l_att)  # separation slack of the group x joined
        if sl < T.node_sepslack[v]:
            T.node_sepslack[v] = sl
        return


@njit(cache=True)
def insert_many(T, xs, starts, start_levels):
    """Insert targets xs in order. starts[i] = -1: from the root; else from cluster (starts[i], start_levels[i])
    when x is within b^level of that representative (ancestors get count/MAXNORM only), else from the root."""
    for i in range(xs.shape[0]):
        x = xs[i]
        v = starts[i]
        if v != -1 and T.node_point[v] != -1 and tdist(T, x, T.node_point[v]) <= math.pow(T.base, start_levels[i]):
            insert_one(T, x, v, start_levels[i], 1)
        else:
            insert_one(T, x, -1, 0, 0)


@njit(cache=True)
def _free_subtree(T, c, out, pos, stack):
    """Free node c and its whole subtree, appending its targets to out[pos:]; returns the new pos."""
    top = 0
    stack[top] = c
    top += 1
    while top > 0:
        top -= 1
        u = stack[top]
        ch = T.node_first_child[u]
        while ch != -1:
            stack[top] = ch
            top += 1
            ch = T.node_next_sibling[ch]
        out[pos] = T.node_point[u]
        pos += 1
        T.point_node[T.node_point[u]] = -1
        T.node_point[u] = -1
        T.node_parent[u] = -1
        T.node_first_child[u] = -1
        T.node_next_sibling[u] = -1
        T.free_stack[T.state[FREE_TOP]] = u
        T.state[FREE_TOP] += 1
    return pos


@njit(cache=True)
def detach_clusters(T, vs, levels, out, starts, start_levels):
    """Empty the clusters (vs[i], levels[i]): cut the children of level < levels[i] (a suffix of the child list),
    free their subtrees, subtract the counts along the ancestors. A cluster above the root's level empties the
    whole tree except the root. Collected targets go to out, with their cluster as start. Returns their number."""
    stack = np.empty(T.state[N_NODES] + 1, dtype=np.int64)
    pos = 0
    for i in range(vs.shape[0]):
        v = vs[i]
        lev = levels[i]
        if T.node_point[v] == -1:
            continue  # freed by an enclosing cluster of this same call
        prev = -1
        c = T.node_first_child[v]
        while c != -1 and T.node_level[c] >= lev:
            prev = c
            c = T.node_next_sibling[c]
        if c == -1:
            continue
        if prev == -1:
            T.node_first_child[v] = -1
        else:
            T.node_next_sibling[prev] = -1
        p0 = pos
        while c != -1:
            nxt = T.node_next_sibling[c]
            pos = _free_subtree(T, c, out, pos, stack)
            c = nxt
        for j in range(p0, pos):
            starts[j] = v
            start_levels[j] = lev if lev <= T.node_level[v] else T.node_level[v]
        _subtract_count(T, v, pos - p0)
    for j in range(pos):  # a start freed by an enclosing cluster (or reused later) must not be trusted
        if T.node_point[starts[j]] == -1:
            starts[j] = -1
    return pos


@njit(cache=True)
def remove_nodes(T, ids, out):
    """Detach the node of every target in ids with its subtree; the other targets of those subtrees (to be
    reinserted by the caller) go to out. Removed targets get point_node = -1. Returns the number collected."""
    stack = np.empty(T.state[N_NODES] + 1, dtype=np.int64)
    removed = np.zeros(T.points.shape[0], dtype=np.bool_)
    for i in range(ids.shape[0]):
        removed[ids[i]] = True
    pos = 0
    for i in range(ids.shape[0]):
        v = T.point_node[ids[i]]
        if v == -1:
            continue  # already freed inside another removed subtree
        if T.node_parent[v] == -1:
            T.state[ROOT] = -1
        else:
            _unlink(T, v)
        pos = _free_subtree(T, v, out, pos, stack)
    m = 0
    for j in range(pos):
        if not removed[out[j]]:
            out[m] = out[j]
            m += 1
    return m


@njit(cache=True)
def group_min_dist(T, v, lev):
    """Min pairwise distance within the explicit child group of cluster (v, lev+1): p_v and its children of level
    lev. Pairs of identical points are skipped (their separation is waived). inf if the group has < 2 members."""
    m = INF
    c = T.node_first_child[v]
    while c != -1 and T.node_level[c] > lev:
        c = T.node_next_sibling[c]
    first = c
    while c != -1 and T.node_level[c] == lev:
        d = tdist(T, T.node_point[v], T.node_point[c])
        if d > 0.0 and d < m:
            m = d
        e = T.node_next_sibling[c]
        while e != -1 and T.node_level[e] == lev:
            d = tdist(T, T.node_point[e], T.node_point[c])
            if d > 0.0 and d < m:
                m = d
            e = T.node_next_sibling[e]
        c = T.node_next_sibling[c]
    return m if first != -1 else INF


@njit(cache=True)
def update_stats(T, moved_nodes):
    """After the rows of the targets of moved_nodes changed (sorted by ascending level): make PDIST exact, MAXD and
    MAXNORM valid upper bounds and MIND / SEPSLACK valid lower bounds again, touching only the affected paths: unmoved
    ancestors get max(old MAXD, exact distance to each moved point); a moved node gets max over its children of
    PDIST + MAXD (triangle inequality); MIND = min(old, every changed pair), so it may become stale-low."""
    n = moved_nodes.shape[0]
    moved = np.zeros(T.state[N_NODES], dtype=np.bool_)
    for i in range(n):
        moved[moved_nodes[i]] = True
    for i in range(n):
        v = moved_nodes[i]
        if T.node_parent[v] != -1:
            T.node_pdist[v] = tdist(T, T.node_point[v], T.node_point[T.node_parent[v]])
        c = T.node_first_child[v]
        while c != -1:
            T.node_pdist[c] = tdist(T, T.node_point[v], T.node_point[c])
            c = T.node_next_sibling[c]
    # unmoved ancestors: their old bound covers their unmoved descendants; add the moved ones exactly
    for i in range(n):
        v = moved_nodes[i]
        x = T.node_point[v]
        sq = tsqnorm(T, x)
        a = T.node_parent[v]
        while a != -1:
            if not moved[a]:
                d = tdist(T, x, T.node_point[a])
                if d > T.node_maxd[a]:
                    T.node_maxd[a] = d
                if sq > T.node_maxnorm[a]:
                    T.node_maxnorm[a] = sq
            a = T.node_parent[a]
    # moved nodes, children before parents: triangle inequality through the children
    for i in range(n):
        v = moved_nodes[i]
        md = 0.0
        mn = tsqnorm(T, T.node_point[v])
        c = T.node_first_child[v]
        while c != -1:
            t = T.node_pdist[c] + T.node_maxd[c]
            if t > md:
                md = t
            if T.node_maxnorm[c] > mn:
                mn = T.node_maxnorm[c]
            c = T.node_next_sibling[c]
        T.node_maxd[v] = md
        T.node_maxnorm[v] = mn
    # MIND stays a valid lower bound: only pairs involving a moved point changed (O(group size) per move)
    for i in range(n):
        v = moved_nodes[i]
        c = T.node_first_child[v]
        while c != -1:  # pairs (p_v, child)
            if T.node_pdist[c] < T.node_mind[v]:
                T.node_mind[v] = T.node_pdist[c]
            if T.node_pdist[c] > 0.0:
                sl = T.node_pdist[c] - math.pow(T.base, T.node_level[c])
                if sl < T.node_sepslack[v]:
                    T.node_sepslack[v] = sl
            c = T.node_next_sibling[c]
        par = T.node_parent[v]
        if par != -1:  # pairs (v, its group in the parent: p_par and the siblings of the same level)
            sep = math.pow(T.base, T.node_level[v])
            if T.node_pdist[v] < T.node_mind[par]:
                T.node_mind[par] = T.node_pdist[v]
            if T.node_pdist[v] > 0.0 and T.node_pdist[v] - sep < T.node_sepslack[par]:
                T.node_sepslack[par] = T.node_pdist[v] - sep
            c = T.node_first_child[par]
            while c != -1 and T.node_level[c] > T.node_level[v]:
                c = T.node_next_sibling[c]
            while c != -1 and T.node_level[c] == T.node_level[v]:
                if c != v:
                    d = tdist(T, T.node_point[v], T.node_point[c])
                    if d < T.node_mind[par]:
                        T.node_mind[par] = d
                    if d > 0.0 and d - sep < T.node_sepslack[par]:
                        T.node_sepslack[par] = d - sep
                c = T.node_next_sibling[c]


@njit(cache=True)
def maintain_mark(T, U, fine, out_v, out_l, out_e):
    """Alg. 3 (UpdateSGTree) top-down. Returns (number of clusters (v, l) to rebuild in out_v/out_l, number of
    single child subtrees to reinsert in out_e).

    Cluster (v, l+1) with explicit child group G (p_v and the children of level l) survives a drift U if
    b^(l+1) > U, every child c in G has PDIST(c) + U <= b^(l+1) (Eq. 10, our parent-child covering) and every
    non-identical pair of G is >= b^l + U apart (Eq. 11; SEPSLACK(v) >= U proves it for all of v's groups at once,
    else the pairs are computed). Otherwise (fine =
    False, Alg. 3) the cluster is rebuilt with everything below it in v; with fine = True only the offending children
    (covering failures, and one member of each too-close pair) are detached with their subtrees and reinserted,
    the group's other children are kept. Surviving children are visited."""
    root = T.state[ROOT]
    n_out = 0
    n_e = 0
    if root == -1:
        return 0, 0
    stack = np.empty(T.state[N_NODES] + 1, dtype=np.int64)
    bad = np.zeros(T.state[N_NODES], dtype=np.bool_)
    top = 0
    stack[top] = root
    top += 1
    while top > 0:
        top -= 1
        v = stack[top]
        lv = T.node_level[v]
        if U > 0.0 and math.pow(T.base, lv) <= U and T.node_first_child[v] != -1:
            out_v[n_out] = v
            out_l[n_out] = lv
            n_out += 1
            continue
        c = T.node_first_child[v]
        while c != -1:
            lc = T.node_level[c]
            if U > 0.0 and math.pow(T.base, lc + 1) <= U:  # (b^l may underflow to 0 at extreme levels)
                out_v[n_out] = v
                out_l[n_out] = lc + 1
                n_out += 1
                break
            cov = math.pow(T.base, lc + 1)
            sep = math.pow(T.base, lc)
            ok = True
            e = c
            while e != -1 and T.node_level[e] == lc:
                if T.node_pdist[e] + U > cov:
                    ok = False
                    bad[e] = True
                e = T.node_next_sibling[e]
            if T.node_sepslack[v] < U and (fine or ok):  # slack >= U proves Eq. 11 for every group of v
                if fine:  # exact pairs: mark the later member of each too-close pair
                    e = c
                    while e != -1 and T.node_level[e] == lc:
                        if not bad[e]:
                            d = T.node_pdist[e]
                            if d > 0.0 and d - U < sep:
                                bad[e] = True
                        f = T.node_next_sibling[e]
                        while f != -1 and T.node_level[f] == lc and not bad[e]:
                            if not bad[f]:
                                d = tdist(T, T.node_point[e], T.node_point[f])
                                if d > 0.0 and d - U < sep:
                                    bad[f] = True
                            f = T.node_next_sibling[f]
                        e = T.node_next_sibling[e]
                elif group_min_dist(T, v, lc) - U < sep:
                    ok = False
            if not ok and not fine:
                out_v[n_out] = v
                out_l[n_out] = lc + 1
                n_out += 1
                break
            while c != -1 and T.node_level[c] == lc:
                if bad[c]:
                    out_e[n_e] = c
                    n_e += 1
                    bad[c] = False
                else:
                    stack[top] = c
                    top += 1
                c = T.node_next_sibling[c]
    return n_out, n_e


@njit(cache=True)
def detach_nodes(T, es, out, starts, start_levels):
    """Cut each node e (with its subtree) from its parent v, subtract the counts along v's ancestors and free the
    nodes; the targets (p_e included) go to out with start (v, level(e) + 1). Returns their number."""
    stack = np.empty(T.state[N_NODES] + 1, dtype=np.int64)
    pos = 0
    for i in range(es.shape[0]):
        e = es[i]
        if T.node_point[e] == -1:
            continue
        v = T.node_parent[e]
        _unlink(T, e)
        lev = T.node_level[e] + 1
        p0 = pos
        pos = _free_subtree(T, e, out, pos, stack)
        for j in range(p0, pos):
            starts[j] = v
            start_levels[j] = lev
    return pos


@njit(cache=True)
def clustering_arrays(T, level, out_nodes, out_sizes, out_radii):
    """C_(level): one cluster per live node v with level >= level (the root always). cluster(v, level) = p_v and
    the subtrees of the children of level < level; size 1 + their counts; radius min(MAXD(v),
    max_c PDIST(c) + MAXD(c))."""
    k = 0
    root = T.state[ROOT]
    for v in range(T.state[N_NODES]):
        if T.node_point[v] == -1 or (T.node_level[v] < level and v != root):
            continue
        size = 1
        rad = 0.0
        c = T.node_first_child[v]
        while c != -1:
            if T.node_level[c] < level:
                size += T.node_count[c]
                t = T.node_pdist[c] + T.node_maxd[c]
                if t > rad:
                    rad = t
            c = T.node_next_sibling[c]
        if T.node_maxd[v] < rad:
            rad = T.node_maxd[v]
        out_nodes[k] = v
        out_sizes[k] = size
        out_radii[k] = rad
        k += 1
    return k


@njit(cache=True)
def recompute_stats(T, order, count, maxd, maxnorm, pdist, mind, slack):
    """Recompute every statistic of the live nodes from the points and links alone (the oracle ``load`` compares
    a file's statistics with): count, exact MAXD (max distance from p_v to a descendant), exact MAXNORM, PDIST,
    MIND (min pairwise distance within each child group, self-child included) and SEPSLACK (min over the groups of
    level l of (smallest non-identical pair distance) - b^l). ``order``: the live nodes; parent links must be
    acyclic (levels strictly decrease from parent to child, checked by the caller). Cost: depth distances per node
    plus the pairs within each child group."""
    for i in range(order.shape[0]):
        v = order[i]
        count[v] = 0
        maxd[v] = 0.0
        maxnorm[v] = 0.0
        mind[v] = INF
        slack[v] = INF
    for i in range(order.shape[0]):
        v = order[i]
        x = T.node_point[v]
        sq = tsqnorm(T, x)
        par = T.node_parent[v]
        pdist[v] = 0.0 if par == -1 else tdist(T, x, T.node_point[par])
        count[v] += 1
        if sq > maxnorm[v]:
            maxnorm[v] = sq
        a = par
        while a != -1:
            count[a] += 1
            d = tdist(T, x, T.node_point[a])
            if d > maxd[a]:
                maxd[a] = d
            if sq > maxnorm[a]:
                maxnorm[a] = sq
            a = T.node_parent[a]
    for i in range(order.shape[0]):
        v = order[i]
        c = T.node_first_child[v]
        while c != -1:
            lc = T.node_level[c]
            sep = math.pow(T.base, lc)
            d = pdist[c]
            if d < mind[v]:
                mind[v] = d
            if d > 0.0 and d - sep < slack[v]:
                slack[v] = d - sep
            e = T.node_next_sibling[c]
            while e != -1 and T.node_level[e] == lc:
                d = tdist(T, T.node_point[e], T.node_point[c])
                if d < mind[v]:
                    mind[v] = d
                if d > 0.0 and d - sep < slack[v]:
                    slack[v] = d - sep
                e = T.node_next_sibling[e]
            c = T.node_next_sibling[c]

"""Numba kernels of :mod:`refimpl.index.sgtree` (struct-of-arrays SG tree). Read sgtree.py's docstring first.

Every kernel takes the tree's arrays in the same order (the ``T`` tuple below is unpacked by the caller):

    points, base, point_node, node_point, node_level, node_parent, node_first_child, node_next_sibling,
    node_maxd, node_mind, node_count, node_pdist, node_maxnorm, node_sepslack, free_stack, state

``state`` is int64 ``[root, n_nodes (high-water mark), free_top, distance computations (diagnostic)]``. Only
float64 and int64 arrays, so each kernel
compiles once. The Python caller guarantees the node capacity (``n_nodes + #new nodes <= len(node_point)``).
"""
from __future__ import annotations

import math

import numpy as np
from numba import njit

INF = np.inf


def _make_prefetch():
    """``prefetch(a, i, j)``: hint the CPU to load the cache line of a[i, j] (llvm.prefetch), so that random rows
    are fetched in parallel; a no-op if this llvmlite cannot emit it. Search and build are memory-latency bound
    (a random 512-byte row costs ~300 ns): prefetching a few rows ahead measured ~2x per row."""
    try:
        from llvmlite import ir
        from numba import types
        from numba.core import cgutils
        from numba.extending import intrinsic

        @intrinsic
        def prefetch(typingctx, arr, row, col):
            def codegen(context, builder, signature, args):
                aryty = signature.args[0]
                ary = context.make_array(aryty)(context, builder, args[0])
                r = context.cast(builder, args[1], signature.args[1], types.intp)
                c = context.cast(builder, args[2], signature.args[2], types.intp)
                ptr = cgutils.get_item_pointer(context, builder, aryty, ary, [r, c], wraparound=False)
                i8p = ir.IntType(8).as_pointer()
                fnty = ir.FunctionType(ir.VoidType(), [i8p, ir.IntType(32), ir.IntType(32), ir.IntType(32)])
                fn = cgutils.get_or_insert_function(builder.module, fnty, "llvm.prefetch.p0i8")
                i32 = ir.IntType(32)
                builder.call(fn, [builder.bitcast(ptr, i8p), ir.Constant(i32, 0), ir.Constant(i32, 3),
                                  ir.Constant(i32, 1)])
                return context.get_dummy_value()

            return types.void(arr, row, col), codegen

        @njit
        def _probe(a):
            prefetch(a, 0, 0)

        _probe(np.zeros((1, 1)))
        return prefetch
    except Exception:  # pragma: no cover - depends on the llvmlite build
        @njit
        def prefetch(a, i, j):
            pass

        return prefetch


prefetch = _make_prefetch()


@njit(cache=True)
def prefetch_row(points, i):
    for j in range(0, points.shape[1], 8):
        prefetch(points, i, j)


@njit(cache=True)
def dist(points, i, j):
    """Euclidean distance between rows i and j; exact 0 iff the rows are identical (no underflow to 0)."""
    d = points.shape[1]
    s0 = 0.0
    s1 = 0.0
    s2 = 0.0
    s3 = 0.0
    k = 0
    while k + 4 <= d:  # four independent accumulators: a fixed order that the compiler can vectorise
        t0 = points[i, k] - points[j, k]
        t1 = points[i, k + 1] - points[j, k + 1]
        t2 = points[i, k + 2] - points[j, k + 2]
        t3 = points[i, k + 3] - points[j, k + 3]
        s0 += t0 * t0
        s1 += t1 * t1
        s2 += t2 * t2
        s3 += t3 * t3
        k += 4
    while k < d:
        t0 = points[i, k] - points[j, k]
        s0 += t0 * t0
        k += 1
    s = (s0 + s1) + (s2 + s3)
    if s < 1e-280:  # possible underflow of tiny differences: recompute scaled
        m = 0.0
        for k in range(d):
            t = abs(points[i, k] - points[j, k])
            if t > m:
                m = t
        if m == 0.0:
            return 0.0
        s = 0.0
        for k in range(d):
            t = (points[i, k] - points[j, k]) / m
            s += t * t
        return m * math.sqrt(s)
    return math.sqrt(s)


@njit(cache=True)
def sqnorm(points, i):
    s = 0.0
    for k in range(points.shape[1]):
        s += points[i, k] * points[i, k]
    return s


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
def _alloc(x, level, parent, pdist, points, point_node, NP, NL, NPar, NFC, NNS, NMaxd, NMind, NCount, NPdist,
           NMaxn, NSlack, free_stack, state):
    if state[2] > 0:
        state[2] -= 1
        v = free_stack[state[2]]
    else:
        v = state[1]
        state[1] += 1
    NP[v] = x
    NL[v] = level
    NPar[v] = parent
    NFC[v] = -1
    NNS[v] = -1
    NMaxd[v] = 0.0
    NMind[v] = INF
    NSlack[v] = INF
    NCount[v] = 1
    NPdist[v] = pdist
    NMaxn[v] = sqnorm(points, x)
    point_node[x] = v
    return v


@njit(cache=True)
def _link_child(v, c, NL, NFC, NNS):
    """Insert node c into v's child list, after every child of level >= NL[c] (keeps descending order)."""
    lc = NL[c]
    prev = -1
    cur = NFC[v]
    while cur != -1 and NL[cur] >= lc:
        prev = cur
        cur = NNS[cur]
    NNS[c] = cur
    if prev == -1:
        NFC[v] = c
    else:
        NNS[prev] = c


@njit(cache=True)
def insert_one(x, v, L, anc_mode, points, base, point_node, NP, NL, NPar, NFC, NNS, NMaxd, NMind, NCount, NPdist,
               NMaxn, NSlack, free_stack, state):
    """Insert target x starting at cluster (v, L) (v = -1: from the root, raising its level if needed).

    Precondition for v != -1: d(x, p_v) <= base**L. anc_mode: 0 = do not touch the ancestors of v (caller did),
    1 = count += 1 and MAXNORM on the ancestors of v (x was already their descendant, so their MAXD stays valid).
    Greedy SG descent (sgtree.py docstring, "Insertion"): at each child group (level l, descending) descend into the
    nearest child covering x (d <= b^l) if it is strictly nearer than p_v; otherwise attach x at the first level
    where the self-child p_v does not cover it. A point identical to p_v becomes a duplicate child.
    """
    sq = sqnorm(points, x)
    if v == -1:
        v = state[0]
        if v == -1:
            state[0] = _alloc(x, 0, -1, 0.0, points, point_node, NP, NL, NPar, NFC, NNS, NMaxd, NMind, NCount,
                              NPdist, NMaxn, NSlack, free_stack, state)
            return
        d0 = dist(points, x, NP[v])
        if d0 > 0.0 and math.pow(base, NL[v]) < d0:
            NL[v] = level_ceil(d0, base)
        L = NL[v]
    elif anc_mode == 1:
        a = NPar[v]
        while a != -1:
            NCount[a] += 1
            if sq > NMaxn[a]:
                NMaxn[a] = sq
            a = NPar[a]
    while True:
        p = NP[v]
        d0 = dist(points, x, p)
        state[3] += 1
        NCount[v] += 1
        if d0 > NMaxd[v]:
            NMaxd[v] = d0
        if sq > NMaxn[v]:
            NMaxn[v] = sq
        if d0 == 0.0:
            # duplicate of p_v: same level as an existing duplicate child, else below every child; separation
            # is waived only between identical points.
            lev = NL[v] - 1
            c = NFC[v]
            while c != -1:
                if dist(points, NP[c], p) == 0.0:
                    lev = NL[c]
                    break
                lev = NL[c] - 1
                c = NNS[c]
            if lev > L - 1:
                lev = L - 1
            c = _alloc(x, lev, v, 0.0, points, point_node, NP, NL, NPar, NFC, NNS, NMaxd, NMind, NCount, NPdist,
                       NMaxn, NSlack, free_stack, state)
            _link_child(v, c, NL, NFC, NNS)
            NMind[v] = 0.0
            return
        l_att = level_ceil(d0, base) - 1
        if l_att > L - 1:
            l_att = L - 1
        best = -1
        bestd = d0
        cur_level = L  # sentinel (no child group seen yet)
        rad = 0.0
        gmin = INF
        c = NFC[v]
        while c != -1:
            lc = NL[c]
            if lc >= L:
                c = NNS[c]
                continue
            if lc < l_att:
                break
            if lc != cur_level:
                if best != -1:
                    break
                cur_level = lc
                rad = math.pow(base, lc)
            # triangle inequality: |d0 - PDIST(c)| <= d(x, p_c); skip c when it cannot cover x nor be nearer
            lb = abs(d0 - NPdist[c])
            if (lb <= rad and lb < bestd) or (lc == l_att and lb < gmin and lb < d0):
                dc = dist(points, x, NP[c])
                state[3] += 1
                if dc <= rad and dc < bestd:
                    best = c
                    bestd = dc
                if lc == l_att and dc < gmin:
                    gmin = dc
            c = NNS[c]
        if best != -1:
            v = best
            L = NL[best]
            continue
        c = _alloc(x, l_att, v, d0, points, point_node, NP, NL, NPar, NFC, NNS, NMaxd, NMind, NCount, NPdist,
                   NMaxn, NSlack, free_stack, state)
        _link_child(v, c, NL, NFC, NNS)
        m = d0 if d0 < gmin else gmin
        if m < NMind[v]:
            NMind[v] = m
        sl = m - math.pow(base, l_att)  # separation slack of the group x joined
        if sl < NSlack[v]:
            NSlack[v] = sl
        return


@njit(cache=True)
def insert_many(xs, starts, start_levels, points, base, point_node, NP, NL, NPar, NFC, NNS, NMaxd, NMind, NCount,
                NPdist, NMaxn, NSlack, free_stack, state):
    """Insert targets xs in order. starts[i] = -1: from the root; else from cluster (starts[i], start_levels[i])
    when x is within base**level of that representative (ancestors get count/MAXNORM only), else from the root."""
    for i in range(xs.shape[0]):
        x = xs[i]
        v = starts[i]
        if v != -1 and NP[v] != -1 and dist(points, x, NP[v]) <= math.pow(base, start_levels[i]):
            insert_one(x, v, start_levels[i], 1, points, base, point_node, NP, NL, NPar, NFC, NNS, NMaxd, NMind,
                       NCount, NPdist, NMaxn, NSlack, free_stack, state)
        else:
            insert_one(x, -1, 0, 0, points, base, point_node, NP, NL, NPar, NFC, NNS, NMaxd, NMind, NCount,
                       NPdist, NMaxn, NSlack, free_stack, state)


@njit(cache=True)
def _free_subtree(c, out, pos, point_node, NP, NPar, NFC, NNS, free_stack, state, stack):
    """Free node c and its whole subtree, appending its targets to out[pos:]; returns the new pos."""
    top = 0
    stack[top] = c
    top += 1
    while top > 0:
        top -= 1
        u = stack[top]
        ch = NFC[u]
        while ch != -1:
            stack[top] = ch
            top += 1
            ch = NNS[ch]
        out[pos] = NP[u]
        pos += 1
        point_node[NP[u]] = -1
        NP[u] = -1
        NPar[u] = -1
        NFC[u] = -1
        NNS[u] = -1
        free_stack[state[2]] = u
        state[2] += 1
    return pos


@njit(cache=True)
def detach_clusters(vs, levels, out, starts, start_levels, points, base, point_node, NP, NL, NPar, NFC, NNS, NMaxd,
                    NMind, NCount, NPdist, NMaxn, NSlack, free_stack, state):
    """Empty the clusters (vs[i], levels[i]): cut the children of level < levels[i] (a suffix of the child list),
    free their subtrees, subtract the counts along the ancestors. A cluster above the root's level empties the
    whole tree except the root. Collected targets go to out, with their cluster as start. Returns their number."""
    stack = np.empty(state[1] + 1, dtype=np.int64)
    pos = 0
    for i in range(vs.shape[0]):
        v = vs[i]
        lev = levels[i]
        if NP[v] == -1:
            continue  # freed by an enclosing cluster of this same call
        prev = -1
        c = NFC[v]
        while c != -1 and NL[c] >= lev:
            prev = c
            c = NNS[c]
        if c == -1:
            continue
        if prev == -1:
            NFC[v] = -1
        else:
            NNS[prev] = -1
        p0 = pos
        while c != -1:
            nxt = NNS[c]
            pos = _free_subtree(c, out, pos, point_node, NP, NPar, NFC, NNS, free_stack, state, stack)
            c = nxt
        k = pos - p0
        for j in range(p0, pos):
            starts[j] = v
            start_levels[j] = lev if lev <= NL[v] else NL[v]
        a = v
        while a != -1:
            NCount[a] -= k
            a = NPar[a]
    for j in range(pos):  # a start freed by an enclosing cluster (or reused later) must not be trusted
        if NP[starts[j]] == -1:
            starts[j] = -1
    return pos


@njit(cache=True)
def remove_nodes(ids, out, points, base, point_node, NP, NL, NPar, NFC, NNS, NMaxd, NMind, NCount, NPdist, NMaxn,
                 NSlack, free_stack, state):
    """Detach the node of every target in ids with its subtree; the other targets of those subtrees (to be
    reinserted by the caller) go to out. Removed targets get point_node = -1. Returns the number collected."""
    stack = np.empty(state[1] + 1, dtype=np.int64)
    removed = np.zeros(points.shape[0], dtype=np.bool_)
    for i in range(ids.shape[0]):
        removed[ids[i]] = True
    pos = 0
    for i in range(ids.shape[0]):
        v = point_node[ids[i]]
        if v == -1:
            continue  # already freed inside another removed subtree
        par = NPar[v]
        if par == -1:
            state[0] = -1
        else:
            prev = -1
            c = NFC[par]
            while c != v:
                prev = c
                c = NNS[c]
            if prev == -1:
                NFC[par] = NNS[v]
            else:
                NNS[prev] = NNS[v]
            k = NCount[v]
            a = par
            while a != -1:
                NCount[a] -= k
                a = NPar[a]
        pos = _free_subtree(v, out, pos, point_node, NP, NPar, NFC, NNS, free_stack, state, stack)
    m = 0
    for j in range(pos):
        if not removed[out[j]]:
            out[m] = out[j]
            m += 1
    return m


@njit(cache=True)
def group_min_dist(v, lev, points, NP, NL, NFC, NNS):
    """Min pairwise distance within the explicit child group of cluster (v, lev+1): p_v and its children of level
    lev. Pairs of identical points are skipped (their separation is waived). inf if the group has < 2 members."""
    m = INF
    c = NFC[v]
    while c != -1 and NL[c] > lev:
        c = NNS[c]
    first = c
    while c != -1 and NL[c] == lev:
        d = dist(points, NP[v], NP[c])
        if d > 0.0 and d < m:
            m = d
        e = NNS[c]
        while e != -1 and NL[e] == lev:
            d = dist(points, NP[e], NP[c])
            if d > 0.0 and d < m:
                m = d
            e = NNS[e]
        c = NNS[c]
    return m if first != -1 else INF


@njit(cache=True)
def node_mind(v, points, NP, NL, NFC, NNS):
    """MIND(v): min over v's child groups of the pairwise distances in the group (self-child included; 0 if v has
    a duplicate child)."""
    m = INF
    c = NFC[v]
    while c != -1:
        lc = NL[c]
        d = dist(points, NP[v], NP[c])
        if d < m:
            m = d
        e = NNS[c]
        while e != -1 and NL[e] == lc:
            d = dist(points, NP[e], NP[c])
            if d < m:
                m = d
            e = NNS[e]
        c = NNS[c]
    return m


@njit(cache=True)
def update_stats(moved_nodes, points, base, point_node, NP, NL, NPar, NFC, NNS, NMaxd, NMind, NCount, NPdist,
                 NMaxn, NSlack, free_stack, state):
    """After the rows of the targets of moved_nodes changed (sorted by ascending level): make PDIST exact, MAXD and
    MAXNORM valid upper bounds and MIND / SEPSLACK valid lower bounds again, touching only the affected paths: unmoved
    ancestors get max(old MAXD, exact distance to each moved point); a moved node gets max over its children of
    PDIST + MAXD (triangle inequality); MIND = min(old, every changed pair), so it may become stale-low."""
    n = moved_nodes.shape[0]
    moved = np.zeros(state[1], dtype=np.bool_)
    for i in range(n):
        moved[moved_nodes[i]] = True
    for i in range(n):
        v = moved_nodes[i]
        if NPar[v] != -1:
            NPdist[v] = dist(points, NP[v], NP[NPar[v]])
        c = NFC[v]
        while c != -1:
            NPdist[c] = dist(points, NP[v], NP[c])
            c = NNS[c]
    # unmoved ancestors: their old bound covers their unmoved descendants; add the moved ones exactly
    for i in range(n):
        v = moved_nodes[i]
        x = NP[v]
        sq = sqnorm(points, x)
        a = NPar[v]
        while a != -1:
            if not moved[a]:
                d = dist(points, x, NP[a])
                if d > NMaxd[a]:
                    NMaxd[a] = d
                if sq > NMaxn[a]:
                    NMaxn[a] = sq
            a = NPar[a]
    # moved nodes, children before parents: triangle inequality through the children
    for i in range(n):
        v = moved_nodes[i]
        md = 0.0
        mn = sqnorm(points, NP[v])
        c = NFC[v]
        while c != -1:
            t = NPdist[c] + NMaxd[c]
            if t > md:
                md = t
            if NMaxn[c] > mn:
                mn = NMaxn[c]
            c = NNS[c]
        NMaxd[v] = md
        NMaxn[v] = mn
    # MIND stays a valid lower bound: only pairs involving a moved point changed (O(group size) per move)
    for i in range(n):
        v = moved_nodes[i]
        c = NFC[v]
        while c != -1:  # pairs (p_v, child)
            if NPdist[c] < NMind[v]:
                NMind[v] = NPdist[c]
            if NPdist[c] > 0.0:
                sl = NPdist[c] - math.pow(base, NL[c])
                if sl < NSlack[v]:
                    NSlack[v] = sl
            c = NNS[c]
        par = NPar[v]
        if par != -1:  # pairs (v, its group in the parent: p_par and the siblings of the same level)
            sep = math.pow(base, NL[v])
            if NPdist[v] < NMind[par]:
                NMind[par] = NPdist[v]
            if NPdist[v] > 0.0 and NPdist[v] - sep < NSlack[par]:
                NSlack[par] = NPdist[v] - sep
            c = NFC[par]
            while c != -1 and NL[c] > NL[v]:
                c = NNS[c]
            while c != -1 and NL[c] == NL[v]:
                if c != v:
                    d = dist(points, NP[v], NP[c])
                    if d < NMind[par]:
                        NMind[par] = d
                    if d > 0.0 and d - sep < NSlack[par]:
                        NSlack[par] = d - sep
                c = NNS[c]


@njit(cache=True)
def maintain_mark(U, fine, out_v, out_l, out_e, points, base, point_node, NP, NL, NPar, NFC, NNS, NMaxd, NMind,
                  NCount, NPdist, NMaxn, NSlack, free_stack, state):
    """Alg. 3 (UpdateSGTree) top-down. Returns (number of clusters (v, l) to rebuild in out_v/out_l, number of
    single child subtrees to reinsert in out_e).

    Cluster (v, l+1) with explicit child group G (p_v and the children of level l) survives a drift U if
    b^(l+1) > U, every child c in G has PDIST(c) + U <= b^(l+1) (Eq. 10, our parent-child covering) and every
    non-identical pair of G is >= b^l + U apart (Eq. 11; SEPSLACK(v) >= U proves it for all of v's groups at once,
    else the pairs are computed). Otherwise (fine =
    False, Alg. 3) the cluster is rebuilt with everything below it in v; with fine = True only the offending children
    (covering failures, and one member of each too-close pair) are detached with their subtrees and reinserted,
    the group's other children are kept. Surviving children are visited."""
    root = state[0]
    n_out = 0
    n_e = 0
    if root == -1:
        return 0, 0
    stack = np.empty(state[1] + 1, dtype=np.int64)
    bad = np.zeros(state[1], dtype=np.bool_)
    top = 0
    stack[top] = root
    top += 1
    while top > 0:
        top -= 1
        v = stack[top]
        lv = NL[v]
        if U > 0.0 and math.pow(base, lv) <= U and NFC[v] != -1:
            out_v[n_out] = v
            out_l[n_out] = lv
            n_out += 1
            continue
        c = NFC[v]
        while c != -1:
            lc = NL[c]
            if U > 0.0 and math.pow(base, lc + 1) <= U:  # (b^l may underflow to 0 at extreme levels)
                out_v[n_out] = v
                out_l[n_out] = lc + 1
                n_out += 1
                break
            cov = math.pow(base, lc + 1)
            sep = math.pow(base, lc)
            ok = True
            e = c
            while e != -1 and NL[e] == lc:
                if NPdist[e] + U > cov:
                    ok = False
                    bad[e] = True
                e = NNS[e]
            if NSlack[v] < U and (fine or ok):  # slack >= U proves Eq. 11 for every group of v
                if fine:  # exact pairs: mark the later member of each too-close pair
                    e = c
                    while e != -1 and NL[e] == lc:
                        if not bad[e]:
                            d = NPdist[e]
                            if d > 0.0 and d - U < sep:
                                bad[e] = True
                        f = NNS[e]
                        while f != -1 and NL[f] == lc and not bad[e]:
                            if not bad[f]:
                                d = dist(points, NP[e], NP[f])
                                if d > 0.0 and d - U < sep:
                                    bad[f] = True
                            f = NNS[f]
                        e = NNS[e]
                elif group_min_dist(v, lc, points, NP, NL, NFC, NNS) - U < sep:
                    ok = False
            if not ok and not fine:
                out_v[n_out] = v
                out_l[n_out] = lc + 1
                n_out += 1
                break
            while c != -1 and NL[c] == lc:
                if bad[c]:
                    out_e[n_e] = c
                    n_e += 1
                    bad[c] = False
                else:
                    stack[top] = c
                    top += 1
                c = NNS[c]
    return n_out, n_e


@njit(cache=True)
def detach_nodes(es, out, starts, start_levels, points, base, point_node, NP, NL, NPar, NFC, NNS, NMaxd, NMind,
                 NCount, NPdist, NMaxn, NSlack, free_stack, state):
    """Cut each node e (with its subtree) from its parent v, subtract the counts along v's ancestors and free the
    nodes; the targets (p_e included) go to out with start (v, level(e) + 1). Returns their number."""
    stack = np.empty(state[1] + 1, dtype=np.int64)
    pos = 0
    for i in range(es.shape[0]):
        e = es[i]
        if NP[e] == -1:
            continue
        v = NPar[e]
        prev = -1
        c = NFC[v]
        while c != e:
            prev = c
            c = NNS[c]
        if prev == -1:
            NFC[v] = NNS[e]
        else:
            NNS[prev] = NNS[e]
        k = NCount[e]
        a = v
        while a != -1:
            NCount[a] -= k
            a = NPar[a]
        lev = NL[e] + 1
        p0 = pos
        pos = _free_subtree(e, out, pos, point_node, NP, NPar, NFC, NNS, free_stack, state, stack)
        for j in range(p0, pos):
            starts[j] = v
            start_levels[j] = lev
    return pos


@njit(cache=True)
def clustering_arrays(level, points, base, point_node, NP, NL, NPar, NFC, NNS, NMaxd, NMind, NCount, NPdist, NMaxn,
                      NSlack, free_stack, state, out_nodes, out_sizes, out_radii):
    """C_(level): one cluster per live node v with level >= level (the root always). cluster(v, level) = p_v and
    the subtrees of the children of level < level; size 1 + their counts; radius min(MAXD(v),
    max_c PDIST(c) + MAXD(c))."""
    k = 0
    root = state[0]
    for v in range(state[1]):
        if NP[v] == -1 or (NL[v] < level and v != root):
            continue
        size = 1
        rad = 0.0
        c = NFC[v]
        while c != -1:
            if NL[c] < level:
                size += NCount[c]
                t = NPdist[c] + NMaxd[c]
                if t > rad:
                    rad = t
            c = NNS[c]
        if NMaxd[v] < rad:
            rad = NMaxd[v]
        out_nodes[k] = v
        out_sizes[k] = size
        out_radii[k] = rad
        k += 1
    return k

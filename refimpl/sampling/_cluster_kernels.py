"""Numba kernels on an SG tree for :mod:`refimpl.sampling.clustering` and the samplers' start-level choice (paper §3,
Alg. 2, Prop. 3).

Every kernel takes the tree as one :class:`refimpl.index.TreeArrays` ``T`` (children in descending level order).
A cluster is a pair ``(v, L)``: ``{p_v}`` plus the subtrees of the children ``c`` of ``v`` with
``node_level[c] < L`` (a suffix of the child list). Points may be float32 or float64; inner products and
distances accumulate in float64.

Contents: ``_dot`` / ``_dist_q`` (the row kernels), ``_first_below``, ``_member`` (u-th member of a cluster),
``suffix_radii`` and ``cluster_info`` (sizes and certified radii), ``find_clustering_kernel`` (Alg. 2),
``refine_kernel`` (the certified refinement), ``level_profile`` (the start level of least estimated cost, Prop. 3),
and the index max-heap ``_heap_push`` / ``_heap_pop`` of the sampling kernels.
"""
from __future__ import annotations

import numpy as np
from numba import njit

from refimpl.index import N_NODES, ROOT, prefetch_row

EPS = 2.0 ** -52  # float64 unit roundoff (x2)

# ----------------------------------------------------------------------------------------------------------------
# small helpers


@njit(cache=True)
def _grow(a, n, cap):
    """A copy of ``a`` with capacity ``cap`` holding its first ``n`` entries."""
    out = np.empty(cap, a.dtype)
    out[:n] = a[:n]
    return out


@njit(cache=True, inline="always")
def _heap_push(hk, hi, size, key, idx):
    """Push (key, idx) onto the max-heap hk[:size], hi[:size] (capacity > size); returns the new size."""
    j = size
    while j > 0:
        p = (j - 1) >> 1
        if hk[p] >= key:
            break
        hk[j] = hk[p]
        hi[j] = hi[p]
        j = p
    hk[j] = key
    hi[j] = idx
    return size + 1


@njit(cache=True, inline="always")
def _heap_pop(hk, hi, size):
    """Remove the top of the max-heap; returns its idx (the heap keeps size - 1 entries)."""
    top = hi[0]
    last = size - 1
    key = hk[last]
    idx = hi[last]
    j = 0
    while True:
        c = 2 * j + 1
        if c >= last:
            break
        if c + 1 < last and hk[c + 1] > hk[c]:
            c += 1
        if hk[c] <= key:
            break
        hk[j] = hk[c]
        hi[j] = hi[c]
        j = c
    if last > 0:
        hk[j] = key
        hi[j] = idx
    return top


@njit(cache=True, fastmath={"contract", "reassoc"})
def _dot(points, i, q):
    """<t_i, q> accumulated in float64 (reassociation allowed: the loop vectorises)."""
    s = 0.0
    for d in range(q.shape[0]):
        s += np.float64(points[i, d]) * q[d]
    return s


@njit(cache=True)
def _dist_q(points, i, q):
    s = 0.0
    for d in range(q.shape[0]):
        t = np.float64(points[i, d]) - q[d]
        s += t * t
    return np.sqrt(s)


@njit(cache=True)
def _first_below(T, v, L):
    """First child of v with level < L (children are in descending level order), -1 if none."""
    c = T.node_first_child[v]
    while c != -1 and T.node_level[c] >= L:
        c = T.node_next_sibling[c]
    return c


@njit(cache=True)
def _member(T, v, L, u):
    """The u-th member (0 <= u < size) of cluster (v, L) in a fixed pre-order; u uniform -> uniform member."""
    if u == 0:
        return T.node_point[v]
    u -= 1
    c = _first_below(T, v, L)
    while c != -1:
        if u < T.node_count[c]:
            if u == 0:
                return T.node_point[c]
            u -= 1
            c = T.node_first_child[c]
        else:
            u -= T.node_count[c]
            c = T.node_next_sibling[c]
    return -1  # counts inconsistent with the child lists (never for a valid tree)


# ----------------------------------------------------------------------------------------------------------------
# clusterings


@njit(cache=True)
def sibling_suffix_max(T, val):
    """out[c] = max of ``val`` over node c and the siblings after it in its parent's child list (O(N))."""
    n_nodes = T.state[N_NODES]
    out = np.zeros(n_nodes, np.float64)
    stack = np.empty(64, np.int64)
    for v in range(n_nodes):
        m = 0
        c = T.node_first_child[v]
        while c != -1:
            if m == stack.shape[0]:
                stack = _grow(stack, m, 2 * m)
            stack[m] = c
            m += 1
            c = T.node_next_sibling[c]
        run = 0.0
        for j in range(m - 1, -1, -1):
            c = stack[j]
            if val[c] > run:
                run = val[c]
            out[c] = run
    return out


@njit(cache=True)
def suffix_radii(T):
    """suf[c] = max over c and the siblings after it of PDIST + MAXD (query-independent, O(N) once per tree version).

    For a cluster (v, L) whose first child below level L is c, rho(v, L) = min(MAXD(v), suf[c]) (0 without such
    a child): a valid bound on the distance from p_v to any member, never b^L."""
    n_nodes = T.state[N_NODES]
    return sibling_suffix_max(T, T.node_pdist[:n_nodes] + T.node_maxd[:n_nodes])


@njit(cache=True, inline="always")
def _cluster_geometry(T, suf, v, L):
    """Cluster (v, L): (size, first child below L (-1: none), certified radius min(MAXD(v), suf[that child]) (0
    without one), children scanned)."""
    size = T.node_count[v]
    c = T.node_first_child[v]
    m = 0
    while c != -1 and T.node_level[c] >= L:
        size -= T.node_count[c]
        m += 1
        c = T.node_next_sibling[c]
    r = 0.0
    if c != -1:
        r = min(suf[c], T.node_maxd[v])
    return size, c, r, m


@njit(cache=True)
def cluster_info(T, suf, nodes, levels):
    """Sizes and certified radii of clusters (nodes[j], levels[j]).

    size(v, L) = count(v) - counts of the children with level >= L; rho(v, L) = min(MAXD(v), suf[first child
    below L]) (see :func:`suffix_radii`), 0 for a singleton. Returns (sizes, radii, children scanned).
    """
    n = nodes.shape[0]
    sizes = np.empty(n, np.int64)
    radii = np.empty(n, np.float64)
    nd = 0
    for j in range(n):
        sizes[j], _, radii[j], m = _cluster_geometry(T, suf, nodes[j], levels[j])
        nd += m
    return sizes, radii, nd


@njit(cache=True)
def find_clustering_kernel(T, q, start_nodes, start_level, m, max_clusters):
    """Alg. 2 (FindClustering) with the union fix of line 13.

    Frontier F_l = C_(start_level) (``start_nodes``). For k = start_level, ..., m + 1 every frontier cluster (v, k)
    is replaced by its children at level k - 1 (the self-child (v, k - 1) and the children c with level k - 1); a
    child F with ||q - t_F|| > b^k + b^m is final (goes to the output), the others form F_{k-1}. Returns output
    U F_m as arrays (nodes, levels, distances ||q - p_v|| of their representatives) and the number of distance
    evaluations. Remark 2: with max_clusters > 0 the
    frontier keeps only its max_clusters closest members; the others are finalised at their current level, so
    the result is always a partition of the targets.
    """
    points = T.points
    base = T.base
    nf = start_nodes.shape[0]
    fr = start_nodes.copy()
    frd = np.empty(nf, np.float64)
    nd = 0
    for j in range(nf):
        frd[j] = _dist_q(points, T.node_point[fr[j]], q)
        nd += 1
    cap = 64 + 2 * nf
    out_nodes = np.empty(cap, np.int64)
    out_levels = np.empty(cap, np.int64)
    out_d = np.empty(cap, np.float64)
    nout = 0
    k = start_level
    root = T.state[ROOT]
    if root >= 0 and k > T.node_level[root] + 1 and T.node_level[root] + 1 > m:
        k = T.node_level[root] + 1  # every level above the root's holds the single cluster {root}
    bm = base ** m
    while k > m and nf > 0:
        thr = base ** k + bm
        nn = 0
        new = np.empty(16 + 2 * nf, np.int64)
        newd = np.empty(16 + 2 * nf, np.float64)
        for j in range(nf):  # the rows of every child at k - 1 requested before the first distance
            c = _first_below(T, fr[j], k)
            while c != -1 and T.node_level[c] == k - 1:
                prefetch_row(points, T.node_point[c])
                c = T.node_next_sibling[c]
        for j in range(nf):
            v = fr[j]
            cand = v
            cd = frd[j]
            c = _first_below(T, v, k)
            # self child first, then the children with level k - 1
            while True:
                if cd > thr:
                    if nout == cap:
                        cap *= 2
                        out_nodes, out_levels = _grow(out_nodes, nout, cap), _grow(out_levels, nout, cap)
                        out_d = _grow(out_d, nout, cap)
                    out_nodes[nout] = cand
                    out_levels[nout] = k - 1
                    out_d[nout] = cd
                    nout += 1
                else:
                    if nn == new.shape[0]:
                        new, newd = _grow(new, nn, 2 * nn), _grow(newd, nn, 2 * nn)
                    new[nn] = cand
                    newd[nn] = cd
                    nn += 1
                if c == -1 or T.node_level[c] != k - 1:
                    break
                cand = c
                cd = _dist_q(points, T.node_point[c], q)
                nd += 1
                c = T.node_next_sibling[c]
        if max_clusters > 0 and nn > max_clusters:
            order = np.argsort(newd[:nn], kind="mergesort")
            keep = np.empty(max_clusters, np.int64)
            keepd = np.empty(max_clusters, np.float64)
            for j in range(nn):
                o = order[j]
                if j < max_clusters:
                    keep[j] = new[o]
                    keepd[j] = newd[o]
                else:
                    if nout == cap:
                        cap *= 2
                        out_nodes, out_levels = _grow(out_nodes, nout, cap), _grow(out_levels, nout, cap)
                        out_d = _grow(out_d, nout, cap)
                    out_nodes[nout] = new[o]
                    out_levels[nout] = k - 1
                    out_d[nout] = newd[o]
                    nout += 1
            new = keep
            newd = keepd
            nn = max_clusters
        fr = new[:nn].copy()
        frd = newd[:nn].copy()
        nf = nn
        k -= 1
    res_n = np.empty(nout + nf, np.int64)
    res_l = np.empty(nout + nf, np.int64)
    res_n[:nout] = out_nodes[:nout]
    res_l[:nout] = out_levels[:nout]
    res_n[nout:] = fr[:nf]
    res_l[nout:] = k
    res_d = np.empty(nout + nf, np.float64)
    res_d[:nout] = out_d[:nout]
    res_d[nout:] = frd[:nf]
    return res_n, res_l, res_d, nd


@njit(cache=True)
def _refine_sums(fs, fn, fe, alive, nf, ref, out):
    """out = [Z_hat, Z_lo, Z_hi] / e^ref over the alive clusters (sum_j n_j e^{s_j (-/+ eps_j)})."""
    out[:] = 0.0
    for j in range(nf):
        if alive[j]:
            out[0] += fn[j] * np.exp(fs[j] - ref)
            out[1] += fn[j] * np.exp(fs[j] - fe[j] - ref)
            out[2] += fn[j] * np.exp(fs[j] + fe[j] - ref)


@njit(cache=True)
def refine_kernel(T, suf, q, beta, nodes, levels, sr, sizes, radii, log_gamma, upper, max_clusters):
    """Certified refinement of the clustering (nodes, levels) (rep logits ``sr``, ``sizes``, ``radii``) for q: see
    :func:`refimpl.sampling.clustering.refine_clustering` (best first by eps_C for Eq. 7, by
    |C| e^{s_r} (e^{eps_C} - e^{-eps_C}) for the upper proposal, until the certified log max P/Q <= ``log_gamma``
    or ``max_clusters`` clusters). Returns (nodes, levels, rep logits, sizes, radii, inner products computed
    including the start's, splits)."""
    bq = beta * np.sqrt(np.sum(q * q))
    n0 = nodes.shape[0]
    cap = max(64, 2 * n0)
    fv = np.empty(cap, np.int64)
    fl = np.empty(cap, np.int64)
    fs = np.empty(cap, np.float64)
    fn = np.empty(cap, np.int64)
    fr = np.empty(cap, np.float64)
    fe = np.empty(cap, np.float64)
    alive = np.ones(cap, np.bool_)
    hk = np.empty(cap, np.float64)
    hi = np.empty(cap, np.int64)
    ref = -np.inf
    for j in range(n0):
        fv[j] = nodes[j]
        fl[j] = levels[j]
        fs[j] = sr[j]
        fn[j] = sizes[j]
        fr[j] = radii[j]
        fe[j] = bq * radii[j]
        ref = max(ref, fs[j] + fe[j])
    nf = n0
    sums = np.empty(3, np.float64)
    _refine_sums(fs, fn, fe, alive, nf, ref, sums)
    hsize = 0
    for j in range(n0):
        if fe[j] > 0:
            key = fe[j] if not upper else fn[j] * np.exp(fs[j] - ref) * (np.exp(fe[j]) - np.exp(-fe[j]))
            hsize = _heap_push(hk, hi, hsize, key, j)
    n_alive = n0
    ip = n0
    splits = 0
    while hsize > 0 and n_alive < max_clusters:
        if upper:
            bound = np.log(max(sums[2], 1e-300)) - np.log(max(sums[1], 1e-300))
        else:
            bound = fe[hi[0]] + np.log(max(sums[0], 1e-300)) - np.log(max(sums[1], 1e-300))
        if bound <= log_gamma:
            break
        j = _heap_pop(hk, hi, hsize)
        hsize -= 1
        v = fv[j]
        c = _first_below(T, v, fl[j])
        if c == -1:
            continue
        Lc = T.node_level[c]
        m = 1
        x = c
        while x != -1 and T.node_level[x] == Lc:
            m += 1
            x = T.node_next_sibling[x]
        if nf + m > fv.shape[0]:
            cap = 2 * (nf + m)
            fv, fl, fs, fn = _grow(fv, nf, cap), _grow(fl, nf, cap), _grow(fs, nf, cap), _grow(fn, nf, cap)
            fr, fe, alive = _grow(fr, nf, cap), _grow(fe, nf, cap), _grow(alive, nf, cap)
            hk, hi = _grow(hk, hsize, cap), _grow(hi, hsize, cap)
        alive[j] = False
        sums[0] -= fn[j] * np.exp(fs[j] - ref)
        sums[1] -= fn[j] * np.exp(fs[j] - fe[j] - ref)
        sums[2] -= fn[j] * np.exp(fs[j] + fe[j] - ref)
        x = v
        for t in range(m):  # the nested self-child (v, Lc), then the children at level Lc
            if t == 0:
                sx = fs[j]
            else:
                x = c if t == 1 else T.node_next_sibling[x]
                sx = beta * _dot(T.points, T.node_point[x], q)
                ip += 1
            size, _, r, _ = _cluster_geometry(T, suf, x, Lc)
            fv[nf] = x
            fl[nf] = Lc
            fs[nf] = sx
            fn[nf] = size
            fr[nf] = r
            fe[nf] = bq * r
            alive[nf] = True
            sums[0] += size * np.exp(sx - ref)
            sums[1] += size * np.exp(sx - fe[nf] - ref)
            sums[2] += size * np.exp(sx + fe[nf] - ref)
            if fe[nf] > 0:
                key = fe[nf] if not upper else size * np.exp(sx - ref) * (np.exp(fe[nf]) - np.exp(-fe[nf]))
                hsize = _heap_push(hk, hi, hsize, key, nf)
            nf += 1
        n_alive += m - 1
        splits += 1
        if splits % 64 == 0:  # the running sums recomputed exactly (cancellation)
            _refine_sums(fs, fn, fe, alive, nf, ref, sums)
    na = 0
    for j in range(nf):
        na += alive[j]
    on = np.empty(na, np.int64)
    ol = np.empty(na, np.int64)
    osr = np.empty(na, np.float64)
    osz = np.empty(na, np.int64)
    orad = np.empty(na, np.float64)
    t = 0
    for j in range(nf):
        if alive[j]:
            on[t] = fv[j]
            ol[t] = fl[j]
            osr[t] = fs[j]
            osz[t] = fn[j]
            orad[t] = fr[j]
            t += 1
    return on, ol, osr, osz, orad, ip, splits


# ----------------------------------------------------------------------------------------------------------------
# start-level choice (the U-shaped cost of Prop. 3)


@njit(cache=True)
def _bucket_add(head, bnext, pending, x, idx):
    """Prepend node slot x to the list head[idx] (head grown as needed); returns (head, pending + 1)."""
    if idx >= head.shape[0]:
        h2 = np.full(max(2 * head.shape[0], idx + 1), -1, np.int64)
        h2[:head.shape[0]] = head
        head = h2
    bnext[x] = head[idx]
    head[idx] = x
    return head, pending + 1


@njit(cache=True)
def level_profile(T, suf, q, beta, bq, k, attempt_cost, log_z_excl):
    """Walk the level clusterings C_(L) from the root's level down and pick the start level of least estimated cost.

    S_L (nodes with level >= L) grows by the children of level L - 1 of nodes already in S, so the nodes are kept
    in one array in order of entry and S_L is a prefix of it. Per node, ``ptr`` is its first child not yet entered
    (children are in descending level order): size(v, L) = count(v) - counts of the entered children and
    rho(v, L) = min(MAXD(v), suf[ptr]). Cost of level L in inner products: |S_L| + k * attempt_cost *
    Z_hi(L) / (Z_hat(L) - Z_excl) (estimated attempts per draw, Z_hat = sum |C| e^{s_r} standing in for Z; a draw
    of an excluded target is a rejection, so the excluded mass Z_excl = e^{log_z_excl} (-inf: none) does not
    count; a level whose estimate leaves no mass, Z_hat - Z_excl <= 1e-9 Z_hat, is skipped). The walk stops
    before computing the logits of a level whose cluster count alone exceeds the best cost so far; if no level had
    a finite cost, the deepest level walked is returned. Returns (best level, number of clusters at it, nodes (the
    prefix holds the clusters), logits of those nodes, inner products).
    """
    points = T.points
    node_point = T.node_point
    node_level = T.node_level
    first_child = T.node_first_child
    next_sibling = T.node_next_sibling
    node_count = T.node_count
    node_maxd = T.node_maxd
    root = T.state[ROOT]
    cap = 256
    nodes = np.empty(cap, np.int64)
    logit = np.empty(cap, np.float64)
    ptr = np.empty(cap, np.int64)
    used = np.empty(cap, np.int64)
    plev = np.empty(cap, np.int64)    # level of ptr (cached locally: avoids a cache miss per node and level)
    lhi = np.empty(cap, np.float64)   # log of the node's current Z_hi term: log size + s + beta ||q|| rho
    lh = np.empty(cap, np.float64)    # log of its current Z_hat term: log size + s
    # nodes waiting for a child level, in one linked list per level (head[top - level], bnext): a level's pass
    # touches only the nodes that gain children there, never all n nodes
    top = node_level[root]
    head = np.full(64, -1, np.int64)
    bnext = np.empty(cap, np.int64)
    pending = 0
    L = node_level[root] + 1
    nodes[0] = root
    logit[0] = beta * _dot(points, node_point[root], q)
    ip = 1
    ptr[0] = first_child[root]
    plev[0] = node_level[ptr[0]] if ptr[0] != -1 else -(1 << 60)
    used[0] = 0
    n = 1
    if ptr[0] != -1:
        head, pending = _bucket_add(head, bnext, pending, 0, top - plev[0])
    # per-level sums of the Z_hi and Z_hat terms, relative to their largest term ref (recomputed at every level,
    # which costs no more than the level's own pass over the n nodes)
    r = suf[ptr[0]] if ptr[0] != -1 else 0.0
    if r > node_maxd[root]:
        r = node_maxd[root]
    lhi[0] = np.log(node_count[root]) + logit[0] + bq * r
    lh[0] = np.log(node_count[root]) + logit[0]
    ref = lhi[0]
    zhi = 1.0
    zh = np.exp(lh[0] - ref)
    err = 0.0  # bound on the accumulated rounding error of zhi and zh (units of e^ref)
    best_cost = np.inf
    best_L = L
    best_n = 1
    while True:
        den = zh - np.exp(log_z_excl - ref)
        cost = n + k * attempt_cost * zhi / den if den > 1e-9 * zh else np.inf
        if cost < best_cost or (best_cost == np.inf and cost == np.inf):
            best_cost = cost
            best_L = L
            best_n = n
        new = 0
        too_many = False
        bi = top - (L - 1)
        first = head[bi] if bi < head.shape[0] else -1
        x = first
        while x != -1:
            c = ptr[x]
            while c != -1 and node_level[c] == L - 1:
                new += 1
                c = next_sibling[c]
            if n + new > best_cost:  # stop counting early: this level is not worth its logits
                too_many = True
                break
            x = bnext[x]
        if too_many or pending == 0:
            break
        if first != -1:
            head[bi] = -1
        x = first
        while x != -1:
            xnext = bnext[x]
            pending -= 1
            c = ptr[x]
            moved = False
            while c != -1 and node_level[c] == L - 1:
                if n == cap:
                    cap *= 2
                    nodes, ptr, used, plev = _grow(nodes, n, cap), _grow(ptr, n, cap), _grow(used, n, cap), \
                        _grow(plev, n, cap)
                    logit, lhi, lh = _grow(logit, n, cap), _grow(lhi, n, cap), _grow(lh, n, cap)
                    bnext = _grow(bnext, n, cap)
                nodes[n] = c
                logit[n] = beta * _dot(points, node_point[c], q)
                ip += 1
                ptr[n] = first_child[c]
                plev[n] = node_level[ptr[n]] if ptr[n] != -1 else -(1 << 60)
                used[n] = 0
                rc = suf[ptr[n]] if ptr[n] != -1 else 0.0
                if rc > node_maxd[c]:
                    rc = node_maxd[c]
                lhi[n] = np.log(node_count[c]) + logit[n] + bq * rc
                lh[n] = np.log(node_count[c]) + logit[n]
                if ptr[n] != -1:
                    head, pending = _bucket_add(head, bnext, pending, n, top - plev[n])
                if lhi[n] > ref:  # a new largest term: rescale the running sums
                    f = np.exp(ref - lhi[n])
                    zhi *= f
                    zh *= f
                    err *= f
                    ref = lhi[n]
                zhi += np.exp(lhi[n] - ref)
                zh += np.exp(lh[n] - ref)
                err += EPS * (zhi + zh)
                n += 1
                used[x] += node_count[c]
                moved = True
                c = next_sibling[c]
            ptr[x] = c
            plev[x] = node_level[c] if c != -1 else -(1 << 60)
            if c != -1:
                head, pending = _bucket_add(head, bnext, pending, x, top - plev[x])
            # the parent's radius shrinks only when its next child moves; its size when a child entered
            if moved:
                rx = suf[c] if c != -1 else 0.0
                v = nodes[x]
                if rx > node_maxd[v]:
                    rx = node_maxd[v]
                size = node_count[v] - used[x]
                err += EPS * (zhi + zh)
                zhi -= np.exp(lhi[x] - ref)
                zh -= np.exp(lh[x] - ref)
                lhi[x] = np.log(size) + logit[x] + bq * rx  # smaller: size and radius only shrink
                lh[x] = np.log(size) + logit[x]
                zhi += np.exp(lhi[x] - ref)
                zh += np.exp(lh[x] - ref)
                err += EPS * (zhi + zh)
            x = xnext
        # running sums updated by subtraction cancel catastrophically when one term dominates (seen: Z_hi / Z_hat
        # estimated ~1 where the truth was e^36): their accumulated rounding is bounded by ``err``, and they are
        # summed afresh whenever that bound exceeds 1e-8 of the smaller sum
        if err > 1e-8 * min(zhi, zh):
            ref = lhi[0]
            for x in range(1, n):
                if lhi[x] > ref:
                    ref = lhi[x]
            zhi = 0.0
            zh = 0.0
            for x in range(n):
                zhi += np.exp(lhi[x] - ref)
                zh += np.exp(lh[x] - ref)
            err = EPS * n * (zhi + zh)
        L -= 1
    return best_L, best_n, nodes[:best_n].copy(), logit[:best_n].copy(), ip

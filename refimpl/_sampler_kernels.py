"""Numba kernels behind :mod:`refimpl.samplers` and :mod:`refimpl.clustering` (PAPER.md §3).

All kernels read the SG tree's struct-of-arrays directly (COMMON.md "SGTree data model"): ``node_point``,
``node_level``, ``node_first_child``, ``node_next_sibling`` (children in descending level order), ``node_maxd``,
``node_count``. A cluster is a pair ``(v, L)``: ``{p_v}`` plus the subtrees of the children ``c`` of ``v`` with
``node_level[c] < L`` (a suffix of the child list). Only float64 and int64 cross the kernel boundary.

Randomness: each sampling kernel receives an int64 ``seed`` drawn from the caller's ``numpy.random.Generator`` and
seeds Numba's own generator with it, so the same ``rng`` gives the same draws on any machine.

Logit cache: the hierarchical sampler keeps the logits it has computed in a small open-addressing hash table
(keys = target ids) so that the k draws of one query share their inner products. When the table is half full,
further logits are recomputed instead of cached (counted each time): correctness never depends on the cache.
"""
from __future__ import annotations

import numpy as np
from numba import njit

# ----------------------------------------------------------------------------------------------------------------
# small helpers


@njit(cache=True)
def _dot(points, i, q):
    s = 0.0
    for d in range(q.shape[0]):
        s += points[i, d] * q[d]
    return s


@njit(cache=True)
def _dist(points, i, j):
    s = 0.0
    for d in range(points.shape[1]):
        t = points[i, d] - points[j, d]
        s += t * t
    return np.sqrt(s)


@njit(cache=True)
def _dist_q(points, i, q):
    s = 0.0
    for d in range(q.shape[0]):
        t = points[i, d] - q[d]
        s += t * t
    return np.sqrt(s)


@njit(cache=True)
def _in(buf, n, x):
    for j in range(n):
        if buf[j] == x:
            return True
    return False


@njit(cache=True)
def _pick(cum, u):
    """Index j with cum[j-1] <= u < cum[j] (cum increasing, u in [0, cum[-1]))."""
    j = np.searchsorted(cum, u, side="right")
    if j >= cum.shape[0]:
        j = cum.shape[0] - 1
    return j


@njit(cache=True)
def _first_below(first_child, next_sibling, node_level, v, L):
    """First child of v with level < L (children are in descending level order), -1 if none."""
    c = first_child[v]
    while c != -1 and node_level[c] >= L:
        c = next_sibling[c]
    return c


@njit(cache=True)
def _member(node_point, node_level, first_child, next_sibling, node_count, v, L, u):
    """The u-th member (0 <= u < size) of cluster (v, L) in a fixed pre-order; u uniform -> uniform member."""
    if u == 0:
        return node_point[v]
    u -= 1
    c = _first_below(first_child, next_sibling, node_level, v, L)
    while c != -1:
        if u < node_count[c]:
            if u == 0:
                return node_point[c]
            u -= 1
            c = first_child[c]
        else:
            u -= node_count[c]
            c = next_sibling[c]
    return -1  # counts inconsistent with the child lists (never for a valid tree)


@njit(cache=True)
def _logit(points, q, beta, pid, keys, vals, counters):
    """beta * <q, t_pid>, through the hash cache; counters[2] counts inner products actually computed."""
    mask = keys.shape[0] - 1
    h = (pid * 0x9E3779B1) & mask
    while True:
        kk = keys[h]
        if kk == pid:
            return vals[h]
        if kk == -1:
            break
        h = (h + 1) & mask
    s = beta * _dot(points, pid, q)
    counters[2] += 1
    if counters[7] * 2 < keys.shape[0]:
        keys[h] = pid
        vals[h] = s
        counters[7] += 1
    return s


@njit(cache=True)
def _hfind(keys, key):
    """Slot of ``key`` in an open-addressing table (keys -1 = empty): its slot, or the empty slot to insert it."""
    mask = keys.shape[0] - 1
    h = (key * 0x9E3779B1) & mask
    while keys[h] != key and keys[h] != -1:
        h = (h + 1) & mask
    return h


@njit(cache=True)
def _cap(sc, bq, maxd, count, E):
    """Bound exponent of a child subtree: s_c + beta ||q|| MAXD(c) (s_c for a singleton), capped by its parent's E."""
    Ec = sc if count == 1 else sc + bq * maxd
    return E if Ec > E else Ec


# ----------------------------------------------------------------------------------------------------------------
# clusterings


@njit(cache=True)
def level_cluster_nodes(root, level, node_level, first_child, next_sibling, node_count):
    """Nodes of the clustering C_(level) (one cluster (v, level) per node with node_level[v] >= level) and sizes."""
    if root < 0:
        return np.zeros(0, np.int64), np.zeros(0, np.int64)
    if node_level[root] < level:
        out = np.array([root], np.int64)
        return out, np.array([node_count[root]], np.int64)
    cap = 64
    out = np.empty(cap, np.int64)
    n = 0
    stack = np.empty(64, np.int64)
    sp = 0
    stack[0] = root
    sp = 1
    while sp > 0:
        sp -= 1
        v = stack[sp]
        if n == cap:
            cap *= 2
            tmp = np.empty(cap, np.int64)
            tmp[:n] = out[:n]
            out = tmp
        out[n] = v
        n += 1
        c = first_child[v]
        while c != -1 and node_level[c] >= level:
            if sp == stack.shape[0]:
                tmp = np.empty(2 * sp, np.int64)
                tmp[:sp] = stack[:sp]
                stack = tmp
            stack[sp] = c
            sp += 1
            c = next_sibling[c]
    nodes = out[:n].copy()
    sizes = np.empty(n, np.int64)
    for j in range(n):
        v = nodes[j]
        s = node_count[v]
        c = first_child[v]
        while c != -1 and node_level[c] >= level:
            s -= node_count[c]
            c = next_sibling[c]
        sizes[j] = s
    return nodes, sizes


@njit(cache=True)
def suffix_radii(n_nodes, first_child, next_sibling, node_pdist, node_maxd):
    """suf[c] = max over c and the siblings after it of PDIST + MAXD (query-independent, O(N) once per tree state).

    For a cluster (v, L) whose first child below level L is c, rho(v, L) = min(MAXD(v), suf[c]) (0 without such
    a child): a valid bound on the distance from p_v to any member, never b^L (PAPER.md §2 erratum)."""
    suf = np.zeros(n_nodes, np.float64)
    stack = np.empty(64, np.int64)
    for v in range(n_nodes):
        m = 0
        c = first_child[v]
        while c != -1:
            if m == stack.shape[0]:
                t = np.empty(2 * m, np.int64)
                t[:m] = stack[:m]
                stack = t
            stack[m] = c
            m += 1
            c = next_sibling[c]
        run = 0.0
        for j in range(m - 1, -1, -1):
            c = stack[j]
            d = node_pdist[c] + node_maxd[c]
            if d > run:
                run = d
            suf[c] = run
    return suf


@njit(cache=True)
def cluster_info(suf, nodes, levels, node_point, node_level, first_child, next_sibling, node_count, node_maxd):
    """Sizes and certified radii of clusters (nodes[j], levels[j]).

    size(v, L) = count(v) - counts of the children with level >= L; rho(v, L) = min(MAXD(v), suf[first child
    below L]) (see :func:`suffix_radii`), 0 for a singleton. Returns (sizes, radii, children scanned).
    """
    n = nodes.shape[0]
    sizes = np.empty(n, np.int64)
    radii = np.empty(n, np.float64)
    nd = 0
    for j in range(n):
        v = nodes[j]
        L = levels[j]
        s = node_count[v]
        c = first_child[v]
        while c != -1 and node_level[c] >= L:
            s -= node_count[c]
            nd += 1
            c = next_sibling[c]
        r = 0.0
        if c != -1:
            r = suf[c]
            if r > node_maxd[v]:
                r = node_maxd[v]
        sizes[j] = s
        radii[j] = r
    return sizes, radii, nd


@njit(cache=True)
def find_clustering_kernel(points, q, root, start_level, m, base, max_clusters, node_point, node_level,
                           first_child, next_sibling, node_count):
    """Alg. 2 (FindClustering) with the union fix of line 13 (PAPER.md §3).

    Frontier F_l = C_(start_level). For k = start_level, ..., m + 1 every frontier cluster (v, k) is replaced by
    its children at level k - 1 (the self-child (v, k - 1) and the children c with level k - 1); a child F with
    ||q - t_F|| > b^k + b^m is final (goes to the output), the others form F_{k-1}. Returns output U F_m as
    arrays (nodes, levels) and the number of distance evaluations. Remark 2: with max_clusters > 0 the frontier
    keeps only its max_clusters closest members; the others are finalised at their current level, so the result
    is always a partition of the targets.
    """
    nodes0, _ = level_cluster_nodes(root, start_level, node_level, first_child, next_sibling, node_count)
    nf = nodes0.shape[0]
    fr = nodes0.copy()
    frd = np.empty(nf, np.float64)
    nd = 0
    for j in range(nf):
        frd[j] = _dist_q(points, node_point[fr[j]], q)
        nd += 1
    cap = 64 + 2 * nf
    out_nodes = np.empty(cap, np.int64)
    out_levels = np.empty(cap, np.int64)
    nout = 0
    k = start_level
    if root >= 0 and k > node_level[root] + 1 and node_level[root] + 1 > m:
        k = node_level[root] + 1  # every level above the root's holds the single cluster {root}
    bm = base ** m
    while k > m and nf > 0:
        thr = base ** k + bm
        # children of the frontier at level k - 1
        nn = 0
        new = np.empty(16 + 2 * nf, np.int64)
        newd = np.empty(16 + 2 * nf, np.float64)
        for j in range(nf):
            v = fr[j]
            cand = v
            cd = frd[j]
            c = first_child[v]
            while c != -1 and node_level[c] >= k:
                c = next_sibling[c]
            # self child first, then the children with level k - 1
            while True:
                if cd > thr:
                    if nout == cap:
                        cap *= 2
                        t1 = np.empty(cap, np.int64)
                        t1[:nout] = out_nodes[:nout]
                        out_nodes = t1
                        t2 = np.empty(cap, np.int64)
                        t2[:nout] = out_levels[:nout]
                        out_levels = t2
                    out_nodes[nout] = cand
                    out_levels[nout] = k - 1
                    nout += 1
                else:
                    if nn == new.shape[0]:
                        t1 = np.empty(2 * nn, np.int64)
                        t1[:nn] = new[:nn]
                        new = t1
                        t3 = np.empty(2 * nn, np.float64)
                        t3[:nn] = newd[:nn]
                        newd = t3
                    new[nn] = cand
                    newd[nn] = cd
                    nn += 1
                if c == -1 or node_level[c] != k - 1:
                    break
                cand = c
                cd = _dist_q(points, node_point[c], q)
                nd += 1
                c = next_sibling[c]
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
                        t1 = np.empty(cap, np.int64)
                        t1[:nout] = out_nodes[:nout]
                        out_nodes = t1
                        t2 = np.empty(cap, np.int64)
                        t2[:nout] = out_levels[:nout]
                        out_levels = t2
                    out_nodes[nout] = new[o]
                    out_levels[nout] = k - 1
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
    return res_n, res_l, nd


# ----------------------------------------------------------------------------------------------------------------
# flat proposals: rejection (Eq. 3-5) and independent Metropolis-Hastings (Eq. 14)


@njit(cache=True)
def _propose(cum, cnodes, clevels, csizes, mptr, members, node_point, node_level, first_child, next_sibling,
             node_count):
    """Draw (cluster j, member id): cluster by the cumulative weights, member uniformly."""
    j = _pick(cum, np.random.random() * cum[-1])
    u = np.random.randint(0, csizes[j])
    if mptr.shape[0] > 0:
        return j, members[mptr[j] + u]
    return j, _member(node_point, node_level, first_child, next_sibling, node_count, cnodes[j], clevels[j], u)


@njit(cache=True)
def flat_kernel(points, q, beta, k, algo, cum, lw, cnodes, clevels, csizes, mptr, members, node_point,
                node_level, first_child, next_sibling, node_count, excl, replace, chain_length, max_steps, seed):
    """Flat rejection (algo 0) or independent MH (algo 1) over a clustering.

    Cluster j has log-weight lw[j] (per member) and cumulative weights ``cum`` of |C_j| exp(lw[j] - max lw).
    algo 0, Eq. 3-5 with per-cluster eps: propose (j, i), accept with exp(s_i - lw[j]) (lw = s_r + eps_C, so the
    probability is <= 1 and the accepted draws are exact). algo 1, Eq. 14: k independent chains of
    ``chain_length`` states, the first drawn from Q, each next proposal accepted with
    min(1, exp((s_y' - lw_y') - (s_y - lw_y))); the final state of each chain is returned. Excluded ids have
    P = 0 (rejected / never accepted). Without replacement, drawn ids join the excluded set.
    Returns ids, logits of ids, counters [proposals, accepted, inner products, excluded hits, status, 0, 0, 0]
    and the importance-sampling sum of exp(s_i - lw_j) over proposals (for the Z estimate).
    """
    np.random.seed(seed)
    counters = np.zeros(8, np.int64)
    ids = np.full(k, -1, np.int64)
    sids = np.zeros(k, np.float64)
    buf = np.empty(excl.shape[0] + k, np.int64)
    nb = excl.shape[0]
    buf[:nb] = excl
    isum = 0.0
    for t in range(k):
        steps = 0
        if algo == 0:
            while True:
                steps += 1
                if steps > max_steps:
                    counters[4] = 1
                    return ids, sids, counters, isum
                j, i = _propose(cum, cnodes, clevels, csizes, mptr, members, node_point, node_level, first_child,
                                next_sibling, node_count)
                counters[0] += 1
                s = beta * _dot(points, i, q)
                counters[2] += 1
                a = np.exp(s - lw[j])
                isum += a
                if np.random.random() < a:
                    if nb > 0 and _in(buf, nb, i):
                        counters[3] += 1
                        continue
                    counters[1] += 1
                    ids[t] = i
                    sids[t] = s
                    break
        else:
            y = -1
            wy = -np.inf
            sy = 0.0
            step = 0
            while True:
                step += 1
                if step > max_steps:
                    counters[4] = 1
                    return ids, sids, counters, isum
                j, i = _propose(cum, cnodes, clevels, csizes, mptr, members, node_point, node_level, first_child,
                                next_sibling, node_count)
                counters[0] += 1
                s = beta * _dot(points, i, q)
                counters[2] += 1
                isum += np.exp(s - lw[j])
                w = s - lw[j]
                if nb > 0 and _in(buf, nb, i):
                    w = -np.inf
                    counters[3] += 1
                if y == -1 or (w > -np.inf and (w >= wy or np.random.random() < np.exp(w - wy))):
                    if y != -1:
                        counters[1] += 1
                    y = i
                    wy = w
                    sy = s
                if step >= chain_length and wy > -np.inf:
                    break
            ids[t] = y
            sids[t] = sy
        if replace == 0:
            buf[nb] = ids[t]
            nb += 1
    return ids, sids, counters, isum


# ----------------------------------------------------------------------------------------------------------------
# Alg. 1: hierarchical rejection sampling


@njit(cache=True)
def alg1_kernel(points, q, beta, bq, base, k, cnodes, clevel, csizes, cE, cs, node_point, node_level,
                first_child, next_sibling, node_count, node_maxd, excl, replace, max_attempts, mode,
                fallback_after, cache_size, seed):
    """Alg. 1 (hierarchical rejection with running normalisers, restart option, nested self-child rule).

    Masses are absolute (relative to exp(Eref), Eref = max cE): a visited node X owns mass B(X) equal to the
    probability (times the start normaliser Z_hat_hi = sum_C |C| exp(E_C)) that an attempt reaches it. A node
    entered through a new representative p (a start cluster, or a child that is not the nested self-child) has
    B = n exp(E): it accepts p with mass exp(s_p) (probability pi = exp(s_p) / B); the rest, and the whole mass
    (n - 1) exp(E) of a nested self-child node, is split between its children at the next occupied level: the
    self-child gets (n_self - 1) exp(E) (p already handled above, the paper's nested self-child rule), a child
    c gets |c| exp(E_c) with E_c = min(E, s_c + beta ||q|| MAXD(c)), and the remainder, >= 0 by construction,
    is the restart option (back to the start level). Every target i is reached through its first node with
    probability B/Z_hat_hi and accepted with exp(s_i)/B, so each attempt returns i with probability
    exp(s_i)/Z_hat_hi: accepted draws are exact softmax samples (PAPER.md §3 errata: beta in the exponent, the
    true descendant radius MAXD, the cap E_c <= E that keeps the restart weight non-negative).

    mode 1 is the deliberately broken variant kept as a negative control: radius b^l at level l (as printed,
    with beta), no cap, negative restart weights clipped to 0. fallback_after > 0 reproduces the authors'
    fallback (return the unaccepted proposal after that many restarts); both are for tests only.

    counters: [attempts, accepted, inner products, excluded hits, status (1 = max_attempts hit), restarts,
    fallbacks used, cache entries].
    """
    np.random.seed(seed)
    counters = np.zeros(8, np.int64)
    ids = np.full(k, -1, np.int64)
    sids = np.zeros(k, np.float64)
    keys = np.full(cache_size, -1, np.int64)
    vals = np.empty(cache_size, np.float64)
    gkeys = np.full(cache_size, -1, np.int64)
    gmass = np.empty(cache_size, np.float64)
    gnself = np.empty(cache_size, np.int64)
    gafter = np.empty(cache_size, np.int64)
    gcount = np.zeros(1, np.int64)
    buf = np.empty(excl.shape[0] + k, np.int64)
    nb = excl.shape[0]
    buf[:nb] = excl
    nc = cnodes.shape[0]
    Eref = -np.inf
    for j in range(nc):
        if cE[j] > Eref:
            Eref = cE[j]
    cum = np.empty(nc, np.float64)
    acc = 0.0
    cfirst = np.empty(nc, np.int64)
    for j in range(nc):
        acc += csizes[j] * np.exp(cE[j] - Eref)
        cum[j] = acc
        cfirst[j] = _first_below(first_child, next_sibling, node_level, cnodes[j], clevel)
    gbuf_c = np.empty(16, np.int64)
    gbuf_m = np.empty(16, np.float64)
    gbuf_e = np.empty(16, np.float64)
    gbuf_s = np.empty(16, np.float64)
    for t in range(k):
        attempts = 0
        restarts = 0
        done = False
        while not done:
            attempts += 1
            counters[0] += 1
            if attempts > max_attempts:
                counters[4] = 1
                return ids, sids, counters
            j = _pick(cum, np.random.random() * cum[-1])
            v = cnodes[j]
            n = csizes[j]
            E = cE[j]
            sv = cs[j]
            L = clevel
            new = True
            ch = cfirst[j]
            while True:
                ev = np.exp(E - Eref)
                if new:
                    budget = n * ev
                    a = np.exp(sv - Eref)
                else:
                    budget = (n - 1) * ev
                    a = 0.0
                if ch == -1:
                    # no children left: only the representative (new node) or nothing
                    if new and np.random.random() * budget < a:
                        i = node_point[v]
                        if nb > 0 and _in(buf, nb, i):
                            counters[3] += 1
                            break
                        ids[t] = i
                        sids[t] = sv
                        counters[1] += 1
                        done = True
                    break
                Lc = node_level[ch]
                if mode == 0:
                    # group (v, Lc): its total child mass, n_self and the next group are fixed for this query
                    # (E at a node depends only on its unique path), so they are cached: a restart then costs O(1)
                    gkey = v * 8192 + (Lc + 4096)
                    h = _hfind(gkeys, gkey)
                    if gkeys[h] == gkey:
                        gsum = gmass[h]
                        nself = gnself[h]
                        after = gafter[h]
                    else:
                        gsum = 0.0
                        nself = n
                        c = ch
                        while c != -1 and node_level[c] == Lc:
                            sc = _logit(points, q, beta, node_point[c], keys, vals, counters)
                            gsum += node_count[c] * np.exp(_cap(sc, bq, node_maxd[c], node_count[c], E) - Eref)
                            nself -= node_count[c]
                            c = next_sibling[c]
                        after = c
                        if gcount[0] * 2 < gkeys.shape[0]:
                            gkeys[h] = gkey
                            gmass[h] = gsum
                            gnself[h] = nself
                            gafter[h] = after
                            gcount[0] += 1
                    mself = (nself - 1) * np.exp(E - Eref)
                    u = np.random.random() * budget
                    if u < a:
                        i = node_point[v]
                        if nb > 0 and _in(buf, nb, i):
                            counters[3] += 1
                            break
                        ids[t] = i
                        sids[t] = sv
                        counters[1] += 1
                        done = True
                        break
                    u -= a
                    if u < mself:
                        n = nself
                        L = Lc
                        new = False
                        ch = after
                        continue
                    u -= mself
                    if u >= gsum:
                        break  # restart
                    chosen = -1
                    c = ch
                    while c != -1 and node_level[c] == Lc:
                        sc = _logit(points, q, beta, node_point[c], keys, vals, counters)
                        Ec = _cap(sc, bq, node_maxd[c], node_count[c], E)
                        chosen = c
                        m_ = node_count[c] * np.exp(Ec - Eref)
                        if u < m_:
                            break
                        u -= m_
                        c = next_sibling[c]
                    # (rounding: u < gsum guarantees a child; the last one absorbs the round-off)
                    v = chosen
                    n = node_count[chosen]
                    E = Ec
                    sv = sc
                    L = Lc
                    new = True
                    ch = first_child[chosen]
                    continue
                # mode 1: the broken variant (printed radius b^l, no cap), all masses first, clipped restart
                ng = 0
                c = ch
                nself = n
                while c != -1 and node_level[c] == Lc:
                    if ng == gbuf_c.shape[0]:
                        t1 = np.empty(2 * ng, np.int64)
                        t1[:ng] = gbuf_c[:ng]
                        gbuf_c = t1
                        t2 = np.empty(2 * ng, np.float64)
                        t2[:ng] = gbuf_m[:ng]
                        gbuf_m = t2
                        t3 = np.empty(2 * ng, np.float64)
                        t3[:ng] = gbuf_e[:ng]
                        gbuf_e = t3
                        t4 = np.empty(2 * ng, np.float64)
                        t4[:ng] = gbuf_s[:ng]
                        gbuf_s = t4
                    gbuf_c[ng] = c
                    nself -= node_count[c]
                    ng += 1
                    c = next_sibling[c]
                after = c
                Eself = sv + bq * base ** Lc
                mself = (nself - 1) * np.exp(Eself - Eref)
                gsum = mself
                for g in range(ng):
                    cc = gbuf_c[g]
                    sc = _logit(points, q, beta, node_point[cc], keys, vals, counters)
                    Ec = sc + bq * base ** Lc
                    gbuf_s[g] = sc
                    gbuf_e[g] = Ec
                    gbuf_m[g] = node_count[cc] * np.exp(Ec - Eref)
                    gsum += gbuf_m[g]
                rest = budget - a
                if rest < gsum:
                    rest = gsum
                u = np.random.random() * (a + rest)
                if u < a:
                    i = node_point[v]
                    if nb > 0 and _in(buf, nb, i):
                        counters[3] += 1
                        break
                    ids[t] = i
                    sids[t] = sv
                    counters[1] += 1
                    done = True
                    break
                u -= a
                if u < mself:
                    n = nself
                    L = Lc
                    new = False
                    E = Eself
                    ch = after
                    continue
                u -= mself
                chosen = -1
                for g in range(ng):
                    m_ = gbuf_m[g]
                    if u < m_:
                        chosen = gbuf_c[g]
                        sc = gbuf_s[g]
                        Ec = gbuf_e[g]
                        break
                    u -= m_
                if chosen == -1:
                    break  # restart
                v = chosen
                n = node_count[chosen]
                E = Ec
                sv = sc
                L = Lc
                new = True
                ch = first_child[chosen]
            if not done:
                restarts += 1
                counters[5] += 1
                if fallback_after > 0 and restarts >= fallback_after:
                    ids[t] = node_point[v]
                    sids[t] = _logit(points, q, beta, node_point[v], keys, vals, counters)
                    counters[6] += 1
                    done = True
        if replace == 0:
            buf[nb] = ids[t]
            nb += 1
    return ids, sids, counters


# ----------------------------------------------------------------------------------------------------------------
# start-level choice (the U-shaped cost of Prop. 3)


@njit(cache=True)
def level_profile(points, q, beta, bq, root, k, attempt_cost, node_point, node_level, first_child, next_sibling,
                  node_count, node_maxd, suf):
    """Walk the level clusterings C_(L) from the root's level down and pick the start level of least estimated cost.

    S_L (nodes with level >= L) grows by the children of level L - 1 of nodes already in S, so the nodes are kept
    in one array in order of entry and S_L is a prefix of it. Per node, ``ptr`` is its first child not yet entered
    (children are in descending level order): size(v, L) = count(v) - counts of the entered children and
    rho(v, L) = min(MAXD(v), suf[ptr]). Cost of level L in inner products: |S_L| + k * attempt_cost *
    Z_hi(L) / Z_hat(L) (estimated attempts per draw, Z_hat = sum |C| e^{s_r} standing in for Z). The walk stops
    before computing the logits of a level whose cluster count alone exceeds the best cost so far. Returns (best
    level, number of clusters at it, nodes (the prefix holds the clusters), logits of those nodes, inner products).
    """
    cap = 256
    nodes = np.empty(cap, np.int64)
    logit = np.empty(cap, np.float64)
    ptr = np.empty(cap, np.int64)
    used = np.empty(cap, np.int64)
    L = node_level[root] + 1
    nodes[0] = root
    logit[0] = beta * _dot(points, node_point[root], q)
    ip = 1
    ptr[0] = first_child[root]
    used[0] = 0
    n = 1
    best_cost = np.inf
    best_L = L
    best_n = 1
    while True:
        ref = -np.inf
        for x in range(n):
            r = suf[ptr[x]] if ptr[x] != -1 else 0.0
            if r > node_maxd[nodes[x]]:
                r = node_maxd[nodes[x]]
            e = logit[x] + bq * r
            if e > ref:
                ref = e
        zhi = 0.0
        zh = 0.0
        for x in range(n):
            v = nodes[x]
            r = suf[ptr[x]] if ptr[x] != -1 else 0.0
            if r > node_maxd[v]:
                r = node_maxd[v]
            size = node_count[v] - used[x]
            zhi += size * np.exp(logit[x] + bq * r - ref)
            zh += size * np.exp(logit[x] - ref)
        cost = n + k * attempt_cost * zhi / zh
        if cost < best_cost:
            best_cost = cost
            best_L = L
            best_n = n
        new = 0
        any_left = False
        for x in range(n):
            c = ptr[x]
            while c != -1 and node_level[c] == L - 1:
                new += 1
                c = next_sibling[c]
            if ptr[x] != -1:
                any_left = True
        if not any_left:
            break
        if n + new > best_cost:
            break
        n0 = n
        for x in range(n0):
            c = ptr[x]
            while c != -1 and node_level[c] == L - 1:
                if n == cap:
                    cap *= 2
                    t1 = np.empty(cap, np.int64)
                    t1[:n] = nodes[:n]
                    nodes = t1
                    t2 = np.empty(cap, np.float64)
                    t2[:n] = logit[:n]
                    logit = t2
                    t3 = np.empty(cap, np.int64)
                    t3[:n] = ptr[:n]
                    ptr = t3
                    t4 = np.empty(cap, np.int64)
                    t4[:n] = used[:n]
                    used = t4
                nodes[n] = c
                logit[n] = beta * _dot(points, node_point[c], q)
                ip += 1
                ptr[n] = first_child[c]
                used[n] = 0
                n += 1
                used[x] += node_count[c]
                c = next_sibling[c]
            ptr[x] = c
        L -= 1
    return best_L, best_n, nodes[:best_n].copy(), logit[:best_n].copy(), ip

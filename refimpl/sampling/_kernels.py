"""Numba sampling kernels behind :mod:`refimpl.sampling.samplers` (PAPER.md §3): flat rejection, MH, Alg. 1.

All kernels read the SG tree's struct-of-arrays directly (COMMON.md "SGTree data model"): ``node_point``,
``node_level``, ``node_first_child``, ``node_next_sibling`` (children in descending level order), ``node_maxd``,
``node_count``. A cluster is a pair ``(v, L)``: ``{p_v}`` plus the subtrees of the children ``c`` of ``v`` with
``node_level[c] < L`` (a suffix of the child list). Only float64 and int64 cross the kernel boundary.

Cluster and start-level kernels live in :mod:`refimpl.sampling._cluster_kernels`.

Randomness: each sampling kernel receives an int64 ``seed`` drawn from the caller's ``numpy.random.Generator`` and
seeds Numba's own generator with it, so the same ``rng`` gives the same draws on any machine.

Logit cache: the hierarchical sampler keeps the logits it has computed in a small open-addressing hash table
(keys = target ids) so that the k draws of one query share their inner products. When the table is half full,
further logits are recomputed instead of cached (counted each time): correctness never depends on the cache.
"""
from __future__ import annotations

import numpy as np
from numba import njit

from refimpl.sampling._cluster_kernels import _dot, _first_below, _member  # noqa: F401 (shared helpers)

# ----------------------------------------------------------------------------------------------------------------
# small helpers


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
def alg1_kernel(points, q, beta, bq, base, k, cnodes, clevels, csizes, cE, cs, node_point, node_level,
                first_child, next_sibling, node_count, node_maxd, excl, replace, max_attempts, mode,
                fallback_after, cache_size, seed):
    """Alg. 1 (hierarchical rejection with running normalisers, restart option, nested self-child rule).

    The start clusters are (cnodes[j], clevels[j]): any partition of the targets into clusters of the tree (a
    level clustering C_(l), or the output of Alg. 2), with sizes ``csizes`` and bounds cE >= every member's logit.

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

    Cost: the logits of the children of a visited group are computed once per query (hash cache); the group's
    total child mass, n_self and next group are cached per (node, level), so a restart costs O(1) and only a
    descent into a child scans the group.

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
        cfirst[j] = _first_below(first_child, next_sibling, node_level, cnodes[j], clevels[j])
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
            L = clevels[j]
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



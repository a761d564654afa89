"""Numba kernel of A* sampling over the SG tree's Gumbel process (ours; Maddison, Tarlow, Minka 2014), behind
:func:`refimpl.sampling.samplers.sample_astar`: one compiled call answers a batch of queries, with the outputs,
logit cache and counters of :mod:`refimpl.sampling._kernels`.
"""
from __future__ import annotations

import numpy as np
from numba import njit

from refimpl.index import ROOT
from refimpl.sampling._cluster_kernels import _first_below, _heap_pop, _heap_push
from refimpl.sampling._kernels import (ACCEPTED, ATTEMPTS, LZ_EST, LZ_EXCL, LZ_HI, LZ_LO, STATUS, _excluded, _logit,
                                       _lse_add, _marked, _outputs)


@njit(cache=True)
def _trunc_gumbel(loc, bound):
    """A Gumbel(loc) variable conditioned to be < bound: -log(e^-bound + e^-g), g ~ Gumbel(loc)."""
    g = loc - np.log(-np.log(np.random.random()))
    return -np.logaddexp(-bound, -g)


@njit(cache=True)
def _push_region(hk, hi, hs, rdat, rf, nreg, u, v, L, new, n, G, E, s, eps):
    """Store region (v, L, new, n) with Gumbel max G, bound E, representative logit s and radius term eps (members'
    logits lie in [s - eps, E]) as region ``nreg``, and push it with key u onto the max-heap of region indices
    (:func:`refimpl.sampling._cluster_kernels._heap_push`); the arrays double when full. Returns them and the new
    sizes."""
    if nreg == rdat.shape[0]:
        cap = 2 * nreg
        t2 = np.empty((cap, 4), np.int64)
        t2[:nreg] = rdat[:nreg]
        rdat = t2
        t3 = np.empty((cap, 4), np.float64)
        t3[:nreg] = rf[:nreg]
        rf = t3
    if hs + 1 >= hk.shape[0]:
        cap = 2 * hk.shape[0]
        t = np.empty(cap, np.float64)
        t[:hs] = hk[:hs]
        hk = t
        t4 = np.empty(cap, np.int64)
        t4[:hs] = hi[:hs]
        hi = t4
    rdat[nreg, 0] = v
    rdat[nreg, 1] = L
    rdat[nreg, 2] = new
    rdat[nreg, 3] = n
    rf[nreg, 0] = G
    rf[nreg, 1] = E
    rf[nreg, 2] = s
    rf[nreg, 3] = eps
    hs = _heap_push(hk, hi, hs, u, nreg)
    return hk, hi, hs, rdat, rf, nreg + 1


@njit(cache=True)
def astar_batch(T, suf, Q, beta, k, eptr, eids, replace, max_pops, broken, seed):
    """Exact softmax draws by A* sampling over the tree's Gumbel process (per query, k independent searches).

    Give every live target i an independent Gumbel G_i; argmax_i (G_i + s_i) is then an exact draw from
    P(i) ∝ e^{s_i} (Gumbel-max), and it is found without computing every s_i. A region is a cluster (v, L)
    (p_v counted or not: the nested self-child of Alg. 1) with n members; its Gumbel maximum G_R ~ Gumbel(log n) is
    split top-down (the Gumbel process): the part holding the maximum is chosen with probability size / n and keeps
    G_R, every other part gets a Gumbel(log size) conditioned below G_R. The parts are the singleton {p_v}, the
    nested self-child (v, Lc) and the children c at the next occupied level Lc, i.e. Alg. 1's descent. The key of a
    region is G_R + E_R with the certified bound E_R >= max_{i in R} s_i (E = min(E_parent, s_r + beta ||q|| rho),
    rho = MAXD or rho(v, Lc)); a singleton's key is its exact value G + s_i. Best-first search pops the largest
    key; when a singleton is on top, its value is >= every other region's bound, hence >= every G_j + s_j: it is
    the Gumbel argmax, an exact draw (A* sampling). Excluded ids (and, without replacement, earlier draws) have
    s = -inf: they are dropped, which conditions the draw exactly on the others. Logits are cached per query and
    shared by its k searches. counters: ATTEMPTS = regions popped, INNER = inner products. ``broken``: bounds
    without the radius (E = s_r), a negative control for the tests (the search may stop before the argmax).
    """
    np.random.seed(seed)
    B = Q.shape[0]
    ids, sids, cnt, lz = _outputs(B, k)
    points = T.points
    root = T.state[ROOT]
    n_all = T.node_count[root]
    size = 1024
    while size < 256 * k and size < (1 << 20):
        size *= 2
    keys = np.full(size, -1, np.int64)
    vals = np.empty(size, np.float64)
    fill = np.zeros(1, np.int64)
    # the mask of excluded and drawn ids: no O(N) work unless some id can be marked (exclusions, no replacement)
    mask = np.zeros(points.shape[0] if eids.shape[0] > 0 or replace == 0 else 0, np.bool_)
    hk = np.empty(256, np.float64)
    hi = np.empty(256, np.int64)
    rdat = np.empty((256, 4), np.int64)
    rf = np.empty((256, 4), np.float64)
    for b in range(B):
        q = Q[b]
        c = cnt[b]
        keys[:] = -1
        fill[0] = 0
        bq = 0.0 if broken else beta * np.sqrt(np.sum(q * q))
        lz[b, LZ_EXCL] = _excluded(T, q, beta, eids, eptr[b], eptr[b + 1], c)
        nb = eptr[b + 1] - eptr[b]
        buf = np.empty(nb + k, np.int64)
        buf[:nb] = eids[eptr[b]:eptr[b + 1]]
        mask[buf[:nb]] = True
        s_root = _logit(points, q, beta, T.node_point[root], keys, vals, fill, c)
        e_root = bq * T.node_maxd[root] if n_all > 1 else 0.0
        E_root = s_root + e_root
        for t in range(k):
            G = np.log(n_all) - np.log(-np.log(np.random.random()))
            hs = 0
            nreg = 0
            ldrop = -np.inf  # log mass of the singletons dropped (excluded or drawn): exact logits
            hk, hi, hs, rdat, rf, nreg = _push_region(hk, hi, hs, rdat, rf, nreg, G + E_root, root,
                                                      T.node_level[root] + 1, 1, n_all, G, E_root, s_root, e_root)
            pops = 0
            while True:
                if hs == 0 or pops >= max_pops:
                    c[STATUS] = 1
                    return ids, sids, cnt, lz
                x = _heap_pop(hk, hi, hs)
                hs -= 1
                pops += 1
                c[ATTEMPTS] += 1
                v, L, new, n = rdat[x, 0], rdat[x, 1], rdat[x, 2], rdat[x, 3]
                G, E, sv = rf[x, 0], rf[x, 1], rf[x, 2]
                if n == 1 and new == 1:
                    # singletons are pushed with their exact value G + s: on top, it is the Gumbel argmax
                    ids[b, t] = T.node_point[v]
                    sids[b, t] = sv
                    c[ACCEPTED] += 1
                    if t == k - 1:  # the final frontier partitions the targets: log Z bounds and estimate
                        lo = _lse_add(ldrop, sv)
                        est = lo
                        up = lo
                        for y in range(hs):
                            ry = hi[y]
                            ln = np.log(rdat[ry, 3])
                            lo = _lse_add(lo, ln + rf[ry, 2] - rf[ry, 3])
                            up = _lse_add(up, ln + rf[ry, 1])
                            est = _lse_add(est, ln + rf[ry, 2])
                        lz[b, LZ_LO] = lo
                        lz[b, LZ_HI] = up
                        lz[b, LZ_EST] = min(max(est, lo), up)
                    break
                # split (v, L) into {p_v} (if counted), the nested self part (v, Lc) and the children at level Lc
                ch = _first_below(T, v, L)
                Lc = T.node_level[ch] if ch != -1 else L
                nself = n - new
                x2 = ch
                while x2 != -1 and T.node_level[x2] == Lc:
                    nself -= T.node_count[x2]
                    x2 = T.node_next_sibling[x2]
                after = x2
                # which part holds the maximum: u uniform over the n members
                u = np.random.randint(0, n)
                # part 0: {p_v}
                if new == 1:
                    Gp = G if u == 0 else _trunc_gumbel(0.0, G)
                    u -= 1
                    if not _marked(mask, T.node_point[v]):
                        hk, hi, hs, rdat, rf, nreg = _push_region(hk, hi, hs, rdat, rf, nreg, Gp + sv, v, L, 1, 1,
                                                                  Gp, sv, sv, 0.0)
                    else:
                        ldrop = _lse_add(ldrop, sv)
                # part 1: the nested self part (members of the children below Lc)
                if nself > 0:
                    Gp = G if 0 <= u < nself else _trunc_gumbel(np.log(nself), G)
                    r = suf[after] if after != -1 else 0.0
                    if r > T.node_maxd[v]:
                        r = T.node_maxd[v]
                    Ep = min(E, sv + bq * r)
                    hk, hi, hs, rdat, rf, nreg = _push_region(hk, hi, hs, rdat, rf, nreg, Gp + Ep, v, Lc, 0, nself,
                                                              Gp, Ep, sv, bq * r)
                u -= nself
                # the children at level Lc
                x2 = ch
                while x2 != -1 and T.node_level[x2] == Lc:
                    m = T.node_count[x2]
                    Gp = G if 0 <= u < m else _trunc_gumbel(np.log(m), G)
                    u -= m
                    sc = _logit(points, q, beta, T.node_point[x2], keys, vals, fill, c)
                    Ep = sc if m == 1 else min(E, sc + bq * T.node_maxd[x2])
                    if m == 1:
                        if not _marked(mask, T.node_point[x2]):
                            hk, hi, hs, rdat, rf, nreg = _push_region(hk, hi, hs, rdat, rf, nreg, Gp + sc, x2,
                                                                      T.node_level[x2], 1, 1, Gp, sc, sc, 0.0)
                        else:
                            ldrop = _lse_add(ldrop, sc)
                    else:
                        hk, hi, hs, rdat, rf, nreg = _push_region(hk, hi, hs, rdat, rf, nreg, Gp + Ep, x2,
                                                                  T.node_level[x2], 1, m, Gp, Ep, sc,
                                                                  bq * T.node_maxd[x2])
                    x2 = T.node_next_sibling[x2]
            if replace == 0:
                buf[nb] = ids[b, t]
                mask[ids[b, t]] = True
                nb += 1
        mask[buf[:nb]] = False
    return ids, sids, cnt, lz

"""Numba kernels of adaptive rejection sampling over the SG tree (ours; Eq. 3-5 with a per-query envelope refined
best first, in the manner of Gilks and Wild's adaptive rejection sampling), behind
:func:`refimpl.sampling.samplers.sample_adaptive`; one compiled call answers a batch of queries, with the outputs
and counters of :mod:`refimpl.sampling._kernels`.

A frontier is a partition of the live targets into clusters (v, L) = {p_v} + the subtrees of the children of v
with level < L. In the tree's pre-order (:func:`refimpl.index.search.preorder`, once per tree version) those
subtrees are one contiguous range, so the u-th member of a cluster is one array read. Each cluster carries the
certified bound E = min(E_parent, s_v + beta ||q|| rho(v, L)) >= every member's logit (Cauchy-Schwarz with the
certified radius rho of :func:`refimpl.sampling._cluster_kernels.cluster_info`; a singleton has E = s exactly).

Contents: :func:`adaptive_batch`.
"""
from __future__ import annotations

import numpy as np
from numba import njit

from refimpl.index import ROOT, prefetch_row
from refimpl.sampling._cluster_kernels import _dot, _grow
from refimpl.sampling._kernels import (ACCEPTED, ATTEMPTS, EXCL_HITS, INNER, LEVEL, LZ_EST, LZ_EXCL, LZ_HI,
                                       LZ_LO, N_CLUSTERS, SELECT, STATUS, _exact_draw, _excluded, _lse_add, _outputs,
                                       _scratch)

RING = 16  # proposals in flight
AHEAD = 8  # attempts between a proposal's resolution to a target (row prefetched) and its evaluation


@njit(cache=True)
def _radius(maxd, suf, v, c):
    """Certified radius of cluster (v, L) whose first child below L is c: min(MAXD(v), suf[c]); 0 if c = -1."""
    if c == -1:
        return 0.0
    r = suf[c]
    return maxd[v] if r > maxd[v] else r


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


@njit(cache=True)
def _alias(w, n):
    """Vose's alias table of the weights w[:n] (>= 0, positive sum): (prob, alias). A uniform slot j, kept if a
    uniform is < prob[j] and replaced by alias[j] otherwise, is j' with probability w[j'] / sum(w[:n])."""
    prob = np.ones(n, np.float64)
    alias = np.arange(n)
    tot = 0.0
    for j in range(n):
        tot += w[j]
    sc = np.empty(n, np.float64)
    small = np.empty(n, np.int64)
    large = np.empty(n, np.int64)
    ns = 0
    nl = 0
    for j in range(n):
        sc[j] = w[j] * n / tot
        if sc[j] < 1.0:
            small[ns] = j
            ns += 1
        else:
            large[nl] = j
            nl += 1
    while ns > 0 and nl > 0:
        a = small[ns - 1]
        ns -= 1
        g = large[nl - 1]
        prob[a] = sc[a]
        alias[a] = g
        sc[g] = (sc[g] + sc[a]) - 1.0
        if sc[g] < 1.0:
            nl -= 1
            small[ns] = g
            ns += 1
    return prob, alias  # the slots left (rounding) keep prob 1


@njit(cache=True)
def adaptive_batch(T, suf, order, pos, Q, beta, k, eptr, eids, replace, max_attempts, attempt_cost, seed,
                   broken=False):
    """Adaptive rejection sampling for every query of ``Q``: refine an envelope best first, then Eq. 3-5.

    Refinement (per query, shared by its k draws): start from the root cluster; repeatedly take the cluster j of
    largest envelope mass U_j = n_j e^{E_j} and split it into the children of v at the next occupied level Lc
    (each a whole subtree, bound min(E_j, s_c + beta ||q|| rho)) and the rest (v, Lc) (bound min(E_j, s_v + beta
    ||q|| rho(v, Lc))); stop when the attempts a split could save, k x attempt_cost x (U_j - n_j e^{s_v}) / Z_hat
    (Z_hat = sum_j n_j e^{s_v(j)}, Eq. 7), no longer exceed its m inner products, or after N inner products.
    If the refinement's inner products plus the k Z_hi / Z_hat expected attempts reach N (no useful structure
    around this query), every draw of the query is made by brute force instead (``_exact_draw``: N inner
    products once, then an inverse CDF per draw). The rule and this switch, decided before any attempt from the
    envelope alone, only set the cost.

    Sampling (Eq. 3-5): propose cluster j with probability U_j / sum U, a member i uniformly (pre-order range),
    accept with e^{s_i - E_j} <= 1; a singleton is accepted without an inner product (E = s). Every attempt
    returns i with probability e^{s_i} / sum U, whatever the envelope, so accepted draws are exact; excluded ids
    (and, without replacement, earlier draws) are rejected, which conditions the draw exactly on the others.
    Proposals (cluster by an alias table, then member) are generated RING attempts in advance, their pre-order
    entries and rows prefetched: they are iid and independent of the acceptance decisions, so using them later
    changes nothing in law. A draw whose attempts reach the number
    N of live targets is made by brute force (``_exact_draw``, exact). LZ_LO / LZ_HI are certified by the final
    frontier; LZ_EST = log sum U + log(successes / attempts) clipped to them (Eq. 7's Z_hat when k = 0; the exact
    log Z when the brute-force path ran).
    ``broken`` (a negative control of the tests): bounds without the radius term, E = s_v (not certified).
    """
    sl = 0.0 if broken else 1.0  # the radius term's weight in the bounds
    np.random.seed(seed)
    B = Q.shape[0]
    ids, sids, cnt, lz = _outputs(B, k)
    # the node arrays as locals: a NamedTuple passed to a helper or read in a hot loop costs reference counting
    points = T.points
    npt = T.node_point
    nlev = T.node_level
    nfirst = T.node_first_child
    nnext = T.node_next_sibling
    ncount = T.node_count
    nmaxd = T.node_maxd
    root = T.state[ROOT]
    mask, n_live, live, ls = _scratch(T)
    cap = 1024
    fv = np.empty(cap, np.int64)  # node
    fa = np.empty(cap, np.int64)  # pre-order start of the members after p_v
    fc = np.empty(cap, np.int64)  # first child below L (-1: none)
    fn = np.empty(cap, np.int64)  # size
    fE = np.empty(cap, np.float64)  # bound exponent
    fs = np.empty(cap, np.float64)  # representative logit
    fr = np.empty(cap, np.float64)  # certified radius
    hk = np.empty(cap, np.float64)
    hi = np.empty(cap, np.int64)
    wgt = np.empty(cap, np.float64)
    rj = np.empty(RING, np.int64)  # the ring of proposals: cluster, pre-order position (or -1 - id), target
    rp = np.empty(RING, np.int64)
    ri = np.empty(RING, np.int64)
    order2 = order.reshape(order.shape[0], 1)  # a 2-D view, for prefetch_row
    for b in range(B):
        q = Q[b]
        c = cnt[b]
        live[0] = -2
        lze = _excluded(T, q, beta, eids, eptr[b], eptr[b + 1], c)
        lz[b, LZ_EXCL] = lze
        bq = beta * np.sqrt(np.sum(q * q))
        # ---- the envelope: best-first refinement from the root
        s0 = beta * _dot(points, npt[root], q)
        c[INNER] += 1
        ch0 = nfirst[root]
        fv[0] = root
        fc[0] = ch0
        fa[0] = pos[ch0] if ch0 != -1 else pos[root] + 1
        fn[0] = n_live
        fs[0] = s0
        fr[0] = _radius(nmaxd, suf, root, ch0)
        fE[0] = s0 + sl * bq * fr[0]
        nf = 1
        Eref = fE[0]
        zhat = n_live * np.exp(s0 - Eref)
        hsize = 0
        if n_live > 1 and k > 0:
            hsize = _heap_push(hk, hi, hsize, np.log(n_live) + fE[0], 0)
        spent = 0
        while hsize > 0:
            j = hi[0]
            uj = fn[j] * np.exp(fE[j] - Eref)
            gain = k * attempt_cost * (uj - fn[j] * np.exp(fs[j] - Eref)) / max(zhat, 1e-300)
            x = fc[j]
            Lc = nlev[x]
            m = 0
            while x != -1 and nlev[x] == Lc:  # count the children at Lc, prefetching their rows
                prefetch_row(points, npt[x])
                m += 1
                x = nnext[x]
            if gain <= m or spent + m > n_live:
                break
            _heap_pop(hk, hi, hsize)
            hsize -= 1
            spent += m
            v = fv[j]
            E = fE[j]
            zhat -= fn[j] * np.exp(fs[j] - Eref)
            x = fc[j]
            while x != -1 and nlev[x] == Lc:
                if nf == fv.shape[0]:
                    cap = 2 * nf
                    fv = _grow(fv, nf, cap)
                    fa = _grow(fa, nf, cap)
                    fc = _grow(fc, nf, cap)
                    fn = _grow(fn, nf, cap)
                    fE = _grow(fE, nf, cap)
                    fs = _grow(fs, nf, cap)
                    fr = _grow(fr, nf, cap)
                    wgt = np.empty(cap, np.float64)
                    hk = _grow(hk, hsize, cap)  # the heap holds at most one entry per frontier cluster
                    hi = _grow(hi, hsize, cap)
                sx = beta * _dot(points, npt[x], q)
                cx = nfirst[x]
                fv[nf] = x
                fc[nf] = cx
                fa[nf] = pos[cx] if cx != -1 else pos[x] + 1
                fn[nf] = ncount[x]
                fs[nf] = sx
                fr[nf] = _radius(nmaxd, suf, x, cx)
                fE[nf] = min(E, sx + sl * bq * fr[nf])
                zhat += fn[nf] * np.exp(sx - Eref)
                if fn[nf] > 1:
                    hsize = _heap_push(hk, hi, hsize, np.log(fn[nf]) + fE[nf], nf)
                nf += 1
                x = nnext[x]
            # the rest (v, Lc): p_v and the children below Lc
            fc[j] = x
            fn[j] = 1 + pos[v] + ncount[v] - pos[x] if x != -1 else 1
            fa[j] = pos[x] if x != -1 else pos[v] + 1
            fr[j] = _radius(nmaxd, suf, v, x)
            fE[j] = min(E, fs[j] + sl * bq * fr[j])
            zhat += fn[j] * np.exp(fs[j] - Eref)
            if fn[j] > 1:
                hsize = _heap_push(hk, hi, hsize, np.log(fn[j]) + fE[j], j)
        c[INNER] += spent
        c[SELECT] += spent
        c[N_CLUSTERS] = nf
        c[LEVEL] = nlev[root]
        # ---- certified interval and the proposal (an alias table over the frontier)
        lo = -np.inf
        hi_ = -np.inf
        for j in range(nf):
            ln = np.log(fn[j])
            lo = _lse_add(lo, ln + fs[j] - bq * fr[j])
            hi_ = _lse_add(hi_, ln + fE[j])
            wgt[j] = fn[j] * np.exp(fE[j] - Eref)
        prob, alias = _alias(wgt, nf)
        # the expected cost of the draws, k Z_hi / Z_hat attempts, against brute force (N inner products, once)
        sum_u = 0.0
        for j in range(nf):
            sum_u += wgt[j]
        brute = spent + k * attempt_cost * sum_u / max(zhat, 1e-300) >= n_live
        lz[b, LZ_LO] = lo
        lz[b, LZ_HI] = hi_
        nb = eptr[b + 1] - eptr[b]
        buf = np.empty(nb + k, np.int64)
        buf[:nb] = eids[eptr[b]:eptr[b + 1]]
        mask[buf[:nb]] = True
        # ---- the draws. RING proposals in flight: at step t the proposal in slot t % RING (generated at step
        # t - RING, resolved to a target at step t - AHEAD, its row prefetched) is evaluated, slot (t + AHEAD) % RING
        # is resolved and slot t % RING refilled (its pre-order entry prefetched). One loop, no helper calls.
        step = 0
        head = 0
        t = 0
        attempts = 0
        while t < k:
            if step >= RING:
                if attempts >= max_attempts:
                    c[STATUS] = 1
                    return ids, sids, cnt, lz
                done = False
                if brute or attempts >= n_live:
                    ids[b, t], sids[b, t] = _exact_draw(T, q, beta, mask, live, ls, c)
                    done = True
                else:
                    attempts += 1
                    c[ATTEMPTS] += 1
                    j = rj[head]
                    i = ri[head]
                    if fn[j] == 1:
                        s = fs[j]
                        ok = True
                    else:
                        s = beta * _dot(points, i, q)
                        c[INNER] += 1
                        ok = np.random.random() < np.exp(s - fE[j])
                    if ok:
                        if mask[i]:
                            c[EXCL_HITS] += 1
                        else:
                            ids[b, t] = i
                            sids[b, t] = s
                            c[ACCEPTED] += 1
                            done = True
                if done:
                    if replace == 0:
                        buf[nb] = ids[b, t]
                        mask[ids[b, t]] = True
                        nb += 1
                    t += 1
                    attempts = 0
                    if t == k:
                        break
            if step >= RING - AHEAD:  # resolve
                r = head + AHEAD if head + AHEAD < RING else head + AHEAD - RING
                p = rp[r]
                i = -1 - p if p < 0 else order[p]
                ri[r] = i
                if fn[rj[r]] > 1:
                    prefetch_row(points, i)
            j = np.random.randint(0, nf)  # generate
            if np.random.random() >= prob[j]:
                j = alias[j]
            u = np.random.randint(0, fn[j])
            rj[head] = j
            if u == 0:
                rp[head] = -1 - npt[fv[j]]
            else:
                rp[head] = fa[j] + u - 1
                prefetch_row(order2, rp[head])
            head = head + 1 if head + 1 < RING else 0
            step += 1
        mask[buf[:nb]] = False
        if live[0] != -2:  # the brute-force path computed every logit: the exact log Z
            m = -np.inf
            for x in range(n_live):
                m = max(m, ls[x])
            tot = 0.0
            for x in range(n_live):
                tot += np.exp(ls[x] - m)
            est = m + np.log(tot)
        elif c[ATTEMPTS] > 0:
            est = hi_ + np.log(max(c[ACCEPTED] + c[EXCL_HITS], 1) / c[ATTEMPTS])
        else:
            est = Eref + np.log(max(zhat, 1e-300))
        lz[b, LZ_EST] = min(max(est, lo), hi_)
    return ids, sids, cnt, lz

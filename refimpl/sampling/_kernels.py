"""Batched Numba sampling kernels behind :mod:`refimpl.sampling.samplers` (paper §3): flat rejection (Eq. 3-5),
independent MH (Eq. 14), the batch of :func:`refimpl.sampling.samplers.sample_mh` (``mh_batch``: each query's Alg. 2
clustering, certified refinement and certificate, then the chains) and Alg. 1; one compiled call answers a batch of
queries (A* sampling: :mod:`refimpl.sampling._astar`).

Every kernel takes the tree as one :class:`refimpl.index.TreeArrays` ``T`` and a (B, D) float64 query batch ``Q``.
Per query it picks the start clustering itself (``level_profile`` of Prop. 3 when ``auto``; otherwise the
clusters given in CSR form ``cptr``/``cnodes``/...), excluded ids in CSR form ``eptr``/``eids``. Points may be
float32 or float64 (float64 accumulation). Outputs: ids and logits (B, k), per-query counters (B, NC) and
per-query log-normaliser estimates (B, 4) = [estimate, certified lower, certified upper, log mass excluded].

Randomness: one int64 ``seed`` from the caller's ``numpy.random.Generator`` seeds Numba's generator; queries
are processed in order, so the same ``rng`` gives the same draws on any machine.

Logit cache: the k draws of one query share the inner products they compute (an open-addressing table keyed by
target id); when half full, further logits are recomputed instead of cached (correctness never depends on it).
"""
from __future__ import annotations

import numpy as np
from numba import njit

from refimpl.index import N_NODES, ROOT, prefetch_row
from refimpl.sampling._cluster_kernels import (_dot, _first_below, _grow, cluster_info, find_clustering_kernel,
                                               level_profile, refine_kernel)

# per-query counters
ATTEMPTS, ACCEPTED, INNER, EXCL_HITS, STATUS, RESTARTS, FALLBACKS, LEVEL, N_CLUSTERS, SELECT, EXACT, LUMPED = range(12)
NC = 12
# columns of the per-query log-normaliser output
LZ_EST, LZ_LO, LZ_HI, LZ_EXCL = range(4)
RING = 16  # proposals in flight (their pre-order entries, then their rows, prefetched)
AHEAD = 8  # proposals between one's resolution to a target (row prefetched) and its evaluation

# ----------------------------------------------------------------------------------------------------------------
# small helpers


@njit(cache=True)
def _exact_draw(T, q, beta, mask, live, ls, cnt):
    """One exact draw from the softmax over the live targets not marked in ``mask`` (brute force, inverse CDF).

    ``live`` holds the live ids, ``ls[0]`` their logits (N inner products, once per query: filled on first use,
    marked unfilled by live[0] = -2), ``ls[1]`` the cumulative softmax masses of the unmarked ones (built once and
    kept while ``ls[1, -1]`` is not NaN; a caller that marks an id in ``mask`` sets it to NaN), so that each further
    draw is a binary search (an empty ``mask`` marks nothing). The fallback of a rejection sampler whose attempts reach the number of live targets:
    accepted rejection draws and these draws both follow P exactly, so the mixture does too."""
    n = live.shape[0] - 1
    lg = ls[0]
    cum = ls[1]
    if live[0] == -2:
        k = 0
        tree = T.state[ROOT] >= 0  # else an array partition: every row is live
        for v in range(T.state[N_NODES] if tree else T.points.shape[0]):
            i = T.node_point[v] if tree else v
            if i >= 0:
                live[k] = i
                lg[k] = beta * _dot(T.points, i, q)
                k += 1
        cnt[INNER] += k
        live[k:] = -1
        cum[n] = np.nan
    if np.isnan(cum[n]):
        m = -np.inf
        for j in range(n):
            if not _marked(mask, live[j]) and lg[j] > m:
                m = lg[j]
        tot = 0.0
        for j in range(n):
            if not _marked(mask, live[j]):
                tot += np.exp(lg[j] - m)
            cum[j] = tot
        cum[n] = tot
    j = np.searchsorted(cum[:n], np.random.random() * cum[n], side="right")
    if j >= n:  # rounding: the last unmarked target
        j = n - 1
        while _marked(mask, live[j]):
            j -= 1
    cnt[EXACT] += 1
    return live[j], lg[j]


@njit(cache=True)
def _scratch(T, eids, replace):
    """Per-call scratch of a rejection kernel: (mask of excluded / drawn ids, number N of live targets, live ids
    (N + 1,) and logits / cumulative masses (2, N + 1) for ``_exact_draw``). The mask (capacity,) exists only when
    some id can be marked (exclusions, or draws without replacement), else it is empty (nothing is marked): no
    O(N) work per call otherwise (the other two are allocated, not written)."""
    n_live = T.node_count[T.state[ROOT]] if T.state[ROOT] >= 0 else T.points.shape[0]
    marked = eids.shape[0] > 0 or replace == 0
    return (np.zeros(T.points.shape[0] if marked else 0, np.bool_), n_live, np.empty(n_live + 1, np.int64),
            np.empty((2, n_live + 1), np.float64))


@njit(cache=True, inline="always")
def _marked(mask, i):
    """Whether id i is marked (excluded or drawn); an empty mask marks nothing."""
    return mask.shape[0] > 0 and mask[i]


@njit(cache=True)
def _pick(cum, u):
    """Index j with cum[j-1] <= u < cum[j] (cum increasing, u in [0, cum[-1]))."""
    j = np.searchsorted(cum, u, side="right")
    if j >= cum.shape[0]:
        j = cum.shape[0] - 1
    return j


@njit(cache=True)
def _outputs(B, k):
    """ids (B, k) (-1 = not drawn), their logits (B, k), counters (B, NC), log-normalisers (B, 4)."""
    return (np.full((B, k), -1, np.int64), np.zeros((B, k), np.float64), np.zeros((B, NC), np.int64),
            np.zeros((B, 4), np.float64))


@njit(cache=True)
def _hslot(keys, key):
    """Slot of ``key`` in an open-addressing table (keys -1 = empty): its slot, or the empty slot to insert it."""
    mask = keys.shape[0] - 1
    h = (key * 0x9E3779B1) & mask
    while keys[h] != key and keys[h] != -1:
        h = (h + 1) & mask
    return h


@njit(cache=True)
def _logit(points, q, beta, pid, keys, vals, fill, cnt):
    """beta <q, t_pid> through the cache; cnt[INNER] counts inner products actually computed."""
    h = _hslot(keys, pid)
    if keys[h] == pid:
        return vals[h]
    s = beta * _dot(points, pid, q)
    cnt[INNER] += 1
    if fill[0] * 2 < keys.shape[0]:
        keys[h] = pid
        vals[h] = s
        fill[0] += 1
    return s


@njit(cache=True)
def _lse_add(a, b):
    """log(e^a + e^b)."""
    if a == -np.inf:
        return b
    if b == -np.inf:
        return a
    if a > b:
        return a + np.log1p(np.exp(b - a))
    return b + np.log1p(np.exp(a - b))


@njit(cache=True)
def _excluded(T, q, beta, eids, e0, e1, cnt):
    """log of the softmax mass of the live excluded ids e0..e1 (-inf for none), their inner products counted."""
    lz = -np.inf
    for x in range(e0, e1):
        i = eids[x]
        if T.point_node[i] >= 0:
            lz = _lse_add(lz, beta * _dot(T.points, i, q))
            cnt[INNER] += 1
    return lz


@njit(cache=True)
def _start(T, suf, q, beta, k, auto, attempt_cost, b, cptr, cnodes, clevels, creps, csizes, cradii, lze, cnt):
    """Start clustering of query b: (nodes, levels, reps, sizes, radii, rep logits); Prop. 3's level when auto."""
    if auto:
        bq = beta * np.sqrt(np.sum(q * q))
        L, nb, nodes, lg, ip = level_profile(T, suf, q, beta, bq, k, attempt_cost, lze)
        levels = np.full(nodes.shape[0], L, np.int64)
        sizes, radii, _ = cluster_info(T, suf, nodes, levels)
        reps = np.empty(nodes.shape[0], np.int64)
        for j in range(nodes.shape[0]):
            reps[j] = T.node_point[nodes[j]]
        cnt[INNER] += ip
        cnt[SELECT] += ip - nb
        cnt[LEVEL] = L
        return nodes, levels, reps, sizes, radii, lg
    c0, c1 = cptr[b], cptr[b + 1]
    reps = creps[c0:c1]
    lg = np.empty(c1 - c0, np.float64)
    for j in range(c1 - c0):
        lg[j] = beta * _dot(T.points, reps[j], q)
    cnt[INNER] += c1 - c0
    cnt[LEVEL] = clevels[c0] if c1 > c0 else 0
    return cnodes[c0:c1], clevels[c0:c1], reps, csizes[c0:c1], cradii[c0:c1], lg


@njit(cache=True)
def _log_z_bounds(sizes, s, eps, lz_out):
    """Certified log Z_lo, log Z_hi (bounds of the module docstring of refimpl.sampling.bounds) into lz_out."""
    lo = -np.inf
    hi = -np.inf
    for j in range(sizes.shape[0]):
        ls = np.log(sizes[j]) + s[j]
        lo = _lse_add(lo, ls - eps[j])
        hi = _lse_add(hi, ls + eps[j])
    lz_out[LZ_LO] = lo
    lz_out[LZ_HI] = hi


# ----------------------------------------------------------------------------------------------------------------
# flat proposals: rejection (Eq. 3-5) and independent Metropolis-Hastings (Eq. 14)


@njit(cache=True, inline="always")
def _propose(cum, sizes, nodes, fa, mptr, members, node_point):
    """One proposal of Q (cluster j with probability cum-increment / cum[-1], a member uniformly): (j, p) with p
    the member's pre-order position, or -1 - its id (a representative, or a member of an array partition)."""
    j = _pick(cum, np.random.random() * cum[-1])
    u = np.random.randint(0, sizes[j])
    if mptr.shape[0] > 0:
        return j, -1 - members[mptr[j] + u]
    if u == 0:
        return j, -1 - node_point[nodes[j]]
    return j, fa[j] + u - 1


@njit(cache=True)
def flat_batch(T, suf, Q, beta, k, algo, upper, auto, attempt_cost, cptr, cnodes, clevels, creps, csizes, cradii,
               mptr, members, order, pos, eptr, eids, replace, chain_length, max_steps, seed):
    """Flat rejection (algo 0) or independent MH (algo 1) over a clustering, for every query of ``Q``.

    Cluster j has log-weight lw[j] per member: s_r + eps_C (``upper``) or s_r (Eq. 7). algo 0, Eq. 3-5 with
    per-cluster eps: propose cluster j with probability ∝ |C_j| e^{lw_j}, a member i uniformly, accept with
    e^{s_i - lw_j} <= 1 (lw = s_r + eps_C): accepted draws are exact. algo 1, Eq. 14: k independent chains of
    ``chain_length[b]`` states, the first drawn from Q, each next proposal accepted with
    min(1, exp((s_y' - lw_y') - (s_y - lw_y))); the final state of each chain is returned. Excluded ids have
    P = 0 (never accepted); without replacement the drawn ids join them. Members: ``members[mptr[j]..]`` for an
    array partition (mptr non-empty), else the u-th member of the tree cluster (nodes[j], levels[j]) in the tree's
    pre-order ``order`` / ``pos`` (:func:`refimpl.index.search.preorder`): p_v, then one contiguous range. A rejection
    draw (or an MH chain that has not reached an allowed state) after N proposals is made by ``_exact_draw``.
    LZ_EST is the importance-sampling estimate log(Z_prop mean e^{s_i - lw_j}) clipped to [LZ_LO, LZ_HI].
    """
    np.random.seed(seed)
    B = Q.shape[0]
    ids, sids, cnt, lz = _outputs(B, k)
    points = T.points
    mask, n_live, live, ls = _scratch(T, eids, replace)
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
        nodes, levels, reps, sizes, radii, sr = _start(T, suf, q, beta, k, auto, attempt_cost, b, cptr, cnodes, clevels, creps,
                                                       csizes, cradii, lze, c)
        nc = nodes.shape[0]
        c[N_CLUSTERS] = nc
        fa = np.empty(nc if mptr.shape[0] == 0 else 0, np.int64)  # pre-order start of the members after p_v
        for j in range(fa.shape[0]):
            x = _first_below(T, nodes[j], levels[j])
            fa[j] = pos[x] if x != -1 else 0
        bq = beta * np.sqrt(np.sum(q * q))
        eps = bq * radii
        _log_z_bounds(sizes, sr, eps, lz[b])
        lw = sr + eps if upper else sr.copy()
        ref = np.max(lw)
        cum = np.empty(nc, np.float64)
        acc = 0.0
        for j in range(nc):
            acc += sizes[j] * np.exp(lw[j] - ref)
            cum[j] = acc
        nb = eptr[b + 1] - eptr[b]
        buf = np.empty(nb + k, np.int64)
        buf[:nb] = eids[eptr[b]:eptr[b + 1]]
        mask[buf[:nb]] = True
        isum = 0.0
        # the proposals (iid from Q, independent of the acceptances) are generated RING ahead: at each use, slot
        # head is refilled (its pre-order entry prefetched) and slot head + AHEAD resolved (its row prefetched)
        for h in range(RING):
            rj[h], rp[h] = _propose(cum, sizes, nodes, fa, mptr, members, T.node_point)
            if rp[h] >= 0:
                prefetch_row(order2, rp[h])
        for h in range(AHEAD):
            ri[h] = -1 - rp[h] if rp[h] < 0 else order[rp[h]]
            prefetch_row(points, ri[h])
        head = 0
        for t in range(k):
            steps = 0
            y = -1
            wy = -np.inf
            sy = 0.0
            while True:
                if steps >= max_steps:
                    c[STATUS] = 1
                    return ids, sids, cnt, lz
                if steps >= n_live and (algo == 0 or wy == -np.inf):
                    y, sy = _exact_draw(T, q, beta, mask, live, ls, c)
                    break
                steps += 1
                j = rj[head]
                i = ri[head]
                rj[head], rp[head] = _propose(cum, sizes, nodes, fa, mptr, members, T.node_point)
                if rp[head] >= 0:
                    prefetch_row(order2, rp[head])
                r = head + AHEAD if head + AHEAD < RING else head + AHEAD - RING
                ri[r] = -1 - rp[r] if rp[r] < 0 else order[rp[r]]
                prefetch_row(points, ri[r])
                head = head + 1 if head + 1 < RING else 0
                c[ATTEMPTS] += 1
                s = beta * _dot(points, i, q)
                c[INNER] += 1
                w = s - lw[j]
                isum += np.exp(w)
                bad = _marked(mask, i)
                if algo == 0:
                    if np.random.random() < np.exp(w):
                        if bad:
                            c[EXCL_HITS] += 1
                            continue
                        c[ACCEPTED] += 1
                        y = i
                        sy = s
                        break
                else:
                    if bad:
                        w = -np.inf
                        c[EXCL_HITS] += 1
                    if y == -1 or (w > -np.inf and (w >= wy or np.random.random() < np.exp(w - wy))):
                        if y != -1:
                            c[ACCEPTED] += 1
                        y = i
                        wy = w
                        sy = s
                    if steps >= chain_length[b] and wy > -np.inf:
                        break
            ids[b, t] = y
            sids[b, t] = sy
            if replace == 0:
                buf[nb] = y
                mask[y] = True
                ls[1, ls.shape[1] - 1] = np.nan
                nb += 1
        mask[buf[:nb]] = False
        log_zprop = ref + np.log(cum[-1])
        est = log_zprop + np.log(max(isum / max(c[ATTEMPTS], 1), 1e-300))
        lz[b, LZ_EST] = min(max(est, lz[b, LZ_LO]), lz[b, LZ_HI])
    return ids, sids, cnt, lz


@njit(cache=True)
def _csr_new(B):
    """Empty CSR clusterings of B queries: (cptr (B + 1,), nodes, levels, sizes, radii) with a growable capacity."""
    return (np.zeros(B + 1, np.int64), np.empty(256, np.int64), np.empty(256, np.int64), np.empty(256, np.int64),
            np.empty(256, np.float64))


@njit(cache=True)
def _csr_put(csr, a, nodes, levels, sizes, radii):
    """Append the clustering of entry ``a`` (cptr[a] set, cptr[a + 1] written) to ``csr``; returns the CSR (its
    arrays doubled when full)."""
    cptr, cnodes, clevels, csizes, cradii = csr
    c0 = cptr[a]
    nc = nodes.shape[0]
    cap = cnodes.shape[0]
    if c0 + nc > cap:
        while c0 + nc > cap:
            cap *= 2
        cnodes, clevels = _grow(cnodes, c0, cap), _grow(clevels, c0, cap)
        csizes, cradii = _grow(csizes, c0, cap), _grow(cradii, c0, cap)
    cnodes[c0:c0 + nc] = nodes
    clevels[c0:c0 + nc] = levels
    csizes[c0:c0 + nc] = sizes
    cradii[c0:c0 + nc] = radii
    cptr[a + 1] = c0 + nc
    return cptr, cnodes, clevels, csizes, cradii


@njit(cache=True)
def mh_batch(T, suf, order, pos, Q, beta, k, sptr, snodes, sidx, start_levels, ms, max_frontier, refine, upper,
             log_gamma, max_refine, gnodes, glevels, chain_length, log_tv, max_steps, eptr, eids, replace, seed):
    """Independent MH (Eq. 14) for every query of ``Q`` with its own certified clustering, in one call.

    Per query b: the clustering is Alg. 2 (:func:`find_clustering_kernel` from the frontier
    ``snodes[sptr[sidx[b]]:sptr[sidx[b] + 1]]`` = C_(start_levels[b]), deepest level ``ms[b]``, frontier cap
    ``max_frontier``, 0 = none), then when ``refine`` the certified refinement (:func:`refine_kernel`, target
    ``log_gamma``, at most ``max_refine`` clusters); or, when ``gnodes`` is not empty, the given clustering (gnodes,
    glevels) for every query. Its certificate: eps_C = beta ||q|| rho(C), log Z_lo / Z_hi, and the certified
    log max P/Q (Eq. 7: max eps_C + log Z_hat - log Z_lo; ``upper``: log Z_hi - log Z_lo). Chain length:
    ``chain_length`` (> 0) or Eq. 6's 1 + ceil(gamma log(1/tv)) (``log_tv`` = log tv); if one exceeds ``max_steps``
    nothing is drawn (too_long). Then ``flat_batch`` (algo 1) on the clusterings in CSR form.
    Returns (ids, logits, counters, log-normalisers as flat_batch; per query: certified log gamma, chain length,
    inner products of the clustering's logits and refinement; too_long).
    """
    B = Q.shape[0]
    csr = _csr_new(B)
    lg = np.zeros(B, np.float64)
    chain = np.zeros(B, np.int64)
    cip = np.zeros(B, np.int64)
    lzb = np.empty(4, np.float64)
    too_long = False
    for b in range(B):
        q = Q[b]
        if gnodes.shape[0] > 0:
            nodes, levels = gnodes, glevels
        else:
            s0 = sptr[sidx[b]]
            nodes, levels, _, nd = find_clustering_kernel(T, q, snodes[s0:sptr[sidx[b] + 1]], start_levels[b],
                                                          ms[b], max_frontier)
        sizes, radii, _ = cluster_info(T, suf, nodes, levels)
        nc = nodes.shape[0]
        sr = np.empty(nc, np.float64)
        for j in range(nc):
            sr[j] = beta * _dot(T.points, T.node_point[nodes[j]], q)
        ip = nc
        if refine and gnodes.shape[0] == 0:
            nodes, levels, sr, sizes, radii, ip, _ = refine_kernel(T, suf, q, beta, nodes, levels, sr, sizes, radii,
                                                                   log_gamma, upper, max_refine)
            nc = nodes.shape[0]
        cip[b] = ip
        eps = beta * np.sqrt(np.sum(q * q)) * radii
        _log_z_bounds(sizes, sr, eps, lzb)
        lo = lzb[LZ_LO]
        if upper:
            lg[b] = lzb[LZ_HI] - lo
        else:
            _log_z_bounds(sizes, sr, np.zeros(nc), lzb)
            lg[b] = eps.max() + lzb[LZ_HI] - lo
        if chain_length > 0:
            chain[b] = chain_length
        else:
            need = 1.0 + max(0.0, np.ceil(np.exp(min(lg[b], 700.0)) * (-log_tv) - 1e-12))
            if need > max_steps:
                too_long = True
                chain[b] = max_steps + 1
                continue
            chain[b] = int(need)
        csr = _csr_put(csr, b, nodes, levels, sizes, radii)
    if too_long:
        ids, sids, cnt, lz = _outputs(B, k)
        return ids, sids, cnt, lz, lg, chain, cip, True
    cptr, cnodes, clevels, csizes, cradii = csr
    nclu = cptr[B]
    creps = np.empty(nclu, np.int64)
    for j in range(nclu):
        creps[j] = T.node_point[cnodes[j]]
    empty = np.zeros(0, np.int64)
    ids, sids, cnt, lz = flat_batch(T, suf, Q, beta, k, 1, upper, False, 1.0, cptr, cnodes[:nclu], clevels[:nclu],
                                    creps, csizes[:nclu], cradii[:nclu], empty, empty, order, pos, eptr, eids,
                                    replace, chain, max(max_steps, chain.max()), seed)
    return ids, sids, cnt, lz, lg, chain, cip, False


# ----------------------------------------------------------------------------------------------------------------
# Alg. 1: hierarchical rejection sampling


@njit(cache=True)
def _child_e(sc, bq, T, c, E, Lc, broken):
    """Bound exponent of child c's subtree: s_c + beta ||q|| MAXD(c) (s_c for a singleton) capped by its parent's
    E; broken: the printed s_c + beta ||q|| b^Lc, uncapped."""
    if broken:
        return sc + bq * T.base ** Lc
    Ec = sc if T.node_count[c] == 1 else sc + bq * T.node_maxd[c]
    return E if Ec > E else Ec


@njit(cache=True)
def alg1_batch(T, suf, Q, beta, k, auto, attempt_cost, cptr, cnodes, clevels, creps, csizes, cradii, eptr, eids, replace,
               max_attempts, broken, fallback_after, seed):
    """Alg. 1 (hierarchical rejection with running normalisers, restart option, nested self-child rule), per query.

    Masses are relative to exp(Eref), Eref = max_C E_C with E_C = s_r + beta ||q|| rho(C). A visited node X owns
    mass B(X), the probability (times Z_hat_hi = sum_C |C| e^{E_C}) that an attempt reaches it. A node entered
    through a new representative p (a start cluster, or a child that is not the nested self-child) has
    B = n e^E: it accepts p with mass e^{s_p}; the rest, and the whole mass (n - 1) e^E of a nested self-child
    node, is split between its children at the next occupied level: the self-child gets (n_self - 1) e^E (p is
    handled above: the nested self-child rule), a child c gets |c| e^{E_c} with E_c = min(E, s_c + beta ||q||
    MAXD(c)), and the remainder, >= 0 by the cap, is the restart option. Every target i is reached through its
    first node with probability B / Z_hat_hi and accepted with e^{s_i} / B, so each attempt returns i with
    probability e^{s_i} / Z_hat_hi whatever the descent: accepted draws are exact softmax samples (errata: beta in
    the exponent, the true radius MAXD, the cap E_c <= E that keeps the restart weight non-negative).

    One accept/descend step serves both variants: ``broken`` = the printed radius b^l, no cap and negative restart
    weights clipped to 0 (a negative control), and ``fallback_after`` > 0 = the authors' "return the unaccepted
    proposal after that many restarts" (another); the public sampler never sets them.

    A draw whose attempts reach the number of live targets is made by brute force (``_exact_draw``; still exact).

    Cost: the logits of a visited group's children are computed once per query (logit cache); a group's total
    child mass, n_self and next group are cached by its first child, so a restart costs O(1).
    LZ_EST = log Z_hat_hi + log(successes / attempts) clipped to the certified [LZ_LO, LZ_HI].
    """
    np.random.seed(seed)
    B = Q.shape[0]
    ids, sids, cnt, lz = _outputs(B, k)
    points = T.points
    size = 1024
    while size < 128 * k and size < (1 << 18):
        size *= 2
    keys = np.full(size, -1, np.int64)
    vals = np.empty(size, np.float64)
    gkeys = np.full(size, -1, np.int64)
    gmass = np.empty(size, np.float64)
    gnself = np.empty(size, np.int64)
    gafter = np.empty(size, np.int64)
    fill = np.zeros(2, np.int64)
    mask, n_live, live, ls = _scratch(T, eids, replace)
    for b in range(B):
        q = Q[b]
        c = cnt[b]
        live[0] = -2
        keys[:] = -1
        gkeys[:] = -1
        fill[:] = 0
        lze = _excluded(T, q, beta, eids, eptr[b], eptr[b + 1], c)
        lz[b, LZ_EXCL] = lze
        cn, cl, cr, cs, crad, sr = _start(T, suf, q, beta, k, auto, attempt_cost, b, cptr, cnodes, clevels, creps, csizes,
                                          cradii, lze, c)
        nc = cn.shape[0]
        c[N_CLUSTERS] = nc
        L0 = c[LEVEL]
        bq = beta * np.sqrt(np.sum(q * q))
        cE = np.empty(nc, np.float64)
        eps = np.empty(nc, np.float64)
        for j in range(nc):
            if broken:
                eps[j] = bq * T.base ** L0 if cs[j] > 1 else 0.0
            else:
                eps[j] = bq * crad[j]
            cE[j] = sr[j] + eps[j]
        _log_z_bounds(cs, sr, eps, lz[b])
        Eref = np.max(cE)
        cum = np.empty(nc, np.float64)
        cfirst = np.empty(nc, np.int64)
        acc = 0.0
        for j in range(nc):
            acc += cs[j] * np.exp(cE[j] - Eref)
            cum[j] = acc
            cfirst[j] = _first_below(T, cn[j], cl[j])
        nb = eptr[b + 1] - eptr[b]
        buf = np.empty(nb + k, np.int64)
        buf[:nb] = eids[eptr[b]:eptr[b + 1]]
        mask[buf[:nb]] = True
        for t in range(k):
            attempts = 0
            restarts = 0
            done = False
            while not done:
                if attempts >= max_attempts:
                    c[STATUS] = 1
                    return ids, sids, cnt, lz
                if attempts >= n_live and fallback_after == 0:
                    ids[b, t], sids[b, t] = _exact_draw(T, q, beta, mask, live, ls, c)
                    break
                attempts += 1
                c[ATTEMPTS] += 1
                j = _pick(cum, np.random.random() * cum[-1])
                v = cn[j]
                n = cs[j]
                E = cE[j]
                sv = sr[j]
                new = True
                ch = cfirst[j]
                while True:
                    ev = np.exp(E - Eref)
                    budget = n * ev if new else (n - 1) * ev
                    a = np.exp(sv - Eref) if new else 0.0
                    accept = False
                    if ch == -1:
                        # no children left: only the representative (new node) or nothing
                        accept = new and np.random.random() * budget < a
                        if not accept:
                            break
                    else:
                        Lc = T.node_level[ch]
                        Eself = sv + bq * T.base ** Lc if broken else E
                        h = _hslot(gkeys, ch)
                        if gkeys[h] == ch:
                            gsum = gmass[h]
                            nself = gnself[h]
                            after = gafter[h]
                        else:
                            gsum = 0.0
                            nself = n
                            x = ch
                            while x != -1 and T.node_level[x] == Lc:
                                sc = _logit(points, q, beta, T.node_point[x], keys, vals, fill[0:1], c)
                                gsum += T.node_count[x] * np.exp(_child_e(sc, bq, T, x, E, Lc, broken) - Eref)
                                nself -= T.node_count[x]
                                x = T.node_next_sibling[x]
                            after = x
                            if fill[1] * 2 < size:
                                gkeys[h] = ch
                                gmass[h] = gsum
                                gnself[h] = nself
                                gafter[h] = after
                                fill[1] += 1
                        mself = (nself - 1) * np.exp(Eself - Eref)
                        total = budget
                        if broken:
                            total = a + max(budget - a, mself + gsum)
                        u = np.random.random() * total
                        if u < a:
                            accept = True
                        else:
                            u -= a
                            if u < mself:  # the nested self-child: same representative, already handled
                                n = nself
                                E = Eself
                                new = False
                                ch = after
                                continue
                            u -= mself
                            if u >= gsum:
                                break  # restart
                            chosen = -1
                            Ec = E
                            sc = sv
                            x = ch
                            while x != -1 and T.node_level[x] == Lc:
                                sc = _logit(points, q, beta, T.node_point[x], keys, vals, fill[0:1], c)
                                Ec = _child_e(sc, bq, T, x, E, Lc, broken)
                                chosen = x
                                m_ = T.node_count[x] * np.exp(Ec - Eref)
                                if u < m_:
                                    break
                                u -= m_
                                x = T.node_next_sibling[x]
                            # (rounding: u < gsum guarantees a child; the last one absorbs the round-off)
                            v = chosen
                            n = T.node_count[chosen]
                            E = Ec
                            sv = sc
                            new = True
                            ch = T.node_first_child[chosen]
                            continue
                    # accept the representative of v
                    i = T.node_point[v]
                    if _marked(mask, i):
                        c[EXCL_HITS] += 1
                        break
                    ids[b, t] = i
                    sids[b, t] = sv
                    c[ACCEPTED] += 1
                    done = True
                    break
                if not done:
                    restarts += 1
                    c[RESTARTS] += 1
                    if fallback_after > 0 and restarts >= fallback_after:
                        ids[b, t] = T.node_point[v]
                        sids[b, t] = sv
                        c[FALLBACKS] += 1
                        done = True
            if replace == 0:
                buf[nb] = ids[b, t]
                mask[ids[b, t]] = True
                ls[1, ls.shape[1] - 1] = np.nan
                nb += 1
        mask[buf[:nb]] = False
        lhi = lz[b, LZ_HI]
        succ = c[ACCEPTED] + c[EXCL_HITS]
        est = lhi + np.log(max(succ, 1) / max(c[ATTEMPTS], 1))
        lz[b, LZ_EST] = min(max(est, lz[b, LZ_LO]), lhi)
    return ids, sids, cnt, lz


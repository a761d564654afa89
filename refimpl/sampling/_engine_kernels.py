"""The batched mining kernel behind :mod:`refimpl.sampling.engine`: one compiled call answers a whole batch.

For every query of the batch, inside one Numba function: the clustering (Alg. 2 with the Remark 2 frontier cap,
or the start level of Alg. 1), the Eq. 7 proposal, and the draws (Alg. 1, independent MH of Eq. 14, or the
experiments' procedure). The per-query building blocks are the kernels of :mod:`refimpl.sampling._cluster_kernels`
(Alg. 2, cluster sizes / certified radii, start-level profile) and :mod:`refimpl.sampling._kernels` (the flat MH
chains and Alg. 1); this module only adds the batch loop, the certificates and the experiments' selection.

Certified quantities (log Z interval, log max P/Q, the Eq. 6 TV bound) are always accumulated in float64, whatever
the dtype of the tree's points.
"""
from __future__ import annotations

import numpy as np
from numba import njit

from refimpl.sampling._cluster_kernels import cluster_info, find_clustering_kernel
from refimpl.sampling._kernels import alg1_kernel, flat_kernel

# procedure codes (engine.PROCEDURES)
REJECTION = 0
MH = 1
PAPER = 2

# columns of the per-query statistics
S_LOG_Z = 0  # log Z estimate, clipped to [S_LOG_Z_LO, S_LOG_Z_HI]
S_LOG_Z_LO = 1
S_LOG_Z_HI = 2
S_LOG_GAMMA = 3  # certified log max P/Q of the proposal sampled (rejection: log Z_hi / Z_lo of the partition)
S_TV = 4  # Eq. 6 bound for "mh" (exp(-(s - 1)/gamma)); 0 for exact draws; NaN for "paper" (no bound exists)
S_CHAIN = 5  # chain length used (states)
S_CLUSTERS = 6  # clusters of the proposal
S_INNER = 7  # inner products computed for this query
S_STATUS = 8  # 0 ok, 1 attempt budget exhausted, 2 Eq. 6 chain longer than the budget
S_DIST = 9  # distance evaluations of Alg. 2
N_STATS = 10


@njit(cache=True)
def _lse_terms(logs, sizes, shift):
    """log sum_j sizes[j] exp(logs[j] + shift[j]) (shift may be a zero-length array: no shift), in float64."""
    n = logs.shape[0]
    m = -np.inf
    for j in range(n):
        v = logs[j] + (shift[j] if shift.shape[0] else 0.0)
        if v > m:
            m = v
    s = 0.0
    for j in range(n):
        v = logs[j] + (shift[j] if shift.shape[0] else 0.0)
        s += sizes[j] * np.exp(v - m)
    return m + np.log(s)


@njit(cache=True)
def _dot64(points, i, q):
    s = 0.0
    for d in range(q.shape[0]):
        s += np.float64(points[i, d]) * q[d]
    return s


@njit(cache=True)
def _heap_push(hp, hi, n, p, i):
    """Push (p, i) on the max-heap (hp priorities, hi items) holding n entries; returns the new arrays and n."""
    if n == hp.shape[0]:
        hp2 = np.empty(2 * n + 16, np.float64)
        hi2 = np.empty(2 * n + 16, np.int64)
        hp2[:n] = hp[:n]
        hi2[:n] = hi[:n]
        hp, hi = hp2, hi2
    x = n
    hp[x] = p
    hi[x] = i
    while x > 0:
        par = (x - 1) // 2
        if hp[par] >= hp[x]:
            break
        hp[par], hp[x] = hp[x], hp[par]
        hi[par], hi[x] = hi[x], hi[par]
        x = par
    return hp, hi, n + 1


@njit(cache=True)
def _heap_pop(hp, hi, n):
    """Pop the item of largest priority; returns (item, n - 1)."""
    top = hi[0]
    n -= 1
    hp[0] = hp[n]
    hi[0] = hi[n]
    x = 0
    while True:
        l = 2 * x + 1
        if l >= n:
            break
        c = l
        if l + 1 < n and hp[l + 1] > hp[l]:
            c = l + 1
        if hp[x] >= hp[c]:
            break
        hp[c], hp[x] = hp[x], hp[c]
        hi[c], hi[x] = hi[x], hi[c]
        x = c
    return top, n


@njit(cache=True)
def _grow_f(a, n):
    out = np.empty(2 * n + 16, a.dtype)
    out[:n] = a[:n]
    return out


@njit(cache=True)
def refine_upper(points, q, beta, bq, nodes, levels, log_ratio, max_clusters, k, node_point, node_level, first_child,
                 next_sibling, node_count, node_maxd, suf):
    """Certified refinement of a partition for Alg. 1 (ours): split, best first, the cluster with the largest share
    |C| e^{s_r} (e^{eps_C} - e^{-eps_C}) of Z_hi - Z_lo until log Z_hi - log Z_lo <= max(``log_ratio``,
    log(|C| / k)) or ``max_clusters`` clusters. The second term balances the two costs of ``k`` exact draws (the
    U-shaped cost of Prop. 3): the expected attempts k Z_hi / Z <= k Z_hi / Z_lo against the |C| inner products
    already spent on the partition. A split replaces (v, L) by its children at the next occupied level (the nested
    self-child (v, Lc) and the children of level Lc), so the result is still a partition of tree clusters, and
    Z_hi / Z_lo bounds the expected attempts per exact draw (each attempt succeeds with probability Z / Z_hi).
    Returns (nodes, levels, sizes, radii, rep logits, inner products)."""
    n = nodes.shape[0]
    cap = 2 * n + 16
    nd_ = np.empty(cap, np.int64)
    lv_ = np.empty(cap, np.int64)
    sz_ = np.empty(cap, np.int64)
    rd_ = np.empty(cap, np.float64)
    sr_ = np.empty(cap, np.float64)
    alive = np.empty(cap, np.bool_)
    sizes, radii, _ = cluster_info(suf, nodes, levels, node_point, node_level, first_child, next_sibling, node_count,
                                   node_maxd)
    for j in range(n):
        nd_[j] = nodes[j]
        lv_[j] = levels[j]
        sz_[j] = sizes[j]
        rd_[j] = radii[j]
        sr_[j] = beta * _dot64(points, node_point[nodes[j]], q)
        alive[j] = True
    ip = n
    ref = -np.inf
    for j in range(n):
        if sr_[j] + bq * rd_[j] > ref:
            ref = sr_[j] + bq * rd_[j]
    hp = np.empty(n + 16, np.float64)
    hi = np.empty(n + 16, np.int64)
    nh = 0
    zhi = 0.0
    zlo = 0.0
    for j in range(n):
        e = bq * rd_[j]
        zhi += sz_[j] * np.exp(sr_[j] + e - ref)
        zlo += sz_[j] * np.exp(sr_[j] - e - ref)
        if e > 0:
            hp, hi, nh = _heap_push(hp, hi, nh, np.log(sz_[j]) + sr_[j] + e + np.log(-np.expm1(-2 * e)), j)
    n_alive = n
    splits = 0
    kids = np.empty(16, np.int64)
    next_exact = 0
    while nh > 0 and n_alive < max_clusters:
        target = max(log_ratio, np.log(n_alive / k))
        if splits >= next_exact or np.log(zhi) - np.log(max(zlo, 1e-300)) <= target:
            # exact sums (running sums drift by cancellation): on a claimed stop, and after 64, 192, 448, ...
            # splits (a geometric schedule keeps the recomputation O(n) in total)
            next_exact = 2 * splits + 64
            zhi = 0.0
            zlo = 0.0
            for j in range(n):
                if alive[j]:
                    e = bq * rd_[j]
                    zhi += sz_[j] * np.exp(sr_[j] + e - ref)
                    zlo += sz_[j] * np.exp(sr_[j] - e - ref)
            if np.log(zhi) - np.log(max(zlo, 1e-300)) <= target:
                break
        j, nh = _heap_pop(hp, hi, nh)
        v = nd_[j]
        L = lv_[j]
        ch = first_child[v]
        while ch != -1 and node_level[ch] >= L:
            ch = next_sibling[ch]
        if ch == -1:
            continue
        Lc = node_level[ch]
        nk = 1
        kids[0] = v
        while ch != -1 and node_level[ch] == Lc:
            if nk == kids.shape[0]:
                kids = _grow_f(kids, nk)
            kids[nk] = ch
            nk += 1
            ch = next_sibling[ch]
        ks, kr, _ = cluster_info(suf, kids[:nk], np.full(nk, Lc, np.int64), node_point, node_level, first_child,
                                 next_sibling, node_count, node_maxd)
        e = bq * rd_[j]
        alive[j] = False
        zhi -= sz_[j] * np.exp(sr_[j] + e - ref)
        zlo -= sz_[j] * np.exp(sr_[j] - e - ref)
        for x in range(nk):
            if n == nd_.shape[0]:
                nd_, lv_, sz_ = _grow_f(nd_, n), _grow_f(lv_, n), _grow_f(sz_, n)
                rd_, sr_, alive = _grow_f(rd_, n), _grow_f(sr_, n), _grow_f(alive, n)
            nd_[n] = kids[x]
            lv_[n] = Lc
            sz_[n] = ks[x]
            rd_[n] = kr[x]
            if x == 0:
                sr_[n] = sr_[j]
            else:
                sr_[n] = beta * _dot64(points, node_point[kids[x]], q)
                ip += 1
            alive[n] = True
            ex = bq * kr[x]
            zhi += ks[x] * np.exp(sr_[n] + ex - ref)
            zlo += ks[x] * np.exp(sr_[n] - ex - ref)
            if ex > 0:
                hp, hi, nh = _heap_push(hp, hi, nh, np.log(ks[x]) + sr_[n] + ex + np.log(-np.expm1(-2 * ex)), n)
            n += 1
        n_alive += nk - 1
        splits += 1
    m = 0
    for j in range(n):
        if alive[j]:
            m += 1
    on = np.empty(m, np.int64)
    ol = np.empty(m, np.int64)
    osz = np.empty(m, np.int64)
    ord_ = np.empty(m, np.float64)
    osr = np.empty(m, np.float64)
    m = 0
    for j in range(n):
        if alive[j]:
            on[m], ol[m], osz[m], ord_[m], osr[m] = nd_[j], lv_[j], sz_[j], rd_[j], sr_[j]
            m += 1
    return on, ol, osz, ord_, osr, ip


@njit(cache=True)
def _record(stats, b, log_z, lzlo, lzhi, log_gamma, tv, chain, nc, ip, nd, status, out_ids, out_logits, lo, ids,
            logits, scale):
    """Write query b's statistics (columns S_*) and its draws (logits multiplied by ``scale``)."""
    stats[b, S_LOG_Z] = log_z
    stats[b, S_LOG_Z_LO] = lzlo
    stats[b, S_LOG_Z_HI] = lzhi
    stats[b, S_LOG_GAMMA] = log_gamma
    stats[b, S_TV] = tv
    stats[b, S_CHAIN] = chain
    stats[b, S_CLUSTERS] = nc
    stats[b, S_INNER] = ip
    stats[b, S_DIST] = nd
    stats[b, S_STATUS] = status
    for t in range(ids.shape[0]):
        out_ids[lo + t] = ids[t]
        out_logits[lo + t] = logits[t] * scale


@njit(cache=True)
def engine_kernel(points, Q, qnorm, beta, procedure, counts, out_ptr, excl_ptr, excl_ids, seeds, start_levels, ms,
                  max_frontier, n_top, chain_length, n_chains, temperature, log_tv, max_steps, log_ratio, max_refine,
                  root, base,
                  node_point, node_level, first_child, next_sibling, node_count, node_maxd, suf, out_ids, out_logits,
                  stats):
    """Draw ``counts[b]`` negatives for every query ``Q[b]`` of a batch (one compiled call).

    Every procedure first runs Alg. 2 (first frontier C_(start_levels[b]), deepest level ``ms[b]``, frontier cap
    ``max_frontier``, 0 = none). REJECTION: the partition refined (:func:`refine_upper`) until log Z_hi/Z_lo <=
    ``log_ratio`` or ``max_refine`` clusters, then Alg. 1 started from it (bounds E_C = s_r + beta ||q|| rho(C)),
    exact draws of the softmax renormalised over the non-excluded targets. MH: then ``counts[b]`` independent chains (Eq. 14) of
    ``chain_length`` states (0: Eq. 6's length for TV exp(log_tv) from the certified gamma), each started from the
    Eq. 7 proposal. PAPER: Alg. 2 as for MH, the ``n_top`` clusters whose representatives are closest to the query
    (0 = all), ``n_chains[b]`` chains of ``chain_length`` states at inverse temperature beta / temperature, and the
    ``counts[b]`` top-scoring distinct final states (repeated from the best when fewer are distinct).
    Draws of query b go to ``out_ids[out_ptr[b]:out_ptr[b+1]]`` with their logits beta <q, t>; per-query
    statistics to ``stats[b]`` (columns S_*). Excluded ids of query b: ``excl_ids[excl_ptr[b]:excl_ptr[b+1]]``.
    """
    B = Q.shape[0]
    empty = np.zeros(0, np.int64)
    nofloat = np.zeros(0, np.float64)
    for b in range(B):
        c = counts[b]
        q = Q[b]
        bq = beta * qnorm[b]
        excl = excl_ids[excl_ptr[b]:excl_ptr[b + 1]]
        lo = out_ptr[b]
        for j in range(N_STATS):
            stats[b, j] = 0.0
        if c == 0:
            continue
        # Alg. 2 with the Remark 2 cap
        nodes, levels, nd = find_clustering_kernel(points, q, root, start_levels[b], ms[b], base, max_frontier,
                                                   node_point, node_level, first_child, next_sibling, node_count)
        nc = nodes.shape[0]
        dropped = False
        if procedure == PAPER and n_top > 0 and nc > n_top:
            dropped = True
            dist = np.empty(nc, np.float64)
            for j in range(nc):
                p = node_point[nodes[j]]
                s = 0.0
                for d in range(q.shape[0]):
                    t_ = np.float64(points[p, d]) - q[d]
                    s += t_ * t_
                dist[j] = s
            order = np.argsort(dist, kind="mergesort")[:n_top]
            nodes = nodes[order]
            levels = levels[order]
            nc = n_top
        sizes, radii, _ = cluster_info(suf, nodes, levels, node_point, node_level, first_child, next_sibling,
                                       node_count, node_maxd)
        fs = sizes.astype(np.float64)
        b_eff = beta / temperature if procedure == PAPER else beta
        sr = np.empty(nc, np.float64)
        for j in range(nc):
            sr[j] = b_eff * _dot64(points, node_point[nodes[j]], q)
        ref = sr.max()
        cum = np.empty(nc, np.float64)
        acc = 0.0
        for j in range(nc):
            acc += fs[j] * np.exp(sr[j] - ref)
            cum[j] = acc
        if procedure == REJECTION:
            # Alg. 1 started from Alg. 2's partition after the certified refinement: E_C = s_r + beta ||q|| rho(C)
            nodes, levels, sizes, radii, sr, ipr = refine_upper(points, q, beta, bq, nodes, levels, log_ratio,
                                                                max_refine, c, node_point, node_level, first_child,
                                                                next_sibling, node_count, node_maxd, suf)
            nc = nodes.shape[0]
            fs = sizes.astype(np.float64)
            eps = bq * radii
            cE = sr + eps
            cache = 1 << min(max(int(np.ceil(np.log2(128.0 * c))), 10), 18)
            ids, sids, cnt = alg1_kernel(points, q, beta, bq, base, c, nodes, levels, sizes, cE, sr, node_point,
                                         node_level, first_child, next_sibling, node_count, node_maxd, excl, 1,
                                         max_steps, 0, 0, cache, seeds[b])
            lzhi = _lse_terms(cE, fs, nofloat)
            lzlo = _lse_terms(sr - eps, fs, nofloat)
            succ = cnt[1] + cnt[3]
            lz = lzhi + np.log(max(succ, 1) / max(cnt[0], 1))
            _record(stats, b, min(max(lz, lzlo), lzhi), lzlo, lzhi, lzhi - lzlo, 0.0, 0.0, nc,
                    ipr + cnt[2] + excl.shape[0], nd, 1.0 if cnt[4] else 0.0, out_ids, out_logits, lo, ids, sids, 1.0)
            continue
        if procedure == MH:
            eps = bq * radii
            lzlo = _lse_terms(sr - eps, fs, nofloat)
            lzhi = _lse_terms(sr + eps, fs, nofloat)
            lzhat = ref + np.log(acc)
            log_gamma = eps.max() + lzhat - lzlo  # certified log max P/Q of Eq. 7 (max eps_C + log Zhat/Z_lo)
            s = chain_length
            if s == 0:
                g = np.exp(min(log_gamma, 700.0))
                need = 1.0 + np.ceil(g * (-log_tv) - 1e-12)
                if need > max_steps:
                    stats[b, S_STATUS] = 2.0
                    stats[b, S_LOG_GAMMA] = log_gamma
                    stats[b, S_CLUSTERS] = nc
                    continue
                s = int(need)
            ids, sids, cnt, isum = flat_kernel(points, q, beta, c, 1, cum, sr, nodes, levels, sizes, empty, empty,
                                               node_point, node_level, first_child, next_sibling, node_count, excl,
                                               1, s, max(max_steps, s), seeds[b])
            lzprop = lzhat
            lz = lzprop + np.log(max(isum / max(cnt[0], 1), 1e-300))
            _record(stats, b, min(max(lz, lzlo), lzhi), lzlo, lzhi, log_gamma,
                    np.exp(-(s - 1) / np.exp(min(log_gamma, 700.0))), s, nc, nc + cnt[2] + excl.shape[0], nd,
                    1.0 if cnt[4] else 0.0, out_ids, out_logits, lo, ids, sids, 1.0)
            continue
        # PAPER: chains of chain_length states, then the top-scoring distinct final states
        nch = n_chains[b]
        ids, sids, cnt, isum = flat_kernel(points, q, b_eff, nch, 1, cum, sr, nodes, levels, sizes, empty, empty,
                                           node_point, node_level, first_child, next_sibling, node_count, excl, 1,
                                           chain_length, max(max_steps, chain_length), seeds[b])
        order = np.argsort(-sids, kind="mergesort")
        sel = np.empty(c, np.int64)
        sel_s = np.empty(c, np.float64)
        ns = 0
        for x in range(nch):
            i = ids[order[x]]
            dup = False
            for y in range(ns):
                if sel[y] == i:
                    dup = True
                    break
            if not dup:
                sel[ns] = i
                sel_s[ns] = sids[order[x]]
                ns += 1
                if ns == c:
                    break
        for t in range(ns, c):  # fewer distinct states than requested: repeat from the best
            sel[t] = sel[(t - ns) % ns]
            sel_s[t] = sel_s[(t - ns) % ns]
        # dropped clusters: Q = 0 on some targets, max P/Q = inf; no bound of any kind otherwise
        _record(stats, b, np.nan, np.nan, np.nan, np.inf if dropped else np.nan, np.nan, chain_length, nc,
                nc + cnt[2] + excl.shape[0], nd, 1.0 if cnt[4] else 0.0, out_ids, out_logits, lo, sel, sel_s,
                temperature)

"""The batched mining kernel behind :mod:`refimpl.sampling.engine`: one compiled call answers a whole batch.

For every query of the batch, inside one Numba function, the shared batch samplers of the sampling layer, one call
per group of queries needing the same number of draws: for "rejection", ``adaptive_batch``
(:mod:`refimpl.sampling._adaptive`: exact rejection sampling, Eq. 3-5, on an envelope of tree clusters refined per
query from a start level scored by the caller's GEMM, with certified cluster bounds); for "mh" and "paper", Alg. 2
with the Remark 2 frontier cap (:func:`refimpl.sampling._cluster_kernels.find_clustering_kernel`), the proposal's
certificates, then ``flat_batch`` (independent MH of Eq. 14 from the Eq. 7 proposal) on the clusterings in CSR form.
This module only adds the per-query chain lengths of Eq. 6, the experiments' selection and the per-query
statistics; it holds no sampler of its own.

Certified quantities (log Z interval, log max P/Q, the Eq. 6 TV bound) are always accumulated in float64, whatever
the dtype of the tree's points.
"""
from __future__ import annotations

import numpy as np
from numba import njit

from refimpl.sampling._adaptive import adaptive_batch
from refimpl.sampling._cluster_kernels import _dot, cluster_info, find_clustering_kernel
from refimpl.sampling._kernels import ATTEMPTS, EXACT, INNER, LZ_EST, LZ_HI, LZ_LO, N_CLUSTERS, NC as NC_SAMPLER, \
    STATUS, _csr_new, _csr_put, _log_z_bounds, flat_batch

# procedure codes (engine.PROCEDURES)
REJECTION = 0
MH = 1
PAPER = 2

# columns of the per-query statistics
S_LOG_Z = 0  # log Z estimate, clipped to [S_LOG_Z_LO, S_LOG_Z_HI]
S_LOG_Z_LO = 1
S_LOG_Z_HI = 2
S_LOG_GAMMA = 3  # certified log max P/Q of the proposal sampled (rejection: log Z_hi / Z_lo of the envelope)
S_TV = 4  # Eq. 6 bound for "mh" (exp(-(s - 1)/gamma)); 0 for exact draws; NaN for "paper" (no bound exists)
S_CHAIN = 5  # chain length used (states)
S_CLUSTERS = 6  # clusters of the proposal
S_INNER = 7  # inner products computed for this query
S_STATUS = 8  # 0 ok, 1 attempt budget exhausted, 2 Eq. 6 chain longer than the budget
S_DIST = 9  # distance evaluations of Alg. 2 (0 for "rejection", which does not run it)
S_ATTEMPTS = 10  # rejection attempts ("rejection") or proposals made by the MH chains ("mh", "paper")
S_EXACT = 11  # "rejection": draws made by brute force (the adaptive sampler's switch; still exact)
N_STATS = 12


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
def _top_closest(nodes, levels, dists, n_top):
    """The ``n_top`` clusters whose representatives are closest to q (``dists``: their distances from Alg. 2;
    ties: first in the output of Alg. 2)."""
    order = np.argsort(dists, kind="mergesort")[:n_top]
    return nodes[order], levels[order]


@njit(cache=True)
def engine_kernel(T, suf, order, pos, Q, qnorm, beta, procedure, counts, out_ptr, excl_ptr, excl_ids, seed, sptr,
                  snodes, sidx, start_levels, ms, max_frontier, n_top, chain_length, n_chains, temperature, log_tv,
                  max_steps, attempt_cost, F0, S0, margin, CT, broken, out_ids, out_logits, stats):
    """Draw ``counts[b]`` negatives for every query ``Q[b]`` of a batch (one compiled call).

    ``T`` is the tree (TreeArrays; ``suf`` its suffix radii; ``order``, ``pos`` its pre-order,
    :func:`refimpl.index.search.preorder`: the clusters' members as ranges). REJECTION: ``adaptive_batch`` (exact
    rejection sampling of the softmax renormalised over the non-excluded targets, Eq. 3-5, with an envelope refined
    per query from the start frontier ``F0`` (logits ``S0[b]`` from the caller's GEMM, rounding ``margin``, the
    tree's child table ``CT``) and shared by its draws; certified cluster bounds (Prop. 1 and the norm bound);
    ``attempt_cost`` sets its refinement rule; ``broken`` drops the radius term, a negative control of the tests);
    no Alg. 2. MH and PAPER first run Alg. 2 from the first frontier ``snodes[sptr[sidx[b]]:sptr[sidx[b] + 1]]`` =
    C_(start_levels[b]), deepest level ``ms[b]``, frontier cap ``max_frontier`` (0 = none). MH: ``counts[b]``
    independent chains (Eq. 14) of ``chain_length`` states (0: Eq. 6's length for TV exp(log_tv) from the
    certified gamma, per query), each started from the Eq. 7 proposal. PAPER: the ``n_top`` clusters of Alg. 2's
    output whose representatives are closest to the query (0 = all), ``n_chains[b]`` chains of ``chain_length``
    states at inverse temperature beta / temperature, and the ``counts[b]`` top-scoring distinct final states
    (repeated from the best when fewer are distinct).

    The queries with draws are ordered by the number of draws they need (counts[b]; PAPER: n_chains[b]), their
    clusterings (MH, PAPER) collected in CSR form, and each group of equal need is sampled by ONE call of
    ``adaptive_batch`` (REJECTION, with replacement, at most ``max_steps`` attempts per draw) or ``flat_batch``
    (MH, PAPER; algo 1, upper False = Eq. 7) seeded by ``seed + g`` (g = the group's rank): no query draws more
    than it needs. If some query's Eq. 6 length exceeds ``max_steps``
    (status 2), nothing is drawn. Draws of query b go to
    ``out_ids[out_ptr[b]:out_ptr[b+1]]`` with their logits beta <q, t>; per-query statistics to ``stats[b]``
    (columns S_*). Excluded ids of query b: ``excl_ids[excl_ptr[b]:excl_ptr[b+1]]``.
    """
    B = Q.shape[0]
    D = Q.shape[1]
    b_eff = beta / temperature if procedure == PAPER else beta
    # pass 1: the clustering of every query with draws, in CSR form
    act = np.empty(B, np.int64)
    na = 0
    csr = _csr_new(B)
    cptr = csr[0]
    chain = np.zeros(B, np.int64)
    pre_ip = np.zeros(B, np.int64)
    dropped = np.zeros(B, np.bool_)
    too_long = False
    # queries in increasing order of the draws they need (stable), so that each distinct number of draws is one
    # contiguous group of the CSR below and the batch samplers draw exactly that many for the group
    ndraw = np.empty(B, np.int64)
    for b in range(B):
        ndraw[b] = n_chains[b] if procedure == PAPER else counts[b]
        for j in range(N_STATS):
            stats[b, j] = 0.0
    for b in np.argsort(ndraw, kind="mergesort"):
        c = counts[b]
        if c == 0:
            continue
        if procedure == REJECTION:  # no clustering: the adaptive sampler refines its own envelope
            act[na] = b
            na += 1
            cptr[na] = cptr[na - 1]
            continue
        q = Q[b]
        bq = beta * qnorm[b]
        s0 = sptr[sidx[b]]
        nodes, levels, dists, nd = find_clustering_kernel(T, q, snodes[s0:sptr[sidx[b] + 1]], start_levels[b],
                                                          ms[b], max_frontier)
        stats[b, S_DIST] = nd
        if procedure == PAPER and n_top > 0 and nodes.shape[0] > n_top:
            dropped[b] = True
            nodes, levels = _top_closest(nodes, levels, dists, n_top)
        sizes, radii, _ = cluster_info(T, suf, nodes, levels)
        nc = nodes.shape[0]
        stats[b, S_CLUSTERS] = nc
        if procedure == MH:
            # certified log max P/Q of Eq. 7: max eps_C + log Zhat / Z_lo (needs the representatives' logits)
            sr = np.empty(nc, np.float64)
            for j in range(nc):
                sr[j] = beta * _dot(T.points, T.node_point[nodes[j]], q)
            pre_ip[b] = nc
            eps = bq * radii
            lzb = np.empty(4, np.float64)
            _log_z_bounds(sizes, sr, eps, lzb)
            lzlo = lzb[LZ_LO]
            _log_z_bounds(sizes, sr, np.zeros(nc), lzb)
            log_gamma = eps.max() + lzb[LZ_LO] - lzlo
            stats[b, S_LOG_GAMMA] = log_gamma
            s = chain_length
            if s == 0:
                need = 1.0 + np.ceil(np.exp(min(log_gamma, 700.0)) * (-log_tv) - 1e-12)
                if need > max_steps:
                    stats[b, S_STATUS] = 2.0
                    too_long = True
                    continue
                s = int(need)
            chain[b] = s
        else:
            chain[b] = chain_length
        csr = _csr_put(csr, na, nodes, levels, sizes, radii)
        act[na] = b
        na += 1
    if too_long or na == 0:
        return
    cptr, cnodes, clevels, csizes, cradii = csr
    # pass 2: one batch-sampler call per group of active queries needing the same number of draws
    nclu = cptr[na]
    creps = np.empty(nclu, np.int64)
    for j in range(nclu):
        creps[j] = T.node_point[cnodes[j]]
    Qa = np.empty((na, D), np.float64)
    eptr = np.zeros(na + 1, np.int64)
    kmax = 0
    steps = max_steps
    chain_a = np.empty(na, np.int64)
    S0a = np.empty((na if procedure == REJECTION else 0, S0.shape[1]), np.float64)
    for a in range(na):
        b = act[a]
        Qa[a] = Q[b]
        if procedure == REJECTION:
            S0a[a] = S0[b]
        eptr[a + 1] = eptr[a] + excl_ptr[b + 1] - excl_ptr[b]
        kmax = max(kmax, ndraw[b])
        steps = max(steps, chain[b])
        chain_a[a] = chain[b]
    eids = np.empty(eptr[na], np.int64)
    for a in range(na):
        b = act[a]
        eids[eptr[a]:eptr[a + 1]] = excl_ids[excl_ptr[b]:excl_ptr[b + 1]]
    ids = np.full((na, kmax), -1, np.int64)
    sids = np.zeros((na, kmax), np.float64)
    cnt = np.zeros((na, NC_SAMPLER), np.int64)
    lz = np.zeros((na, 4), np.float64)
    empty = np.zeros(0, np.int64)
    a0 = 0
    g = 0
    while a0 < na:
        kg = ndraw[act[a0]]
        a1 = a0 + 1
        while a1 < na and ndraw[act[a1]] == kg:
            a1 += 1
        # the CSR slices keep absolute offsets into cnodes / eids, as the batch samplers index them
        if procedure == REJECTION:
            gi, gs, gc, gl = adaptive_batch(T, suf, order, pos, Qa[a0:a1], beta, kg, eptr[a0:a1 + 1], eids, 1,
                                            max_steps, attempt_cost, seed + g, F0, S0a[a0:a1], margin, CT,
                                            broken)
        else:
            gi, gs, gc, gl = flat_batch(T, suf, Qa[a0:a1], b_eff, kg, 1, False, False, 1.0, cptr[a0:a1 + 1], cnodes,
                                        clevels, creps, csizes, cradii, empty, empty, order, pos, eptr[a0:a1 + 1],
                                        eids, 1,
                                        chain_a[a0:a1], steps, seed + g)
        ids[a0:a1, :kg] = gi
        sids[a0:a1, :kg] = gs
        cnt[a0:a1] = gc
        lz[a0:a1] = gl
        failed = False
        for a in range(a0, a1):
            failed = failed or gc[a - a0, STATUS] != 0
        if failed:  # the caller raises; the later groups are not drawn
            break
        a0 = a1
        g += 1
    # pass 3: statistics and draws of every active query
    for a in range(na):
        b = act[a]
        c = counts[b]
        lo = out_ptr[b]
        ca = cnt[a]
        nc = cptr[a + 1] - cptr[a]
        nd = stats[b, S_DIST]
        ip = pre_ip[b] + ca[INNER]
        status = 1.0 if ca[STATUS] else 0.0
        stats[b, S_ATTEMPTS] = ca[ATTEMPTS]
        if procedure == REJECTION:
            # the envelope's proposal has max P/Q <= Z_hi / Z_lo (its certified interval), which also bounds the
            # expected attempts per draw
            stats[b, S_EXACT] = ca[EXACT]
            _record(stats, b, lz[a, LZ_EST], lz[a, LZ_LO], lz[a, LZ_HI], lz[a, LZ_HI] - lz[a, LZ_LO], 0.0, 0.0,
                    ca[N_CLUSTERS], ip, nd, status, out_ids, out_logits, lo, ids[a, :c], sids[a, :c], 1.0)
        elif procedure == MH:
            log_gamma = stats[b, S_LOG_GAMMA]
            _record(stats, b, lz[a, LZ_EST], lz[a, LZ_LO], lz[a, LZ_HI], log_gamma,
                    np.exp(-(chain[b] - 1) / np.exp(min(log_gamma, 700.0))), chain[b], nc, ip, nd, status, out_ids,
                    out_logits, lo, ids[a, :c], sids[a, :c], 1.0)
        else:
            # PAPER: the top-scoring distinct final states of the query's n_chains[b] chains
            nch = n_chains[b]
            ia = ids[a, :nch]
            sa = sids[a, :nch]
            order = np.argsort(-sa, kind="mergesort")
            sel = np.empty(c, np.int64)
            sel_s = np.empty(c, np.float64)
            ns = 0
            for x in range(nch):
                i = ia[order[x]]
                dup = False
                for y in range(ns):
                    if sel[y] == i:
                        dup = True
                        break
                if not dup:
                    sel[ns] = i
                    sel_s[ns] = sa[order[x]]
                    ns += 1
                    if ns == c:
                        break
            for t in range(ns, c):  # fewer distinct states than requested: repeat from the best
                sel[t] = sel[(t - ns) % ns]
                sel_s[t] = sel_s[(t - ns) % ns]
            # dropped clusters: Q = 0 on some targets, max P/Q = inf; no bound of any kind otherwise
            _record(stats, b, np.nan, np.nan, np.nan, np.inf if dropped[b] else np.nan, np.nan, chain_length, nc,
                    ip, nd, status, out_ids, out_logits, lo, sel, sel_s, temperature)

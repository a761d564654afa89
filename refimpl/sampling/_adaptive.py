"""Numba kernels of adaptive rejection sampling over the SG tree (ours; Eq. 3-5 with a per-query envelope refined
best first, in the manner of Gilks and Wild's adaptive rejection sampling), behind
:func:`refimpl.sampling.samplers.sample_adaptive`; one compiled call answers a batch of queries, with the outputs
and counters of :mod:`refimpl.sampling._kernels`.

A frontier is a partition of the live targets into clusters (v, L) = {p_v} + the subtrees of the children of v
with level < L. In the tree's pre-order (:func:`refimpl.index.search.preorder`, once per tree version) those
subtrees are one contiguous range, so the u-th member of a cluster is one array read. Each cluster carries a
certified bound E >= every member's logit (:func:`_bound`: the least of Prop. 1's s_v + beta ||q|| rho(v, L) with
the certified radius rho of :func:`refimpl.sampling._cluster_kernels.cluster_info`, beta ||q|| M and
beta (||q||^2 + M^2 - (||q - p_v|| - rho)^2) / 2, M a bound on the members' norms from :func:`norm_suffix`;
a singleton has E = s exactly). The envelope starts from a level C_(l) whose representatives the caller scores
for the whole batch by one GEMM (:func:`start_frontier`). The per-query pass over the start clusters is made of
branch-free loops that the compiler vectorises: the bounds (:func:`_start_bounds`), then the lumping, the
proposal's weights and the sums of Eq. 7 and of the certified interval in one loop (:func:`_start_masses`) by an
inline exponential (:func:`_exp`; libm's exp is one scalar call per element). Proposals are drawn by a two-level
search in the cumulative weights without branches, uniforms by an inline xoshiro256** generator.

Contents: :func:`norm_suffix`, :func:`child_table`, :func:`start_frontier`, :func:`rng_state`, :func:`uniform`,
:func:`below`, :func:`adaptive_batch`.
"""
from __future__ import annotations

import numpy as np
from numba import njit, types
from numba.extending import intrinsic

from refimpl.index import N_NODES, prefetch_row
from refimpl.sampling._cluster_kernels import (_cluster_geometry, _dot, _grow, _heap_pop, _heap_push,
                                               sibling_suffix_max)
from refimpl.sampling._kernels import (ACCEPTED, ATTEMPTS, EXCL_HITS, INNER, LEVEL, LUMPED, LZ_EST, LZ_EXCL,
                                       LZ_HI, LZ_LO, N_CLUSTERS, SELECT, STATUS, _exact_draw, _excluded, _marked,
                                       _outputs, _scratch)

BATCH = 32  # attempts generated, resolved and scored together (their memory reads overlap)
TAIL = 0.01  # bound on the share of the envelope's mass in the tail of lumped start clusters, relative to Z
REFINE_SHARE = 0.25  # the refinement stops after this share of the brute-force budget (see adaptive_batch)


@njit(cache=True, fastmath={"contract", "reassoc"})
def _dot2(points, i, q):
    """(<t_i, q>, ||t_i||^2) accumulated in float64, one pass over the row."""
    s = 0.0
    r = 0.0
    for d in range(q.shape[0]):
        x = np.float64(points[i, d])
        s += x * q[d]
        r += x * x
    return s, r


@njit(cache=True)
def _radius(maxd, suf, v, c):
    """Certified radius of cluster (v, L) whose first child below L is c: min(MAXD(v), suf[c]); 0 if c = -1."""
    if c == -1:
        return 0.0
    r = suf[c]
    return maxd[v] if r > maxd[v] else r


@njit(cache=True, inline="always")
def _bound(s, bq, qn2, beta, rho, rn2, M, tau, sl):
    """Certified bound on beta <q, t> over a cluster of representative r (logit s = beta <q, r>, ||r||^2 = rn2),
    radius rho and member norms <= M: the least of Prop. 1's s + beta ||q|| rho (Cauchy-Schwarz), beta ||q|| M, and
    beta (||q||^2 + M^2 - dl^2) / 2 with dl = max(0, ||q - r|| - rho) <= ||q - t|| (expand ||q - t||^2), plus the
    rounding margin ``tau`` (and 16 u beta (||q||^2 + ||r||^2 + M^2) for the last). ``sl`` = 0: s (the tests'
    negative control). Branch-free (min, max, a select), so that a loop over clusters vectorises; with dl = 0 the
    third bound is >= the second (AM-GM) and still valid."""
    dl = max(np.sqrt(max(qn2 + rn2 - 2.0 * s / beta, 0.0)) - rho, 0.0)
    b3 = 0.5 * beta * (qn2 + M * M - dl * dl) + 16.0 * 2.0 ** -53 * beta * (qn2 + rn2 + M * M)
    e = min(s + bq * rho, bq * M, b3) + tau
    return e if sl != 0.0 else s


@intrinsic
def _as_float64(typingctx, n):
    """The float64 whose bits are the int64 ``n`` (an LLVM bitcast; no memory round trip, so loops vectorise)."""
    def codegen(context, builder, signature, args):
        return builder.bitcast(args[0], context.get_value_type(types.float64))

    return types.float64(types.int64), codegen


_LN2_HI = 6.93147180369123816490e-01  # ln 2 split so that n ln2_hi is exact for |n| < 2^11 (Cody-Waite)
_LN2_LO = 1.90821492927058770002e-10
_INV_LN2 = 1.44269504088896338700e+00
EXP_REL = 1e-9  # a bound on |_exp(x) / e^x - 1| for -700 <= x <= 709 (tested); the certified sums allow for it


@njit(cache=True, fastmath={"contract"}, inline="always")
def _exp(x):
    """e^x for x <= 709 (0 for x < -700, including -inf; NaN stays NaN), relative error < EXP_REL, inline and
    branch-free so that a loop over an array vectorises (libm's exp is one scalar call per element).
    e^x = 2^n e^r with n = round(x / ln 2), r = (x - n ln2_hi) - n ln2_lo (|r| <= ln 2 / 2, Cody-Waite reduction),
    e^r by its degree-8 Taylor polynomial (remainder < e^(2|r|) |r|^9 / 9! < 4e-10 relative: the weights need no
    more, as the sampler's law does not depend on them and the certified sums allow for EXP_REL) in Horner form,
    and 2^n built from its exponent bits. Compiled without reassociation, which would undo the reduction."""
    xc = -700.0 if x < -700.0 else x
    n = np.floor(xc * _INV_LN2 + 0.5)
    r = (xc - n * _LN2_HI) - n * _LN2_LO
    p = 1.0 / 40320.0
    p = p * r + 1.0 / 5040.0
    p = p * r + 1.0 / 720.0
    p = p * r + 1.0 / 120.0
    p = p * r + 1.0 / 24.0
    p = p * r + 1.0 / 6.0
    p = p * r + 0.5
    p = p * r + 1.0
    p = p * r + 1.0
    return 0.0 if x < -700.0 else p * _as_float64((np.int64(n) + 1023) << 52)


@njit(cache=True, fastmath={"contract", "reassoc"})
def _sum(a, n):
    """sum(a[:n]) (reassociation allowed: the loop vectorises; rounding only)."""
    t = 0.0
    for j in range(n):
        t += a[j]
    return t


@njit(cache=True)
def _max(a, n):
    """max(a[:n]) (-inf for n = 0; no NaN in a), in four independent chains (one chain waits on every compare)."""
    m0 = -np.inf
    m1 = -np.inf
    m2 = -np.inf
    m3 = -np.inf
    j = 0
    while j + 4 <= n:
        m0 = max(m0, a[j])
        m1 = max(m1, a[j + 1])
        m2 = max(m2, a[j + 2])
        m3 = max(m3, a[j + 3])
        j += 4
    while j < n:
        m0 = max(m0, a[j])
        j += 1
    return max(max(m0, m1), max(m2, m3))


@njit(cache=True)
def norm_suffix(T, order):
    """Per node v: subn[v] = max ||t|| over v's subtree, and sufn[v] = max of subn over v and the siblings after it
    (query-independent, O(N) once per tree version; a cluster (v, L) whose first child below L is c has every
    member's norm <= max(||p_v||, sufn[c])). ``order`` is the tree's pre-order of targets."""
    subn = np.zeros(T.state[N_NODES], np.float64)
    for p in range(order.shape[0] - 1, -1, -1):  # reverse pre-order: every child before its parent
        i = order[p]
        v = T.point_node[i]
        m2 = 0.0
        for d in range(T.points.shape[1]):
            x = np.float64(T.points[i, d])
            m2 += x * x
        m = np.sqrt(m2) * (1.0 + 2.0 ** -50)  # rounded up
        c = T.node_first_child[v]
        while c != -1:
            m = max(m, subn[c])
            c = T.node_next_sibling[c]
        subn[v] = m
    return subn, sibling_suffix_max(T, subn)


@njit(cache=True)
def child_table(T, suf, pos, NS):
    """Every node's children as one run of slots, in list order (by descending level), with what a split reads of
    them, so that the refinement reads a split's children sequentially and only their rows at random (query-
    independent, O(N) once per tree version). ``NS`` = (subn, sufn) of :func:`norm_suffix`.

    Returns CT = (cptr, cnode, clev, cpt, ccount, cpos, cfirst, crad, csubn, sufn): the children of node v are the
    slots cptr[v] <= y < cptr[v + 1] (int64); per slot, for its child c (int32 or float64: 40 bytes per node, plus
    16 for cptr and sufn): cnode[y] = c, clev[y] its level, cpt[y] its representative's row, ccount[y] its
    subtree's size, cpos[y] its pre-order position (``pos``), cfirst[y] the slot of c's first child (-1: a leaf),
    crad[y] the certified radius of its whole subtree, min(MAXD(c), suf[first child]) (0 for a leaf), csubn[y] =
    subn[c]; and sufn (per node) as in ``NS``. The caller keeps the node count below 2^31."""
    subn, sufn = NS
    nn = T.state[N_NODES]
    nfirst = T.node_first_child
    nnext = T.node_next_sibling
    cptr = np.zeros(nn + 1, np.int64)
    for v in range(nn):
        m = 0
        c = nfirst[v]
        while c != -1:
            m += 1
            c = nnext[c]
        cptr[v + 1] = cptr[v] + m
    ns = cptr[nn]
    cnode = np.empty(ns, np.int32)
    clev = np.empty(ns, np.int32)
    cpt = np.empty(ns, np.int32)
    ccount = np.empty(ns, np.int32)
    cpos = np.empty(ns, np.int32)
    cfirst = np.empty(ns, np.int32)
    crad = np.empty(ns, np.float64)
    csubn = np.empty(ns, np.float64)
    for v in range(nn):
        y = cptr[v]
        c = nfirst[v]
        while c != -1:
            g = nfirst[c]
            cnode[y] = c
            clev[y] = T.node_level[c]
            cpt[y] = T.node_point[c]
            ccount[y] = T.node_count[c]
            cpos[y] = pos[c]
            cfirst[y] = cptr[c] if g != -1 else -1
            crad[y] = _radius(T.node_maxd, suf, c, g)
            csubn[y] = subn[c]
            y += 1
            c = nnext[c]
    return cptr, cnode, clev, cpt, ccount, cpos, cfirst, crad, csubn, sufn


@njit(cache=True, fastmath={"contract"})
def _start_bounds(s0, f0s, f0r, f0q, f0m, bq, qn2, beta, tau, sl, fE, fs):
    """The start clusters' bounds and logits for one query: fE[j] = E_j (:func:`_bound`; a singleton E_j = s_j)
    and fs[j] = s_j. One branch-free loop (it vectorises)."""
    for j in range(s0.shape[0]):
        sj = s0[j]
        fE[j] = _bound(sj, bq, qn2, beta, f0r[j], f0q[j], f0m[j], tau, sl) if f0s[j] > 1 else sj
        fs[j] = sj


UP = 1.0 + 2.0 * EXP_REL  # W_j = n_j _exp(E_j - Eref) UP >= n_j e^{E_j - Eref}: the proposal's weights
LOW = 1.0 - EXP_REL  # n_j _exp(x) LOW <= n_j e^x: the terms of the certified lower sum


@njit(cache=True, fastmath={"contract"})
def _start_masses(fn, fE, fs, fr, nc0, bq, tau, Eref, Etail, W, zt, lt, dt):
    """One branch-free loop over the start clusters (it vectorises): a cluster with E_j <= Etail is lumped into
    the tail (fE[j] = -inf, W = zt = lt = 0); the others get the proposal weight W[j] = n_j e^{E_j - Eref} UP, the
    Eq. 7 term zt[j] = n_j e^{s_j - Eref} (cost decisions only), the certified lower term lt[j] = n_j
    e^{s_j - beta ||q|| rho_j - tau - Eref} LOW (a singleton: e^{s_j - Eref} LOW) and dt[j] = W[j] - zt[j] (what
    splitting j could save, 0 for a singleton). Returns the lumped clusters' total size and number."""
    nt = 0
    nl = 0
    for j in range(nc0):
        n = fn[j]
        E = fE[j]
        keep = E > Etail
        w = n * _exp(E - Eref) * UP
        z = n * _exp(fs[j] - Eref)
        lo = n * _exp((fs[j] - bq * fr[j] - tau if n > 1 else fs[j]) - Eref) * LOW
        W[j] = w if keep else 0.0
        zt[j] = z if keep else 0.0
        lt[j] = lo if keep else 0.0
        dt[j] = w - z if keep and n > 1 else 0.0
        fE[j] = E if keep else -np.inf
        nt += 0 if keep else n
        nl += 0 if keep else 1
    return nt, nl


@njit(cache=True, inline="always")
def _cluster_mass(W, lt, fn, fE, fs, fr, j, bq, tau, Eref):
    """W[j] and lt[j] (as in :func:`_start_masses`) of a cluster made or changed by the refinement."""
    n = fn[j]
    W[j] = n * _exp(fE[j] - Eref) * UP
    lt[j] = n * _exp((fs[j] - bq * fr[j] - tau if n > 1 else fs[j]) - Eref) * LOW


FENCE = 32  # entries per block of the proposal's two-level search


@njit(cache=True)
def _cumulative(W, n, cw, fence):
    """cw[j] = W[0] + ... + W[j] for j < n, +inf from n to the end of its block of FENCE; fence[b] = cw[FENCE b +
    FENCE - 1], the last of block b (+inf for a partial last block); returns the number of blocks. Sequential: the
    sums never decrease."""
    t = 0.0
    for j in range(n):
        t += W[j]
        cw[j] = t
    nb = (n + FENCE - 1) // FENCE
    cw[n:nb * FENCE] = np.inf
    for b in range(nb):
        fence[b] = cw[b * FENCE + FENCE - 1]
    return nb


@njit(cache=True, inline="always")
def _propose(cw, fence, nb, u, jmax):
    """The first entry j with cw[j] > u (so never an entry of weight 0, whose cw equals its predecessor's): the
    block as the number of fences <= u, then the entries <= u in that block; two loops without branches that the
    compiler vectorises (a binary search's unpredictable branches cost more). Capped at the last block and at
    ``jmax``, the last entry of positive weight (u rounded up to the total)."""
    b = 0
    for x in range(nb):
        b += np.int64(fence[x] <= u)
    j0 = min(b, nb - 1) * FENCE
    c = 0
    for x in range(FENCE):
        c += np.int64(cw[j0 + x] <= u)
    return min(j0 + c, jmax)


# ----------------------------------------------------------------------------------------------------------------
# the draws' generator: xoshiro256** (Blackman and Vigna, 2018), its state seeded by splitmix64; inline, so that
# one uniform costs a few integer operations (Numba's np.random calls cost several times more)

_M32 = np.uint64(0xFFFFFFFF)
_TWO32 = np.uint64(1 << 32)


@njit(cache=True)
def rng_state(seed):
    """The generator's state (4,) uint64 from an int64 seed (splitmix64 of seed, seed + 1, ...; never all zero)."""
    st = np.empty(4, np.uint64)
    z = np.uint64(seed)
    for i in range(4):
        z = z + np.uint64(0x9E3779B97F4A7C15)
        x = z
        x = (x ^ (x >> np.uint64(30))) * np.uint64(0xBF58476D1CE4E5B9)
        x = (x ^ (x >> np.uint64(27))) * np.uint64(0x94D049BB133111EB)
        st[i] = x ^ (x >> np.uint64(31))
    return st


@njit(cache=True, inline="always")
def _next(st):
    """The next 64 random bits (xoshiro256**: output rotl(5 s1, 7) 9, then the xor-shift-rotate state update)."""
    s0 = st[0]
    s1 = st[1]
    s2 = st[2] ^ s0
    s3 = st[3] ^ s1
    x = s1 * np.uint64(5)
    out = ((x << np.uint64(7)) | (x >> np.uint64(57))) * np.uint64(9)
    st[0] = s0 ^ s3
    st[1] = s1 ^ s2
    st[2] = s2 ^ (s1 << np.uint64(17))
    st[3] = (s3 << np.uint64(45)) | (s3 >> np.uint64(19))
    return out


@njit(cache=True, inline="always")
def uniform(st):
    """A uniform float64 in [0, 1): the top 53 of 64 random bits, times 2^-53."""
    return np.float64(_next(st) >> np.uint64(11)) * (1.0 / 9007199254740992.0)


@njit(cache=True, inline="always")
def below(st, n):
    """A uniform integer in [0, n) (n >= 1), exactly: for n < 2^32, Lemire's multiply-shift of 32 random bits with
    the rejection of the 2^32 mod n low products that would bias it; otherwise 64 random bits below the largest
    multiple of n, modulo n."""
    nn = np.uint64(n)
    if n < 4294967296:
        m = (_next(st) >> np.uint64(32)) * nn
        if (m & _M32) < nn:
            t = (_TWO32 - nn) % nn
            while (m & _M32) < t:
                m = (_next(st) >> np.uint64(32)) * nn
        return np.int64(m >> np.uint64(32))
    t = (np.uint64(0) - nn) % nn  # 2^64 mod n
    x = _next(st)
    while x < t:
        x = _next(st)
    return np.int64(x % nn)


@njit(cache=True)
def start_frontier(T, suf, CT, pos, n_pos, nodes, L):
    """The clusters (nodes[j], L) as the adaptive sampler's start frontier: (nodes, the slot in ``CT``
    (:func:`child_table`) of the first child below L (-1: none), pre-order start of the members after p_v, sizes,
    certified radii, bounds on the members' norms (``sufn``), ||p_v||^2, owner, L), owner (n_pos,) int32 the start
    cluster of each pre-order position (the clusters partition the live targets), and the representatives' rows
    (C, D) float64 (one GEMM scores them for a whole batch)."""
    cptr = CT[0]
    sufn = CT[9]
    nc = nodes.shape[0]
    fc = np.empty(nc, np.int64)
    fa = np.empty(nc, np.int64)
    fn = np.empty(nc, np.int64)
    fr = np.empty(nc, np.float64)
    fm = np.empty(nc, np.float64)
    fq = np.empty(nc, np.float64)
    owner = np.full(n_pos, -1, np.int32)
    R = np.empty((nc, T.points.shape[1]), np.float64)
    for j in range(nc):
        v = nodes[j]
        size, x, r, m = _cluster_geometry(T, suf, v, L)
        fc[j] = cptr[v] + m if x != -1 else -1
        fa[j] = pos[x] if x != -1 else pos[v] + 1
        fn[j] = size
        fr[j] = r
        owner[pos[v]] = j
        owner[fa[j]:fa[j] + size - 1] = j
        r2 = 0.0
        for d in range(R.shape[1]):
            R[j, d] = T.points[T.node_point[v], d]
            r2 += R[j, d] * R[j, d]
        fq[j] = r2
        rn = np.sqrt(r2) * (1.0 + 2.0 ** -50)
        fm[j] = max(rn, sufn[x]) if x != -1 else rn
    return (nodes, fc, fa, fn, fr, fm, fq, owner, np.int64(L)), R


@njit(cache=True)
def adaptive_batch(T, suf, order, pos, Q, beta, k, eptr, eids, replace, max_attempts, attempt_cost, seed, F0, S0,
                   margin, CT, broken=False, defer=False, brute_share=1.0):
    """Adaptive rejection sampling for every query of ``Q``: refine an envelope best first, then Eq. 3-5.

    Start (per query): the clusters of ``F0`` (:func:`start_frontier`; the root alone is a valid F0), their
    representatives' logits ``S0[b]`` = beta <q_b, r_j> (the caller's GEMM; float64) and bounds E_j (:func:`_bound`,
    plus the rounding margin beta ||q|| ``margin`` of two float64 dot products, for clusters of more than one
    target). Z >= e^{smax}, smax the largest representative logit, so the start clusters with E_j <= Etail =
    max(smax - log(N / TAIL), Eref - 690) (Eref the largest bound) are lumped into one tail entry of bound Etail
    and mass <= TAIL Z + N e^-690 Z (never refined); they keep their frontier slots with E = -inf and weight 0, so
    are never queued nor proposed. A tail proposal is a uniform pre-order position, redrawn until its start cluster
    (``owner``) is lumped: a uniform member of the tail, at an expected N / |tail| redraws per tail proposal, so
    at most N e^{Etail} / sum U <= TAIL + N e^-690 redraws per attempt. ``CT``: :func:`child_table`.

    Refinement (per query, shared by its k draws): repeatedly take the cluster j of largest envelope mass
    U_j = n_j e^{E_j} and split it into the children of v at the next occupied level Lc (each a whole subtree,
    bound min(E_j, its own)) and the rest (v, Lc) (bound min(E_j, its own)); stop when the attempts a split could
    save, k x attempt_cost x (U_j - n_j e^{s_v}) / Z_hat (Z_hat = sum_j n_j e^{s_v(j)}, Eq. 7, over the refined
    clusters), no longer exceed its m inner products, or after REFINE_SHARE x G inner products (no cluster is
    queued when none could repay one inner product). G = ``brute_share`` x N is brute force's cost in inner
    products or attempts: 1 when each query reads every row alone, less when the caller serves the queries that
    switch together by GEMMs. If the refinement's inner products plus the k Z_hi / Z_hat expected attempts reach G
    (no useful structure around this query), every draw of the query is made by brute force instead. The rule and
    this switch, decided before any attempt from the envelope alone, only set the cost. Brute force: with
    ``defer``, left to the caller (STATUS = 2, the draws made so far kept), which serves all such queries of the
    batch together; else ``_exact_draw`` (N inner products once, then an inverse CDF per draw).

    Sampling (Eq. 3-5): propose entry j (a cluster or the tail) with probability W_j / sum W, W_j = n_j _exp(E_j -
    Eref) (1 + 2 EXP_REL) >= n_j e^{E_j - Eref} (:func:`_exp`, relative error <= EXP_REL), a member i uniformly
    (pre-order range), accept if u W_j < n_j e^{s_i - Eref}, u uniform: probability n_j e^{s_i - Eref} / W_j <= 1.
    So every attempt returns i with probability e^{s_i - Eref} / sum W whatever the weights' rounding, and accepted
    draws are exact (up to the rounding of e^{s_i - Eref} itself); excluded ids (and, without replacement, earlier
    draws) are rejected, which conditions the draw exactly on the others. Entries are drawn by a two-level search in
    the cumulative weights (:func:`_cumulative`, :func:`_propose`), members by :func:`below`, uniforms by
    :func:`uniform` (xoshiro256**, seeded by ``seed``; Numba's generator, seeded alike, serves ``_exact_draw``).
    Attempts run in rounds of up to BATCH: their proposals are generated, then their targets' ids read, then their
    logits computed (loops of independent memory reads, which the processor overlaps), then they are decided in
    order: the proposals are iid and independent of the decisions, so this is Eq. 3-5 exactly (logits computed for
    proposals left undecided when the query has its k draws are counted in INNER). Once the query's refinement inner
    products and attempts reach G, its remaining draws (the current one included) are made by brute force: still
    exact, as the switch is a stopping time of the iid attempts (a draw not yet accepted is, conditionally, a draw
    from P). LZ_LO (log of the sum of the lower terms n_j e^{s_j - beta ||q|| rho_j - tau} over the clusters not
    lumped, each computed low, the sum shrunk for its rounding) and LZ_HI (log sum W, grown for its rounding) are
    certified; LZ_EST = LZ_HI + log(successes / attempts) clipped to them (Eq. 7's Z_hat when k = 0; the exact log Z
    when ``_exact_draw`` ran; the caller's after a deferral). Counters: INNER counts the GEMM's |F0| inner products
    too; LUMPED the start clusters in the tail. No O(N) work per call unless some id can be marked (exclusions, or
    draws without replacement: ``_scratch``). ``broken`` (a negative control of the tests): bounds E = s_v (no
    radius term; not certified).
    """
    sl = 0.0 if broken else 1.0  # the radius term's weight in the bounds
    np.random.seed(seed)
    st = rng_state(seed)
    B = Q.shape[0]
    ids, sids, cnt, lz = _outputs(B, k)
    # the node arrays as locals: a NamedTuple passed to a helper or read in a hot loop costs reference counting
    points = T.points
    npt = T.node_point
    ncount = T.node_count
    nmaxd = T.node_maxd
    f0v, f0c, f0a, f0s, f0r, f0m, f0q, owner, level0 = F0
    cptr, cnode, clev, cpt, ccount, cpos, cfirst, crad, csubn, sufn = CT
    nc0 = f0v.shape[0]
    mask, n_live, live, ls = _scratch(T, eids, replace)
    budget = brute_share * n_live  # G: brute force's cost, in inner products
    cap = max(1024, 2 * nc0)
    fv = np.empty(cap, np.int64)  # node
    fa = np.empty(cap, np.int64)  # pre-order start of the members after p_v
    fc = np.empty(cap, np.int64)  # first child below L (-1: none)
    fn = np.empty(cap, np.int64)  # size
    fE = np.empty(cap, np.float64)  # bound exponent
    fs = np.empty(cap, np.float64)  # representative logit
    fr = np.empty(cap, np.float64)  # certified radius
    fq = np.empty(cap, np.float64)  # ||p_v||^2
    hk = np.empty(cap, np.float64)
    hi = np.empty(cap, np.int64)
    W = np.empty(cap, np.float64)  # the proposal's weights
    zt = np.empty(cap, np.float64)  # Eq. 7 terms of the start clusters
    lt = np.empty(cap, np.float64)  # certified lower terms
    dt = np.empty(cap, np.float64)  # W - zt of the start clusters
    cw = np.empty(cap + FENCE, np.float64)  # cumulative weights, then the fences of their blocks
    fence = np.empty(cap // FENCE + 2, np.float64)
    sp = np.empty(cap, np.int64)  # the start clusters split by the query's refinement (restored after it)
    # entries j < nc0 are the start clusters (between queries: as in F0; per query fE, fs rewritten and the split
    # ones restored afterwards), refined clusters follow
    fv[:nc0] = f0v
    fc[:nc0] = f0c
    fa[:nc0] = f0a
    fn[:nc0] = f0s
    fr[:nc0] = f0r
    fq[:nc0] = f0q
    rj = np.empty(BATCH, np.int64)  # a round of proposals: entry, pre-order position (or -1 - id), target, logit
    rp = np.empty(BATCH, np.int64)
    ri = np.empty(BATCH, np.int64)
    rs = np.empty(BATCH, np.float64)
    for b in range(B):
        q = Q[b]
        c = cnt[b]
        live[0] = -2  # this query's logits not computed
        lze = _excluded(T, q, beta, eids, eptr[b], eptr[b + 1], c)
        lz[b, LZ_EXCL] = lze
        qn2 = 0.0
        for d in range(q.shape[0]):
            qn2 += q[d] * q[d]
        bq = beta * np.sqrt(qn2)
        tau = margin * bq  # rounding of two float64 dot products, |fl(<q, t>) - <q, t>| <= tau / 2
        # ---- the envelope: the start frontier (its logits from the caller's GEMM), the tail, then best-first
        # refinement
        s0 = S0[b]
        _start_bounds(s0, f0s, f0r, f0q, f0m, bq, qn2, beta, tau, sl, fE, fs)
        Eref = _max(fE, nc0)
        Etail = max(_max(s0, nc0) - np.log(n_live / TAIL), Eref - 690.0)
        nt, nlump = _start_masses(fn, fE, fs, fr, nc0, bq, tau, Eref, Etail, W, zt, lt, dt)
        zhat = _sum(zt, nc0)
        c[INNER] += nc0
        c[SELECT] += nc0
        hsize = 0
        # clusters whose saving cannot repay one inner product are never split: not queued (none, often)
        thr = zhat / (k * attempt_cost) if k > 0 else np.inf
        if _max(dt, nc0) > thr:
            for j in range(nc0):
                if dt[j] > thr:
                    hsize = _heap_push(hk, hi, hsize, W[j], j)  # heap key: the weight n_j e^{E_j - Eref} UP
        nf = nc0
        spent = 0
        nsp = 0
        while hsize > 0:
            j = hi[0]
            gain = k * attempt_cost * (hk[0] - fn[j] * _exp(fs[j] - Eref)) / max(zhat, 1e-300)
            v = fv[j]
            x = fc[j]  # the slot of the first child below the cluster's level (fn[j] > 1: one exists)
            e = cptr[v + 1]
            Lc = clev[x]
            room = REFINE_SHARE * budget - spent
            m = 0  # the children at Lc, counted while the split stays worth its m inner products and within room
            while x + m < e and clev[x + m] == Lc:
                if m + 1 >= gain or m + 1 > room:  # so the split is not made (a fan-out can be ~N / |C_(l)|)
                    m = -1
                    break
                m += 1
            if m < 0:
                break
            for y in range(x, x + m):
                prefetch_row(points, cpt[y])
            _heap_pop(hk, hi, hsize)
            hsize -= 1
            spent += m
            if j < nc0:
                sp[nsp] = j
                nsp += 1
            E = fE[j]
            zhat -= fn[j] * _exp(fs[j] - Eref)
            if nf + m >= fv.shape[0]:  # one slot kept for the tail
                cap = 2 * (nf + m)
                fv = _grow(fv, nf, cap)
                fa = _grow(fa, nf, cap)
                fc = _grow(fc, nf, cap)
                fn = _grow(fn, nf, cap)
                fE = _grow(fE, nf, cap)
                fs = _grow(fs, nf, cap)
                fr = _grow(fr, nf, cap)
                fq = _grow(fq, nf, cap)
                W = _grow(W, nc0, cap)
                lt = _grow(lt, nc0, cap)
                cw = np.empty(cap + FENCE, np.float64)
                fence = np.empty(cap // FENCE + 2, np.float64)
                sp = _grow(sp, nsp, cap)  # a split adds at least one cluster: nsp < nf
                hk = _grow(hk, hsize, cap)  # the heap holds at most one entry per frontier cluster
                hi = _grow(hi, hsize, cap)
            for y in range(x, x + m):  # each child's whole subtree: one cluster
                sx, rx2 = _dot2(points, cpt[y], q)
                sx *= beta
                fv[nf] = cnode[y]
                fc[nf] = cfirst[y]
                fa[nf] = cpos[y] + 1
                fn[nf] = ccount[y]
                fs[nf] = sx
                fr[nf] = crad[y]
                fq[nf] = rx2
                fE[nf] = min(E, _bound(sx, bq, qn2, beta, crad[y], rx2, csubn[y], tau, sl)) if fn[nf] > 1 \
                    else min(E, sx)
                zhat += fn[nf] * _exp(sx - Eref)
                if fn[nf] > 1:
                    hsize = _heap_push(hk, hi, hsize, fn[nf] * _exp(fE[nf] - Eref), nf)
                nf += 1
            # the rest (v, Lc): p_v and the children below Lc
            x += m
            if x < e:
                cx = cnode[x]
                fc[j] = x
                fa[j] = cpos[x]
                fn[j] = 1 + pos[v] + ncount[v] - cpos[x]
                fr[j] = _radius(nmaxd, suf, v, cx)
                rn = np.sqrt(fq[j]) * (1.0 + 2.0 ** -50)
                fE[j] = min(E, _bound(fs[j], bq, qn2, beta, fr[j], fq[j], max(rn, sufn[cx]), tau, sl))
            else:
                fc[j] = -1
                fa[j] = pos[v] + 1
                fn[j] = 1
                fr[j] = 0.0
                fE[j] = min(E, fs[j])
            zhat += fn[j] * _exp(fs[j] - Eref)
            if fn[j] > 1:
                hsize = _heap_push(hk, hi, hsize, fn[j] * _exp(fE[j] - Eref), j)
        c[INNER] += spent
        c[SELECT] += spent
        c[N_CLUSTERS] = nf  # the lumped start clusters included
        c[LUMPED] = nlump
        c[LEVEL] = level0
        # ---- the weights of the clusters the refinement made or changed, the tail, the certified interval
        for x in range(nsp):
            _cluster_mass(W, lt, fn, fE, fs, fr, sp[x], bq, tau, Eref)
        for j in range(nc0, nf):
            _cluster_mass(W, lt, fn, fE, fs, fr, j, bq, tau, Eref)
        jt = -1  # the tail as one more proposal entry (bound Etail, never accepted without an inner product)
        if nt > 0:
            jt = nf
            fn[jt] = nt
            fE[jt] = Etail
            fs[jt] = Etail
            W[jt] = nt * _exp(Etail - Eref) * UP
        nprop = nf + 1 if nt > 0 else nf
        nblk = _cumulative(W, nprop, cw, fence)
        jmax = nprop - 1
        while W[jmax] == 0.0:
            jmax -= 1
        sum_w = _sum(W, nprop)
        hi_ = Eref + np.log(sum_w * (1.0 + nprop * 2.0 ** -52))
        lsum = _sum(lt, nf) * (1.0 - nf * 2.0 ** -52)
        if lsum > 0.0:
            lo = Eref + np.log(lsum)
        else:  # every term underflowed: the largest one alone
            lo = -np.inf
            for j in range(nf):
                if fE[j] > -np.inf:
                    lo = max(lo, np.log(fn[j]) + (fs[j] - bq * fr[j] - tau if fn[j] > 1 else fs[j]))
        wtot = cw[nprop - 1]
        # against brute force (G, once): the expected attempts, k Z_hi / Z_hat
        brute = spent + k * attempt_cost * sum_w / max(zhat, 1e-300) >= budget
        lz[b, LZ_LO] = lo
        lz[b, LZ_HI] = hi_
        nb = eptr[b + 1] - eptr[b]
        buf = np.empty(nb + k, np.int64)
        buf[:nb] = eids[eptr[b]:eptr[b + 1]]
        mask[buf[:nb]] = True
        # ---- the draws, in rounds of m <= BATCH attempts (m the expected number still needed): generate m
        # proposals, then read their targets' ids, then compute their logits (loops of independent loads, so that
        # the memory system serves many at once), then decide them in order until the query has its k draws. The
        # proposals are iid and independent of the decisions, so deciding them in order is Eq. 3-5 exactly; the
        # logits computed for proposals left undecided at the end are counted as inner products. The rounds stop
        # when the query's work reaches G, and brute force makes the remaining draws.
        t = 0
        attempts = 0
        while t < k and not brute:
            m = min(BATCH, max(1, int(np.ceil((k - t) * sum_w / max(zhat, 1e-300)))))
            for x in range(m):
                j = _propose(cw, fence, nblk, uniform(st) * wtot, jmax)
                rj[x] = j
                if j == jt:  # a tail member: uniform pre-order positions until one falls in a lumped start cluster
                    p = below(st, n_live)
                    while fE[owner[p]] != -np.inf:
                        p = below(st, n_live)
                    rp[x] = p
                else:
                    u = below(st, fn[j]) if fn[j] > 1 else 0
                    rp[x] = -1 - npt[fv[j]] if u == 0 else fa[j] + u - 1
            for x in range(m):
                p = rp[x]
                ri[x] = -1 - p if p < 0 else order[p]
            for x in range(m):
                j = rj[x]
                if fn[j] == 1 and j != jt:
                    rs[x] = fs[j]
                else:
                    rs[x] = beta * _dot(points, ri[x], q)
                    c[INNER] += 1
            for x in range(m):
                if attempts >= max_attempts:
                    c[STATUS] = 1
                    return ids, sids, cnt, lz
                if spent + c[ATTEMPTS] >= budget:
                    brute = True
                    break
                attempts += 1
                c[ATTEMPTS] += 1
                j = rj[x]
                i = ri[x]
                s = rs[x]
                if uniform(st) * W[j] < fn[j] * np.exp(s - Eref):
                    if _marked(mask, i):
                        c[EXCL_HITS] += 1
                    else:
                        ids[b, t] = i
                        sids[b, t] = s
                        c[ACCEPTED] += 1
                        if replace == 0:
                            buf[nb] = i
                            mask[i] = True
                            nb += 1
                        t += 1
                        attempts = 0
                        if t == k:
                            break
        if defer and t < k:  # the rest by the caller's batched brute force (exact: the switch is a stopping time)
            c[STATUS] = 2
            t = k
        while t < k:  # brute force for the rest (exact: the switch is a stopping time of the iid attempts)
            ids[b, t], sids[b, t] = _exact_draw(T, q, beta, mask, live, ls, c)
            if replace == 0:
                buf[nb] = ids[b, t]
                mask[ids[b, t]] = True
                ls[1, ls.shape[1] - 1] = np.nan
                nb += 1
            t += 1
        mask[buf[:nb]] = False
        for x in range(nsp):  # the split start clusters back to F0 for the next query (fE, fs are rewritten)
            j = sp[x]
            fc[j] = f0c[j]
            fn[j] = f0s[j]
            fa[j] = f0a[j]
            fr[j] = f0r[j]
        if live[0] != -2:  # the brute-force path computed every logit: the exact log Z
            m = -np.inf
            for x in range(n_live):
                m = max(m, ls[0, x])
            tot = 0.0
            for x in range(n_live):
                tot += np.exp(ls[0, x] - m)
            est = m + np.log(tot)
        elif c[ATTEMPTS] > 0:
            est = Eref + np.log(sum_w) + np.log(max(c[ACCEPTED] + c[EXCL_HITS], 1) / c[ATTEMPTS])
        else:
            est = Eref + np.log(max(zhat, 1e-300))
        lz[b, LZ_EST] = min(max(est, lo), hi_)
    return ids, sids, cnt, lz

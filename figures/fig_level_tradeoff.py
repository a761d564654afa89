"""Error and cost against the start level of the tree (the U-shaped trade-off of Prop. 3).

Alg. 1 (``refimpl.sampling.samplers.sample_rejection``) started at level L pays |C_(L)| inner products for the start
clustering (more clusters at lower levels) plus, per draw, Z_hi(L)/Z attempts (each attempt is accepted with
probability Z / Z_hi(L), Z_hi(L) = sum_C |C| exp(s_r + beta ||q|| rho(C)), which explodes like e^{beta b^L} at high
levels). The sum is U-shaped in L (Prop. 3: O(|C_L| + alpha^3 e^{beta b^{L+2}})). Right panel: the error of the
cluster proposal Q (Eq. 7) of the same clustering, measured by brute force and certified.
"""
from __future__ import annotations

import math
import numpy as np

from figures import _common as C

CAPTION = ("Alg. 1 rejection sampler started at tree level L: work = |C_L| (falls with L) + attempts (grow like "
           "e^{beta b^L}; measured = predicted k Z_hi/Z) is U-shaped, and so is the time per query (minimum near the "
           "library's default level; dash-dot: brute force, still faster at this small N, D); right: Q's error.")


def compute(rng, quick):
    from refimpl.sampling import bounds
    from refimpl.sampling.samplers import default_level, sample_exact, sample_rejection
    from refimpl.index.sgtree import SGTree

    n, nq, dim, k, beta = (3000, 3, 16, 16, 20.0) if quick else (30000, 8, 16, 64, 20.0)
    T, Q = C.planted(n, nq, dim, rng)
    tree = SGTree.build(T, rng=rng)
    lo, hi = tree.level_range()
    sample_rejection(tree, Q[0], 2, beta=beta, rng=0)  # compile outside the timings
    reps = 1 if quick else 3
    t_exact = float(np.median([C.min_time(lambda: sample_exact(T, q, k, beta=beta, rng=rng), reps)[0] for q in Q]))
    res = []
    for L in range(lo, hi + 2):
        cl = tree.clustering(L)
        per_q = []
        for q in Q:
            s = beta * (T @ q)
            lz = float(np.max(s)) + math.log(float(np.sum(np.exp(s - np.max(s)))))
            eps = bounds.cluster_eps(beta, float(np.linalg.norm(q)), cl.radii)
            rep = s[cl.reps]
            _, lz_hi = bounds.log_partition_bounds(rep, cl.sizes.astype(float), eps)
            pred = math.exp(lz_hi - lz)
            cert = bounds.certified_log_max_ratio(rep, cl.sizes.astype(float), eps)
            tv, kl, lr = C.divergences(C.log_softmax(s), C.cluster_log_q(tree, cl, q, beta))
            row = dict(pred=pred, cert=cert, tv=tv, lr=lr, kl=kl)
            if pred * k <= (2e4 if quick else 1.5e6):
                t, r = C.min_time(lambda: sample_rejection(tree, q, k, beta=beta, rng=rng, level=L),
                                  reps if pred < 100 else 1)
                row.update(t=t, ip=r.stats["inner_products"], att=r.stats["attempts"] / k)
            per_q.append(row)
        agg = {key: float(np.mean([r[key] for r in per_q])) for key in ("pred", "cert", "tv", "lr", "kl")}
        if all("ip" in r for r in per_q):
            agg.update({key: float(np.mean([r[key] for r in per_q])) for key in ("ip", "att")})
            agg["t"] = float(np.median([r["t"] for r in per_q]))
        res.append((L, len(cl), agg))
    return res, dict(n=n, nq=nq, dim=dim, k=k, beta=beta, default=default_level(tree, beta), base=tree.base, t_exact=t_exact)


def make(out_dir, rng, quick):
    import matplotlib.pyplot as plt

    C.style()
    res, p = compute(rng, quick)
    L = np.array([r[0] for r in res])
    ncl = np.array([r[1] for r in res], float)
    samp = [i for i, r in enumerate(res) if "ip" in r[2]]
    Ls = L[samp]
    ip = np.array([res[i][2]["ip"] for i in samp])
    att = np.array([res[i][2]["att"] for i in samp])
    pred = np.array([r[2]["pred"] for r in res])
    tms = np.array([res[i][2]["t"] for i in samp]) * 1e3
    work = np.array([ncl[i] for i in samp]) + att * p["k"]
    fig, (a1, a3, a2) = plt.subplots(1, 3, figsize=(13, 4.2), gridspec_kw=dict(width_ratios=[1.25, 0.9, 1]))
    a1.semilogy(Ls, work, "o-", color=C.COLORS[0], lw=2.2, label="|C_L| + attempts (Prop. 3 cost)")
    a1.semilogy(L, ncl, "s--", color=C.COLORS[2], ms=4, label="|C_L|: start clustering")
    a1.semilogy(Ls, att * p["k"], "^-", color=C.COLORS[1], ms=4, label=f"attempts for k={p['k']} draws")
    a1.semilogy(L, pred * p["k"], "k:", label="k Z_hi(L)/Z (predicted attempts)")
    a1.semilogy(Ls, ip, "d-", color=C.COLORS[3], ms=3, lw=1, label="inner products (distinct, cached)")
    a1.axhline(p["n"], color="0.5", lw=1, ls="-.", label=f"N = {p['n']} (sample_exact)")
    a1.axvline(p["default"], color=C.COLORS[4], lw=1, ls="--", label=f"library default level ({p['default']})")
    a1.set_ylim(1, max(work.max(), p["n"]) * 3)
    a1.set_xlim(L.min() - 0.5, Ls.max() + 1.5)
    a1.set_xlabel(f"start level L (cluster radius ~ b^L, b = {p['base']:g})")
    a1.set_ylabel("count per query")
    a1.set_title(f"Alg. 1 work per query: minimum at L={Ls[int(np.argmin(work))]}")
    fig.legend(*a1.get_legend_handles_labels(), loc="lower left", ncol=4, fontsize=7.5, frameon=False,
               bbox_to_anchor=(0.02, -0.1))
    a3.semilogy(Ls, tms, "o-", color=C.COLORS[0], label="sample_rejection (Alg. 1)")
    a3.axhline(p["t_exact"] * 1e3, color="0.5", ls="-.", label="sample_exact (brute force)")
    a3.axvline(p["default"], color=C.COLORS[4], lw=1, ls="--")
    a3.set_xlabel("start level L")
    a3.set_ylabel(f"ms per query (k={p['k']} draws; min of repeats)")
    a3.set_title(f"Time: minimum at L={Ls[int(np.argmin(tms))]}")
    a3.legend(fontsize=7.5)
    a2.semilogy(L, [r[2]["cert"] for r in res], "o--", mfc="none", color=C.COLORS[1], label="certified log gamma")
    a2.semilogy(L, [r[2]["lr"] for r in res], "o-", color=C.COLORS[1], label="measured max log P/Q")
    a2.semilogy(L, [r[2]["tv"] for r in res], "s-", color=C.COLORS[0], label="measured TV(P, Q)")
    a2.semilogy(L, [r[2]["kl"] for r in res], "^-", color=C.COLORS[2], label="measured KL(P || Q)")
    a2.axvline(p["default"], color=C.COLORS[4], lw=1, ls="--")
    a2.set_ylim(1e-5, None)
    a2.set_xlabel("level L of the clustering C_L")
    a2.set_ylabel("error of Q (Eq. 7)")
    a2.set_title("Cluster proposal error vs level (lower = finer, costlier)")
    a2.legend(fontsize=7.5, loc="lower right")
    fig.suptitle(f"Level trade-off, N={p['n']} planted targets, D={p['dim']}, beta={p['beta']:g}, mean over "
                 f"{p['nq']} queries", fontsize=10)
    fig.tight_layout()
    return C.save(fig, out_dir, "level_tradeoff")

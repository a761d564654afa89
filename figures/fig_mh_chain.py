"""Independent Metropolis-Hastings (Eq. 14) with the cluster proposal Q (Eq. 7): TV to the softmax against the
chain length s, with the Eq. 6 bound exp(-(s - 1)/gamma).

For clusterings C_(L) of an SG tree at a few levels (coarser = larger gamma), the exact law of the state after s
steps of a chain started from Q is computed by iterating the MH transition kernel over all N targets (independent
MH needs only the weights w = P/Q: sorting by w makes one step O(N)); its TV to P is plotted against the Eq. 6 bound
with gamma = the certified max P/Q (``refimpl.sampling.bounds``) and with the true max P/Q. Markers: the empirical TV of
``refimpl.sampling.samplers.sample_mh`` draws at the same chain lengths, and the noise floor of an exact sampler with the same
number of draws (``sample_exact``).
"""
from __future__ import annotations

import math

import numpy as np

from figures import _common as C

CAPTION = ("Independent MH with the cluster proposal: exact TV(P, law after s states) (solid) decays much faster "
           "than the Eq. 6 bound exp(-(s-1)/gamma), which holds with the true gamma (dotted) and the certified gamma "
           "(dashed); sample_mh draws (markers) follow the exact curve down to the sampling-noise floor.")


def mh_law_step(p, log_w, log_q):
    """One step of independent MH (proposal Q, target P, w = P/Q) applied to the law ``p`` (all arrays over N)."""
    o = np.argsort(log_w, kind="stable")
    w = np.exp(log_w[o] - log_w.max())  # a common scale cancels in every ratio
    ps, qs = p[o], np.exp(log_q[o])
    # into y: Q(y) [sum_{w(x) <= w(y)} p(x) + w(y) sum_{w(x) > w(y)} p(x)/w(x)]
    cum_p = np.cumsum(ps)
    tail_pw = np.concatenate([np.cumsum((ps / w)[::-1])[::-1][1:], [0.0]])
    inflow = qs * (cum_p + w * tail_pw)
    # acceptance from y: sum_{w(z) >= w(y)} Q(z) + sum_{w(z) < w(y)} Q(z) w(z) / w(y)
    tail_q = np.cumsum(qs[::-1])[::-1]
    below_qw = np.concatenate([[0.0], np.cumsum(qs * w)[:-1]])
    acc = tail_q + below_qw / w
    new = inflow + ps * (1.0 - acc)
    out = np.empty_like(p)
    out[o] = new
    return out


def empirical_tv(ids, p):
    h = np.bincount(ids, minlength=p.size) / ids.size
    return 0.5 * float(np.abs(h - p).sum())


def compute(rng, quick):
    from refimpl.sampling import bounds
    from refimpl.sampling.clustering import level_clustering
    from refimpl.sampling.samplers import sample_exact, sample_mh
    from refimpl.index.sgtree import SGTree

    n, dim, beta = (600, 16, 20.0) if quick else (3000, 16, 20.0)
    n_draws = 3000 if quick else 40000
    T, Qs = C.planted(n, 1, dim, rng)
    q = Qs[0]
    tree = SGTree.build(T, rng=rng)
    lp = C.log_softmax(beta * (T @ q))
    P = np.exp(lp)
    lo, hi = tree.level_range()
    cand = []
    for L in range(lo, hi + 1):
        cl = tree.clustering(L)
        eps = bounds.cluster_eps(beta, float(np.linalg.norm(q)), cl.radii)
        cert = bounds.certified_log_max_ratio(beta * (T[cl.reps] @ q), cl.sizes.astype(float), eps)
        lg = C.divergences(lp, C.cluster_log_q(tree, cl, q, beta))[2]
        cand.append((L, cert, lg))
    # three clusterings whose true max P/Q is ~4, ~10, ~200 (coarser = larger gamma)
    levels = sorted({min(cand, key=lambda c: abs(c[2] - math.log(t)))[0] for t in (4, 10, 200)})
    cand = {c[0]: c[1] for c in cand}
    curves = []
    for L in levels:
        cl = tree.clustering(L)
        lq = C.cluster_log_q(tree, cl, q, beta)
        cert = cand[L]
        true_lg = float(np.max(lp - lq))
        smax = int(min(1 + math.exp(cert) * math.log(1e3), 1000))
        p, tvs = np.exp(lq), []
        for s in range(1, smax + 1):
            tvs.append(0.5 * float(np.abs(p - P).sum()))
            p = mh_law_step(p, lp - lq, lq)
        emp = []
        tcl = level_clustering(tree, L)
        for s in (1, 2, 4, 8, 16, 32, 64, 128):
            if s > smax:
                break
            r = sample_mh(tree, q, n_draws, beta=beta, rng=rng, clustering=tcl, chain_length=s)
            emp.append((s, empirical_tv(r.ids, P)))
        curves.append(dict(L=L, n_clusters=len(cl), cert=cert, true_lg=true_lg, tv=np.array(tvs), emp=emp))
    floor = empirical_tv(sample_exact(T, q, n_draws, beta=beta, rng=rng).ids, P)
    return curves, dict(n=n, dim=dim, beta=beta, n_draws=n_draws, floor=floor)


def make(out_dir, rng, quick):
    import matplotlib.pyplot as plt

    C.style()
    curves, p = compute(rng, quick)
    fig, ax = plt.subplots(figsize=(10, 4.6))
    for j, c in enumerate(curves):
        col = C.COLORS[j]
        s = np.arange(1, c["tv"].size + 1)
        ax.semilogy(s, c["tv"], "-", color=col, lw=2,
                    label=f"level {c['L']} ({c['n_clusters']} clusters): exact TV after s states")
        ax.semilogy(s, np.minimum(1, np.exp(-(s - 1) / math.exp(c["true_lg"]))), ":", color=col, lw=1.3,
                    label=f"  Eq. 6 bound, true gamma = {math.exp(c['true_lg']):.3g}")
        ax.semilogy(s, np.minimum(1, np.exp(-(s - 1) / math.exp(c["cert"]))), "--", color=col, lw=1.3,
                    label=f"  Eq. 6 bound, certified gamma = {math.exp(c['cert']):.3g}")
        if c["emp"]:
            e = np.array(c["emp"])
            ax.semilogy(e[:, 0], e[:, 1], "o", color=col, mfc="none", ms=6)
    ax.axhline(p["floor"], color="0.4", lw=1, ls="-.",
               label=f"noise floor: sample_exact, {p['n_draws']} draws (markers: sample_mh)")
    ax.set_ylim(1e-4, 1.2)
    ax.set_xscale("log")
    ax.set_xlabel("chain length s (states, the first drawn from Q)")
    ax.set_ylabel("TV(P, law of the final state)")
    ax.set_title(f"MH with the Eq. 7 proposal vs the Eq. 6 bound (N={p['n']}, D={p['dim']}, beta={p['beta']:g})")
    ax.legend(fontsize=7.5, loc="upper left", bbox_to_anchor=(1.01, 1.0), frameon=False)
    fig.tight_layout()
    return C.save(fig, out_dir, "mh_chain")

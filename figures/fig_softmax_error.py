"""Softmax approximation error of the cluster proposal Q (Eq. 7) against beta * rho: measured vs certified.

For several inverse temperatures beta and every tree level L, the clustering C_(L) of an SG tree over planted
hierarchical data gives Q(i) = exp(s_r(C(i))) / Zhat. Measured against the exact softmax P (brute force over all
N targets): max log P/Q, TV(P, Q) and KL(P || Q). Certified (``refimpl.sampling.bounds``, no brute force): log gamma =
max eps_C + log Zhat - log Z_lo with eps_C = beta ||q|| rho(C); TV <= 1 - 1/gamma; KL <= log gamma. The x-axis is
beta ||q|| max_C rho(C) (the largest certified logit error eps); the dashed line 2x is the worst case of the
certificate (Prop. 1 with the corrected radius: every ratio within e^{+-eps}).
"""
from __future__ import annotations

import math

import numpy as np

from figures import _common as C

CAPTION = ("Cluster proposal Q (Eq. 7) vs exact softmax, per tree level and beta: measured max log P/Q, TV and KL "
           "(filled) always sit below the certified bounds (hollow) computed without brute force; both grow with "
           "beta*rho; the max-ratio certificate is within a small factor (annotated), the TV/KL ones are loose.")


def compute(rng, quick):
    from refimpl.sampling import bounds
    from refimpl.index.sgtree import SGTree

    n, nq, dim = (3000, 4, 16) if quick else (20000, 16, 16)
    betas = (5.0, 20.0, 50.0)
    T, Q = C.planted(n, nq, dim, rng)
    tree = SGTree.build(T, rng=rng)
    lo, hi = tree.level_range()
    rows = []  # (beta, level, x, meas_lr, cert_lr, meas_tv, cert_tv, meas_kl)
    for beta in betas:
        for L in range(lo, hi + 1):
            cl = tree.clustering(L)
            vals = []
            for q in Q:
                eps = bounds.cluster_eps(beta, float(np.linalg.norm(q)), cl.radii)
                x = float(eps.max())
                if not 1e-2 <= x <= 40:
                    continue
                rep = beta * (T[cl.reps] @ q)
                cert = bounds.certified_log_max_ratio(rep, cl.sizes.astype(float), eps)
                lp = C.log_softmax(beta * (T @ q))
                lq = C.cluster_log_q(tree, cl, q, beta)
                tv, kl, lr = C.divergences(lp, lq)
                vals.append((x, lr, cert, tv, -math.expm1(-cert), kl))
            if vals:
                v = np.median(np.array(vals), axis=0)
                rows.append((beta, L, *v))
    return np.array(rows), n, dim


def make(out_dir, rng, quick):
    import matplotlib.pyplot as plt

    C.style()
    rows, n, dim = compute(rng, quick)
    fig, axes = plt.subplots(1, 3, figsize=(11, 3.6))
    panels = [("max log P/Q", 3, 4, "certified log gamma"), ("TV(P, Q)", 5, 6, "certified 1 - 1/gamma"),
              ("KL(P || Q)", 7, 4, "certified log gamma")]
    xs = np.logspace(-2, math.log10(40), 50)
    for ax, (label, im, ic, clabel) in zip(axes, panels):
        for j, beta in enumerate(sorted(set(rows[:, 0]))):
            r = rows[rows[:, 0] == beta]
            o = np.argsort(r[:, 2])
            col = C.COLORS[j]
            ax.plot(r[o, 2], r[o, im], "o-", color=col, ms=4, lw=1, label=f"beta={beta:g}")
            ax.plot(r[o, 2], r[o, ic], "o--", color=col, ms=5, mfc="none", lw=0.8)
        if label == "TV(P, Q)":
            ax.plot(xs, -np.expm1(-2 * xs), "k:", lw=1)
        else:
            ax.plot(xs, 2 * xs, "k:", lw=1)
        ax.set_yscale("log")
        ax.set_ylim(bottom=1e-2 if im == 3 else 1e-6)
        ax.text(0.03, 0.97, f"hollow/dashed: {clabel}\nfilled/solid: measured (brute force)", transform=ax.transAxes,
                va="top", fontsize=7.5, bbox=dict(fc="white", ec="0.8", alpha=0.9))
        ax.set_xscale("log")
        ax.set_xlabel("beta ||q|| max rho(C)   (largest certified logit error)")
        ax.set_ylabel(label)
        ax.set_title(f"{label}: measured vs certified")
    from matplotlib.lines import Line2D

    ok = rows[:, 3] > 1e-3
    ratio = rows[ok, 4] / rows[ok, 3]
    axes[0].text(0.97, 0.03, f"certified / measured log P/Q:\nmedian {np.median(ratio):.1f}x, range "
                 f"{ratio.min():.1f}-{ratio.max():.1f}x", transform=axes[0].transAxes, ha="right", va="bottom",
                 fontsize=7.5, bbox=dict(fc="white", ec="0.8", alpha=0.9))

    h, lab = axes[0].get_legend_handles_labels()
    h += [Line2D([], [], color="k", ls="--", marker="o", mfc="none"), Line2D([], [], color="k", ls=":")]
    lab += ["certified bound (hollow)", "2x / 1-exp(-2x): Prop. 1 worst case with radius rho"]
    fig.legend(h, lab, loc="lower center", ncol=5, frameon=False, bbox_to_anchor=(0.5, -0.08))
    fig.suptitle(f"Cluster proposal Q (Eq. 7) from SG-tree levels, N={n} planted unit-norm targets (D={dim}); "
                 "median over queries, one point per level", fontsize=10)
    fig.tight_layout()
    return C.save(fig, out_dir, "softmax_error")

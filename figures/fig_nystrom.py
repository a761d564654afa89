"""Nystrom approximation of the logits and the softmax against the number of landmarks d' (paper §4).

Targets and queries are planted hierarchical unit-norm embeddings in D dimensions; ``refimpl.nystrom.Nystrom``
with the linear kernel approximates <q, t> by <z_q, z_t> = <q, P t> (P: projector onto the span of the landmark
embeddings). Landmarks chosen uniformly (the paper) or by the alternatives in ``refimpl.nystrom``
(k-means++ seeding, randomised pivoted Cholesky). Errors from ``refimpl.nystrom.softmax_gap`` against the exact
logits beta <q, t>: mean absolute logit error, mean TV between the softmaxes, mean max |log ratio|; mean and
min-max over seeds. At d' = D the approximation is exact (the landmarks span R^D).
"""
from __future__ import annotations

import numpy as np

from figures import _common as C

CAPTION = ("Nystrom logits beta<z_q, z_t> vs exact, against the number of landmarks d': logit error, softmax TV "
           "and max log-ratio fall with d' (fast when the spectrum decays, bottom) and vanish at d' = D; "
           "k-means++ / pivoted-Cholesky landmarks beat the paper's uniform choice only modestly (up to ~2x).")

METHODS = (("uniform", "uniform (paper)"), ("kmeans++", "k-means++ seeding"), ("rpcholesky", "randomised pivoted Cholesky"))


def compute(rng, quick, decay=0.0):
    from refimpl.nystrom import Nystrom, softmax_gap

    n, nq, dim, beta = (800, 50, 16, 20.0) if quick else (4000, 200, 64, 20.0)
    seeds = 2 if quick else 3
    T, Q = C.planted(n, nq, dim, rng)
    if decay:
        R, _ = np.linalg.qr(rng.normal(size=(dim, dim)))
        scale = np.arange(1, dim + 1) ** -decay
        T, Q = [(X @ R) * scale for X in (T, Q)]
        T, Q = [X / np.linalg.norm(X, axis=1, keepdims=True) for X in (T, Q)]
    exact = beta * (Q @ T.T)
    ds = sorted({int(d) for d in np.unique(np.round(np.geomspace(2, dim, 9 if quick else 12)))})
    out = {}
    for m, _ in METHODS:
        res = np.zeros((len(ds), seeds, 3))
        for i, d in enumerate(ds):
            for j in range(seeds):
                ny = Nystrom(d, method=m, rng=rng).fit(T)
                g = softmax_gap(beta * ny.inner(Q, T), exact)
                res[i, j] = g["logit_err_mean"], g["tv_mean"], g["log_ratio_mean"]
        out[m] = res
    sv = np.linalg.svd(T, compute_uv=False)
    eff = float(sv.sum() ** 2 / (sv ** 2).sum())  # participation ratio: effective rank of the kernel
    return np.array(ds), out, dict(n=n, nq=nq, dim=dim, beta=beta, seeds=seeds, decay=decay, eff_rank=eff)


def make(out_dir, rng, quick):
    import matplotlib.pyplot as plt

    C.style()
    fig, axes = plt.subplots(2, 3, figsize=(12, 6.8), sharex=True)
    titles = ("mean |logit error|", "mean TV(softmax~, softmax)", "mean max |log P~/P|")
    floor = 1e-12
    for row, decay in enumerate((0.0, 1.0)):
        ds, out, p = compute(rng, quick, decay)
        for k, (ax, title) in enumerate(zip(axes[row], titles)):
            part = ds < p["dim"]
            for j, (m, label) in enumerate(METHODS):
                r = np.maximum(out[m][:, :, k], floor)
                ax.plot(ds[part], r[part].mean(axis=1), "o-", color=C.COLORS[j], ms=4, label=label)
                ax.fill_between(ds[part], r[part].min(axis=1), r[part].max(axis=1), color=C.COLORS[j], alpha=0.15)
            at_d = max(float(out[m][~part, :, k].max()) for m, _ in METHODS) if (~part).any() else float("nan")
            ax.axvline(p["dim"], color="0.5", ls="--", lw=1, label=f"d' = D = {p['dim']}: max error {at_d:.1e}")
            ax.legend(fontsize=7, loc="lower left", handles=ax.get_legend_handles_labels()[0][-1:])
            ax.set_xscale("log", base=2)
            ax.set_yscale("log")
            if row == 1:
                ax.set_xlabel("number of landmarks d'")
            kind = "isotropic (planted as is)" if not decay else f"anisotropic (spectrum k^-{decay:g})"
            ax.set_title(f"{title}\n{kind}, effective rank {p['eff_rank']:.1f}", fontsize=9)
        axes[row, 0].set_ylabel(f"mean over {p['nq']} queries\n(band: min-max of {p['seeds']} seeds)")
    h, lab = axes[0, 0].get_legend_handles_labels()
    fig.legend(h[:3], lab[:3], loc="lower center", ncol=3, fontsize=8.5, frameon=False, bbox_to_anchor=(0.5, -0.03))
    fig.suptitle(f"Nystrom approximation (linear kernel) of beta<q, t>: N={p['n']} planted unit-norm targets, "
                 f"D={p['dim']}, beta={p['beta']:g}", fontsize=10)
    fig.tight_layout()
    return C.save(fig, out_dir, "nystrom")

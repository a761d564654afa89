"""Shared helpers of the figure modules: matplotlib style, the planted data every figure uses, saving.

Data: :func:`refimpl.data.hierarchical_points` with a four-level hierarchy (``FINE``: 16 x 16 x 8 = 2048 leaf
centres, leaf noise 0.03) so that clusters of radius ~1/beta exist at beta = 20 on the unit sphere; queries are
drawn in the same call as the targets (same mixture) and split off.
"""
from __future__ import annotations

import math
from pathlib import Path

import matplotlib

matplotlib.use("Agg")
import matplotlib.pyplot as plt  # noqa: E402
import numpy as np  # noqa: E402

from refimpl.data import hierarchical_points  # noqa: E402

DPI = 110
FINE = dict(branching=(16, 16, 8), scales=(1.0, 0.35, 0.12, 0.03))
COLORS = ["#1f77b4", "#d62728", "#2ca02c", "#ff7f0e", "#9467bd", "#8c564b", "#17becf", "#7f7f7f"]


def style():
    plt.rcParams.update({"font.size": 9, "axes.titlesize": 10, "axes.labelsize": 9, "legend.fontsize": 8,
                         "xtick.labelsize": 8, "ytick.labelsize": 8, "axes.grid": True, "grid.alpha": 0.3,
                         "figure.dpi": DPI})


def planted(n_targets, n_queries, dim, rng, **kw):
    """(targets, queries): unit-norm points of one hierarchical mixture (``FINE`` unless overridden)."""
    cfg = dict(FINE)
    cfg.update(kw)
    pts = hierarchical_points(n_targets + n_queries, dim, rng=rng, **cfg)
    return np.ascontiguousarray(pts[:n_targets]), np.ascontiguousarray(pts[n_targets:])


def log_softmax(s):
    m = np.max(s)
    return s - (m + math.log(float(np.sum(np.exp(s - m)))))


def cluster_log_q(tree, clustering, q, beta):
    """log Q(i) of the Eq. 7 cluster proposal for every target id of ``tree`` (a ``tree.clustering(level)``):
    Q(i) = exp(s_r(C(i))) / Zhat, Zhat = sum_C |C| exp(s_r(C))."""
    from refimpl.nystrom import cluster_assignment

    assign = cluster_assignment(tree, clustering)
    if np.any(assign < 0):
        raise RuntimeError("cluster_assignment left a target unassigned")
    rep = beta * (tree.points[clustering.reps] @ q)
    lz_hat = float(np.max(rep)) + math.log(float(np.sum(clustering.sizes * np.exp(rep - np.max(rep)))))
    return rep[assign] - lz_hat


def divergences(log_p, log_q):
    """(TV, KL(P||Q), max log P/Q) between two distributions given by their logs."""
    p = np.exp(log_p)
    tv = 0.5 * float(np.sum(np.abs(p - np.exp(log_q))))
    kl = float(np.sum(p * (log_p - log_q)))
    return tv, max(kl, 0.0), float(np.max(log_p - log_q))


def min_time(fn, repeats):
    """(min wall time over ``repeats`` calls, last result): the minimum is the least noisy estimate on a shared
    machine (other processes only ever add time)."""
    import time

    best, out = float("inf"), None
    for _ in range(max(1, repeats)):
        t0 = time.perf_counter()
        out = fn()
        best = min(best, time.perf_counter() - t0)
    return best, out


def save(fig, out_dir, name):
    out = Path(out_dir) / f"{name}.png"
    fig.savefig(out, dpi=DPI, bbox_inches="tight")
    plt.close(fig)
    return out

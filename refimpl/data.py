"""Synthetic data with known structure, and (later) the text-pair loader.

:func:`hierarchical_points` is the point cloud every benchmark and sampler test uses for "the planted hierarchical
data": a Gaussian mixture of clusters of clusters, optionally projected onto the unit sphere (the paper's regime,
A3 of PAPER.md §1).
"""
from __future__ import annotations

import numpy as np

from refimpl._validate import as_rng, check_int, check_positive

__all__ = ["hierarchical_points"]


def hierarchical_points(n: int, dim: int, *, branching=(16, 16), scales=(1.0, 0.35, 0.12), unit_norm: bool = True,
                        rng=None) -> np.ndarray:
    """``n`` points in ``R^dim`` drawn from a hierarchical Gaussian mixture (clusters of clusters).

    Level 0 draws ``branching[0]`` centres ~ N(0, scales[0]^2 I / dim); each centre at level j spawns
    ``branching[j]`` children ~ N(parent, scales[j]^2 I / dim); every point is a leaf centre plus
    N(0, scales[-1]^2 I / dim) noise. The per-coordinate ``1/dim`` keeps the expected squared offset at ``scale^2``
    whatever the dimension. With ``unit_norm`` each point is scaled to norm 1 (A3).

    Parameters
    ----------
    n, dim : number of points (>= 1) and dimension (>= 1).
    branching : children per centre at each level of the mixture (len(scales) == len(branching) + 1).
    scales : standard deviation (total, across all coordinates) of each level's offsets and of the leaf noise.
    rng : Generator or int seed.
    """
    n = check_int("n", n, low=1)
    dim = check_int("dim", dim, low=1)
    branching = tuple(check_int("branching", b, low=1) for b in branching)
    scales = tuple(check_positive("scales", s, allow_zero=True) for s in scales)
    if len(scales) != len(branching) + 1:
        raise ValueError(f"scales: expected {len(branching) + 1} values (one per level plus the leaf noise), "
                         f"got {len(scales)}")
    gen = as_rng(rng)
    sd = 1.0 / np.sqrt(dim)
    centres = gen.normal(0.0, scales[0] * sd, size=(branching[0], dim))
    for j in range(1, len(branching)):
        offsets = gen.normal(0.0, scales[j] * sd, size=(centres.shape[0], branching[j], dim))
        centres = (centres[:, None, :] + offsets).reshape(-1, dim)
    leaf = gen.integers(0, centres.shape[0], size=n)
    pts = centres[leaf] + gen.normal(0.0, scales[-1] * sd, size=(n, dim))
    if unit_norm:
        norms = np.linalg.norm(pts, axis=1, keepdims=True)
        norms[norms == 0] = 1.0
        pts /= norms
    return pts

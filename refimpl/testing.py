"""Goodness-of-fit harness with stated power: test any sampler of a known discrete law (e.g. a port's softmax sampler
against :func:`refimpl.sampling.samplers.sample_exact`, Eq. 1).

Pearson's chi-square test after binning (:func:`make_bins`): every category with p_i >= 1/max_bins is its own bin
(the high-probability targets, where a broken sampler's errors concentrate); the other categories, by decreasing
p, are merged into contiguous bins of about equal mass. Power: Cauchy-Schwarz gives
chi^2(p'||p) = sum_b (p'_b - p_b)^2 / p_b >= (sum_b |p'_b - p_b|)^2 = 4 TV^2, so the noncentrality of Pearson's
statistic for n draws from p' is lambda = n chi^2(p'||p) >= 4 n TV^2; :func:`required_sample_size` returns the
smallest n with P(ncx2(df, 4 n TV^2) > chi2.isf(alpha, df)) >= power (the standard noncentral approximation).
A test at that n rejects every law at TV >= tv from p *on the bins* with probability >= power, and rejects the
exact sampler with probability alpha.

Contents: :data:`TV`, :data:`ALPHA`, :data:`POWER` (the project's defaults: 0.02, 0.001, 0.99),
:func:`required_sample_size`, :func:`make_bins`, :func:`chi2_gof`, :func:`check_sampler`, :func:`tv_distance`.
"""
from __future__ import annotations

import math
from dataclasses import dataclass
from functools import lru_cache

import numpy as np
from scipy import stats as st

__all__ = ["TV", "ALPHA", "POWER", "required_sample_size", "make_bins", "chi2_gof", "GofResult", "check_sampler",
           "tv_distance"]

TV = 0.02
ALPHA = 1e-3
POWER = 0.99


@lru_cache(maxsize=None)
def required_sample_size(tv: float = TV, *, n_bins: int = 100, alpha: float = ALPHA, power: float = POWER) -> int:
    """Smallest n such that Pearson's test on ``n_bins`` bins (df = n_bins - 1) at level ``alpha`` rejects every
    law at total variation >= ``tv`` (on the bins) with probability >= ``power``.

    Parameters
    ----------
    tv : float in (0, 1]
    n_bins : int >= 2
    alpha, power : floats in (0, 1)

    Returns n = min{n : P(ncx2(n_bins - 1, 4 n tv^2) > chi2.isf(alpha, n_bins - 1)) >= power}; e.g. 64,143 for
    the defaults (tv 0.02, 100 bins, alpha 0.001, power 0.99).
    """
    if not (0 < tv <= 1):
        raise ValueError(f"tv: must be in (0, 1], got {tv}")
    if int(n_bins) != n_bins or n_bins < 2:
        raise ValueError(f"n_bins: must be an integer >= 2, got {n_bins}")
    if not (0 < alpha < 1):
        raise ValueError(f"alpha: must be in (0, 1), got {alpha}")
    if not (0 < power < 1):
        raise ValueError(f"power: must be in (0, 1), got {power}")
    df = int(n_bins) - 1
    crit = st.chi2.isf(alpha, df)

    def pw(n):
        return st.ncx2.sf(crit, df, 4.0 * n * tv * tv)

    lo, hi = 1, 2
    while pw(hi) < power:
        hi *= 2
    while hi - lo > 1:
        mid = (lo + hi) // 2
        if pw(mid) >= power:
            hi = mid
        else:
            lo = mid
    return hi


def make_bins(p, max_bins: int = 100):
    """Bins of the categories of a law ``p`` (see the module docstring).

    Parameters
    ----------
    p : (M,) array of probabilities
    max_bins : int >= 2

    Returns (bin of each category (M,) int64, number of bins <= max_bins).
    """
    p = np.asarray(p, dtype=np.float64)
    order = np.argsort(-p, kind="stable")
    ps = p[order]
    heavy = min(int(np.sum(ps >= 1.0 / max_bins)), max_bins - 1)
    bins = np.empty(p.size, np.int64)
    bins[order[:heavy]] = np.arange(heavy)
    rest = ps[heavy:]
    n_rest = max_bins - heavy
    if rest.size:
        mass = float(rest.sum())
        cum = np.cumsum(rest)
        idx = np.minimum((cum - rest * 0.5) / max(mass, 1e-300) * n_rest, n_rest - 1).astype(np.int64)
        bins[order[heavy:]] = heavy + idx
    _, bins = np.unique(bins, return_inverse=True)  # drop empty bins
    return bins.astype(np.int64), int(bins.max()) + 1


def chi2_gof(samples, p, max_bins: int = 100):
    """Pearson's chi-square test of ``samples`` (category ids) against the law ``p`` on :func:`make_bins`' bins.

    Parameters
    ----------
    samples : int array (any shape) of ids in [0, M)
    p : (M,) array, non-negative (normalised here)
    max_bins : int

    Returns (p_value, statistic, df, smallest expected bin count). A draw of a category with p = 0 fails the
    test outright (p_value 0).
    """
    samples = np.asarray(samples).ravel()
    p = np.asarray(p, dtype=np.float64)
    if samples.size == 0:
        raise ValueError("samples: is empty")
    if samples.min() < 0 or samples.max() >= p.size:
        raise ValueError(f"samples: ids must lie in [0, {p.size})")
    p = p / p.sum()
    if np.any(p[samples] == 0):
        return 0.0, math.inf, 0, 0.0
    bins, nb = make_bins(p, max_bins)
    exp = np.bincount(bins, weights=p, minlength=nb) * samples.size
    obs = np.bincount(bins[samples], minlength=nb)
    stat = float(np.sum((obs - exp) ** 2 / exp))
    df = nb - 1
    return float(st.chi2.sf(stat, df)), stat, df, float(exp.min())


@dataclass
class GofResult:
    """Outcome of :func:`check_sampler`: ``passed`` (p_value > alpha), the p-value, the number of draws and the
    TV at which the test had the stated power."""

    passed: bool
    p_value: float
    n_draws: int
    tv: float
    alpha: float
    power: float


def check_sampler(draw, p, *, tv: float = TV, alpha: float = ALPHA, power: float = POWER, max_bins: int = 100):
    """Test a sampler against the law ``p`` with stated power.

    Parameters
    ----------
    draw : callable n -> int array of n category ids (the sampler under test)
    p : (M,) array, the law it should follow
    tv, alpha, power : the test detects any law at TV >= tv (on the bins) with probability >= power and rejects
        an exact sampler with probability alpha.

    Returns a :class:`GofResult`; n = :func:`required_sample_size` (tv, number of bins of ``p``).
    """
    _, nb = make_bins(np.asarray(p, dtype=np.float64) / np.sum(p), max_bins)
    n = required_sample_size(tv, n_bins=max(nb, 2), alpha=alpha, power=power)
    pv = chi2_gof(draw(n), p, max_bins)[0]
    return GofResult(pv > alpha, pv, n, tv, alpha, power)


def tv_distance(p, r) -> float:
    """Total variation distance (1/2) sum_i |p_i - r_i| of two laws on the same categories."""
    return 0.5 * float(np.abs(np.asarray(p, float) - np.asarray(r, float)).sum())

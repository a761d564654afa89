"""Goodness-of-fit harness for the sampler tests (DESIGN.md "Exact means exact").

Pearson chi-square test of observed draws against a reference distribution p over categories, after binning:
every category with p_i >= 1/max_bins is its own bin (the high-probability targets, where a broken sampler's
errors concentrate), the remaining categories (sorted by decreasing p) are grouped into contiguous bins of about
equal mass. The sample size is chosen so that the test at level alpha detects every alternative whose total
variation distance from p *on the bins* is >= tv with probability >= power:

Cauchy-Schwarz gives chi^2(p'||p) = sum (p'_b - p_b)^2 / p_b >= (sum |p'_b - p_b|)^2 = 4 TV^2, so the
noncentrality of Pearson's statistic is lambda = n chi^2(p'||p) >= 4 n TV^2; n is the smallest size with
P(ncx2(df, 4 n TV^2) > chi2.isf(alpha, df)) >= power (the standard noncentral chi-square approximation of the
power). For tv = 0.02, alpha = 0.001, power = 0.99 this is n = 64,143 at 100 bins (df 99) and 30,139 at 10 bins (df 9)
(:func:`required_sample_size`).
"""
from __future__ import annotations

import math
from functools import lru_cache

import numpy as np
from scipy import stats as st

__all__ = ["required_sample_size", "make_bins", "chi2_gof", "tv_distance", "TV", "ALPHA", "POWER"]

TV = 0.02
ALPHA = 1e-3
POWER = 0.99


@lru_cache(maxsize=None)
def required_sample_size(df: int, tv: float = TV, alpha: float = ALPHA, power: float = POWER) -> int:
    """Smallest n such that Pearson's chi-square test with ``df`` degrees of freedom at level ``alpha`` rejects
    every alternative at TV >= ``tv`` (on the bins) with probability >= ``power``."""
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
    """Bin index per category (see the module docstring). Returns (bin_of_category, n_bins)."""
    p = np.asarray(p, dtype=np.float64)
    order = np.argsort(-p, kind="stable")
    ps = p[order]
    heavy = int(np.sum(ps >= 1.0 / max_bins))
    heavy = min(heavy, max_bins - 1)
    bins = np.empty(p.size, np.int64)
    bins[order[:heavy]] = np.arange(heavy)
    rest = ps[heavy:]
    n_rest = max_bins - heavy
    if rest.size:
        mass = float(rest.sum())
        cum = np.cumsum(rest)
        idx = np.minimum((cum - rest * 0.5) / max(mass, 1e-300) * n_rest, n_rest - 1).astype(np.int64)
        # merge a final bin that would be nearly empty into its predecessor
        bins[order[heavy:]] = heavy + idx
    _, bins = np.unique(bins, return_inverse=True)
    return bins.astype(np.int64), int(bins.max()) + 1


def chi2_gof(samples, p, max_bins: int = 100):
    """Pearson chi-square test of ``samples`` (category ids) against ``p``. Returns (p_value, stat, df, min_expected).

    Categories with p = 0 that are observed make the test fail outright (p_value 0)."""
    samples = np.asarray(samples).ravel()
    p = np.asarray(p, dtype=np.float64)
    p = p / p.sum()
    if np.any(p[samples] == 0):
        return 0.0, math.inf, 0, 0.0
    bins, nb = make_bins(p, max_bins)
    exp = np.bincount(bins, weights=p, minlength=nb) * samples.size
    obs = np.bincount(bins[samples], minlength=nb)
    stat = float(np.sum((obs - exp) ** 2 / exp))
    df = nb - 1
    return float(st.chi2.sf(stat, df)), stat, df, float(exp.min())


def tv_distance(p, r):
    return 0.5 * float(np.abs(np.asarray(p, float) - np.asarray(r, float)).sum())

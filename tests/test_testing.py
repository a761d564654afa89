"""The goodness-of-fit harness (refimpl.testing): its sample size has the stated power, its bins are a partition
of the categories, and it rejects a sampler at TV 0.02 while passing an exact one."""
from __future__ import annotations

import numpy as np
import pytest
from scipy import stats as st

from refimpl.testing import (ALPHA, POWER, TV, check_sampler, chi2_gof, make_bins, required_sample_size,
                             tv_distance)


def _law(m=500, seed=0):
    s = 5.0 * np.random.default_rng(seed).normal(size=m)
    p = np.exp(s - s.max())
    return p / p.sum()


def _shifted(p, tv):
    """The law with ``tv`` of mass moved from the top category to the bottom half (TV exactly ``tv``)."""
    r = p.copy()
    r[np.argmax(p)] -= tv
    low = np.argsort(p)[: p.size // 2]
    r[low] += tv / low.size
    return r


def test_sample_size_has_the_stated_power():
    """n is the smallest size whose noncentral chi-square power reaches POWER (64,143 for the defaults)."""
    n = required_sample_size(TV)
    crit = st.chi2.isf(ALPHA, 99)
    assert st.ncx2.sf(crit, 99, 4 * n * TV**2) >= POWER
    assert st.ncx2.sf(crit, 99, 4 * (n - 1) * TV**2) < POWER
    assert n == 64143
    assert required_sample_size(0.04) < n < required_sample_size(0.01)
    assert required_sample_size(TV, n_bins=10) < n  # fewer degrees of freedom, fewer draws


def test_bins_partition_and_keep_heavy_categories_alone():
    p = _law()
    bins, nb = make_bins(p, 100)
    assert bins.shape == p.shape and nb <= 100 and set(np.unique(bins)) == set(range(nb))
    for i in np.flatnonzero(p >= 0.01):
        assert np.sum(bins == bins[i]) == 1  # a heavy category is its own bin


def test_chi2_rejects_tv_002_and_passes_exact_draws():
    """Negative control: draws at TV 0.02 from p are rejected; draws from p pass (fixed seed)."""
    rng = np.random.default_rng(0)
    p = _law()
    r = _shifted(p, TV)
    assert abs(tv_distance(p, r) - TV) < 1e-12
    n = required_sample_size(TV)
    assert chi2_gof(rng.choice(p.size, size=n, p=r), p)[0] < ALPHA
    assert chi2_gof(rng.choice(p.size, size=n, p=p), p)[0] > ALPHA


def test_check_sampler_states_its_power_and_detects_a_wrong_sampler():
    rng = np.random.default_rng(1)
    p = _law(seed=1)
    good = check_sampler(lambda n: rng.choice(p.size, size=n, p=p), p)
    bad = check_sampler(lambda n: rng.choice(p.size, size=n, p=_shifted(p, TV)), p)
    assert good.passed and not bad.passed
    assert good.n_draws == required_sample_size(TV, n_bins=make_bins(p)[1])
    assert (good.tv, good.alpha, good.power) == (TV, ALPHA, POWER)


def test_zero_probability_draw_fails_outright_and_bad_input():
    p = np.array([0.5, 0.5, 0.0])
    assert chi2_gof(np.array([0, 1, 2]), p)[0] == 0.0
    with pytest.raises(ValueError, match="samples"):
        chi2_gof(np.array([3]), p)
    with pytest.raises(ValueError, match="tv"):
        required_sample_size(0.0)
    with pytest.raises(ValueError, match="n_bins"):
        required_sample_size(TV, n_bins=1)

"""The adaptive sampler's per-query pass over its start clusters (refimpl.sampling._adaptive): the vectorisable
exponential against extended-precision exp, the branch-free certified bounds against the three bounds they take
the least of, zero-mass (lumped) start clusters never proposed by the alias table or the binary search, and the
sampler's law with lumped start clusters on both proposal paths (chi-square at alpha 0.001, n = 64,143, power
>= 0.99 at TV 0.02, as in tests/test_samplers_float32.py). Seeds are fixed.
"""
from __future__ import annotations

import numpy as np
import pytest
from numba import njit

from refimpl.sampling import samplers as S
from refimpl.sampling._adaptive import EXP_REL, _alias, _masses, _start_bounds
from refimpl.testing import ALPHA, TV, chi2_gof, required_sample_size
from tests.test_samplers_stats import _instance

N_DRAWS = required_sample_size(TV)  # 64,143: power >= 0.99 at TV 0.02


def _exp_array(x):
    """_exp over an array, through the kernel's own vectorised loop (_masses with unit sizes)."""
    out = np.empty_like(x)
    _masses(np.ones(x.size, np.int64), x, 0.0, out, 0, x.size)
    return out


def test_exp_relative_error_underflow_and_special_values():
    """_exp against exp in extended precision (long double where it has a 64-bit mantissa, else libm with a
    looser bound) on 2.2e6 points of [-700, 709] (uniform, and the edges of the range reduction, r = +-ln2/2):
    relative error <= EXP_REL / 4. Below -700 (and at -inf) exactly 0, off by at most e^-700 from exp; NaN
    stays NaN and never arises from any other input."""
    rng = np.random.default_rng(7)
    edges = (np.arange(-2020, 2046) + 0.5) * np.log(2.0)
    x = np.concatenate([-rng.uniform(0.0, 700.0, 2_000_000), rng.uniform(0.0, 709.0, 200_000),
                        np.nextafter(edges, -np.inf), np.nextafter(edges, np.inf), [0.0, -700.0, 709.0, -1e-300]])
    x = x[(x >= -700.0) & (x <= 709.0)]
    got = _exp_array(x)
    assert not np.isnan(got).any() and np.all(got > 0.0)
    if np.finfo(np.longdouble).nmant >= 63:
        ref = np.exp(x.astype(np.longdouble))
        rel = np.abs((got.astype(np.longdouble) - ref) / ref).astype(np.float64)
        assert rel.max() <= EXP_REL / 4, rel.max()
    else:  # pragma: no cover - platforms whose long double is a double
        assert np.max(np.abs(got / np.exp(x) - 1.0)) <= EXP_REL / 2
    assert _exp_array(np.array([0.0]))[0] == 1.0
    under = np.concatenate([-rng.uniform(700.0, 800.0, 10_000), np.nextafter([-700.0], -np.inf),
                            [-745.2, -1e300, -np.inf]])
    got = _exp_array(under)
    assert np.all(got == 0.0) and np.all(np.exp(under) <= np.exp(-700.0))
    assert np.isnan(_exp_array(np.array([np.nan])))[0]


def _reference_bounds(s, bq, qn2, beta, rho, rn2, M, tau):
    """The three bounds of Prop. 1 and the expansion, with the branches written out."""
    e = np.minimum(s + bq * rho, bq * M)
    d2 = qn2 + rn2 - 2.0 * s / beta
    dl = np.where(d2 > 0.0, np.sqrt(np.maximum(d2, 0.0)) - rho, -rho)
    b3 = 0.5 * beta * (qn2 + M * M - dl * dl) + 16.0 * 2.0 ** -53 * beta * (qn2 + rn2 + M * M)
    return np.where(dl > 0.0, np.minimum(e, b3), e) + tau


def test_start_bounds_are_certified_and_the_least_of_three():
    """_start_bounds on 3,000 random clusters (D = 8, beta = 20, a non-unit query, radii from 0 to 2, members on
    the radius sphere and towards the query, where <q, t> is largest): every member's logit beta <q, t> <= E, E
    equals the least of the three bounds (within 1e-12 of the size of their terms: an FMA may round s + beta ||q||
    rho differently), singletons get E = s, the negative control
    (sl = 0) E = s, and the clusters with E <= Etail get E = s = -inf, the others s unchanged."""
    rng = np.random.default_rng(8)
    C, D, beta = 3000, 8, 20.0
    q = rng.normal(size=D)
    q *= 1.3 / np.linalg.norm(q)
    qn2 = float(q @ q)
    bq = beta * np.sqrt(qn2)
    tau = 1e-12 * bq
    R = rng.normal(size=(C, D)) * rng.uniform(0.2, 1.5, size=(C, 1))
    rho = rng.uniform(0.0, 2.0, C)
    rho[:50] = 0.0
    U = rng.normal(size=(C, 6, D))
    U[:, 0] = q  # the member towards the query
    U /= np.linalg.norm(U, axis=2, keepdims=True)
    T = R[:, None, :] + rho[:, None, None] * U
    M = np.maximum(np.linalg.norm(T, axis=2).max(axis=1), np.linalg.norm(R, axis=1)) * (1.0 + 2.0 ** -50)
    s = beta * (R @ q)
    rn2 = np.einsum("ij,ij->i", R, R)
    sizes = np.full(C, 7, np.int64)
    sizes[50:80] = 1
    fE, fs = np.empty(C), np.empty(C)
    _start_bounds(s, sizes, rho, rn2, M, bq, qn2, beta, tau, 1.0, -np.inf, fE, fs)
    assert np.all(beta * np.einsum("cmd,d->cm", T, q)[sizes > 1].max(axis=1) <= fE[sizes > 1])
    ref = np.where(sizes > 1, _reference_bounds(s, bq, qn2, beta, rho, rn2, M, tau), s)
    tol = 1e-12 * (np.abs(s) + bq * (rho + M))
    assert np.all(np.abs(fE - ref) <= tol) and np.array_equal(fs, s)
    assert np.array_equal(fE[sizes == 1], s[sizes == 1])
    _start_bounds(s, sizes, rho, rn2, M, bq, qn2, beta, tau, 0.0, -np.inf, fE, fs)
    assert np.array_equal(fE, s)
    etail = float(np.median(ref))
    _start_bounds(s, sizes, rho, rn2, M, bq, qn2, beta, tau, 1.0, etail, fE, fs)
    lump = ref <= etail
    assert lump.any() and not lump.all()
    assert np.all(fE[lump] == -np.inf) and np.all(fs[lump] == -np.inf)
    assert np.array_equal(fs[~lump], s[~lump]) and np.all(np.abs(fE - ref)[~lump] <= tol[~lump])


def _zero_heavy_weights(rng, n):
    """n weights over 30 orders of magnitude, about half of them exactly 0 (lumped clusters), the first and the
    last included."""
    w = np.exp(rng.uniform(-70.0, 0.0, n))
    w[rng.random(n) < 0.5] = 0.0
    w[[0, 1, n - 2]] = 0.0
    return w


def test_alias_table_gives_zero_weights_probability_zero():
    """Vose's alias table over weights with many exact zeros: the law it implies (slot j kept with prob[j],
    else alias[j]) is w / sum(w) within 1e-12, and exactly 0 on every zero weight (for 5 seeds, n up to 5,000)."""
    for seed, n in zip(range(5), (3, 17, 300, 1000, 5000)):
        rng = np.random.default_rng(seed)
        w = _zero_heavy_weights(rng, n)
        w[n // 2] = 1.0
        prob, alias = _alias(w, n)
        p = prob.copy()
        np.add.at(p, alias, 1.0 - prob)
        p /= n
        assert np.all(p[w == 0.0] == 0.0), seed
        assert np.allclose(p, w / w.sum(), rtol=0.0, atol=1e-12), seed


@njit(cache=True)
def _bsearch(cw, n, u):
    """The kernel's binary-search proposal: the entry j with cw[j-1] <= u < cw[j]."""
    return min(np.searchsorted(cw[:n], u, side="right"), n - 1)


def test_binary_search_never_lands_on_a_zero_weight():
    """The cumulative masses of weights with many exact zeros, searched at 200,000 uniform points of [0, total)
    and at every cumulative value itself (the boundaries): the entry found always has a positive weight."""
    rng = np.random.default_rng(9)
    w = _zero_heavy_weights(rng, 4000)
    w[-1] = 0.5  # the last entry (the kernel's tail) has a positive mass
    cw = np.cumsum(w)
    us = np.concatenate([rng.random(200_000) * cw[-1], cw[:-1], [0.0, np.nextafter(cw[-1], 0.0)]])
    picked = np.array([_bsearch(cw, cw.size, u) for u in us])
    assert np.all(w[picked] > 0.0)


@pytest.mark.parametrize("k", [2, 64])
def test_adaptive_with_lumped_start_clusters_is_exact(k):
    """sample_adaptive from a start level of up to 300 clusters, more than half of them lumped into the tail (mass 0
    in the envelope), with k = 2 draws per query row (proposals by binary search) and k = 64 (by the alias table):
    the softmax (chi-square, alpha 0.001, n = 64,143, power >= 0.99 at TV 0.02; beta = 20, D = 8), certified and
    finite log Z bounds, and no brute-force draw."""
    X, tree, q = _instance("unit", 8)
    rows = -(-N_DRAWS // k)
    r = S.sample_adaptive(tree, np.repeat(q[None], rows, axis=0), k, beta=20.0, rng=60, start_clusters=300)
    assert np.all(r.stats["lumped_clusters"] > 0) and np.sum(r.stats["exact_fallbacks"]) == 0
    p = np.exp(20.0 * X @ q - np.max(20.0 * X @ q))
    assert chi2_gof(r.ids.ravel()[:N_DRAWS], p / p.sum())[0] > ALPHA, k
    lz = np.logaddexp.reduce(20.0 * X @ q)
    lo, hi = r.stats["log_z_lo"], r.stats["log_z_hi"]
    assert np.all(np.isfinite(lo)) and np.all(np.isfinite(hi))
    assert np.all(lo - 1e-9 <= lz) and np.all(lz <= hi + 1e-9)

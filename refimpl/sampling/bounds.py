"""Certified softmax bounds over a clustering, and the paper's propositions as functions (paper §3-4).

Certified form (exact for any query norm): if every member i of cluster C lies within rho(C) of the representative
r(C) (rho = MAXD-based radius of :class:`refimpl.index.Clustering`), Cauchy-Schwarz gives
|s_i - s_r| = beta |<q, t_i - t_r>| <= eps_C = beta ||q|| rho(C). Hence

    Z_lo = sum_C |C| exp(s_r - eps_C)  <=  Z  <=  Z_hi = sum_C |C| exp(s_r + eps_C),

and for the cluster proposal Q of Eq. 7 (Q(i) = exp(s_r(C(i))) / Zhat, Zhat = sum_C |C| exp(s_r)):
P(i)/Q(i) = exp(s_i - s_r) Zhat / Z <= exp(eps_C(i)) Zhat / Z_lo. Everything is computed in log space.

Paper statements (unit norms assumed there): Prop. 1 (ratio bound r = beta b^l as printed; corrected radius),
Prop. 2 (level for a target gamma), Prop. 6 (drift bound U = 4 w eta beta L M).
"""
from __future__ import annotations

import math

import numpy as np

from refimpl._validate import check_int, check_positive
from refimpl.softmax import logsumexp

__all__ = ["cluster_eps", "log_partition_bounds", "certified_log_max_ratio", "log_proposal_normalizer",
           "prop1_ratio_bound", "prop1_corrected_radius", "prop2_level", "prop2_levels", "prop6_drift"]


def _vec(name, a, *, n=None, positive=False, nonneg=False):
    arr = np.asarray(a, dtype=np.float64)
    if arr.ndim != 1:
        raise ValueError(f"{name}: expected a 1-D array, got shape {arr.shape}")
    if arr.size == 0:
        raise ValueError(f"{name}: is empty")
    if n is not None and arr.shape[0] != n:
        raise ValueError(f"{name}: expected length {n}, got {arr.shape[0]}")
    if not np.all(np.isfinite(arr)):
        raise ValueError(f"{name}: contains NaN or Inf")
    if positive and (arr <= 0).any():
        raise ValueError(f"{name}: must be > 0")
    if nonneg and (arr < 0).any():
        raise ValueError(f"{name}: must be >= 0")
    return arr


def _lse(name, x):
    """log sum exp(x) of finite terms; a term that overflowed to +Inf is reported against ``name``."""
    if np.isnan(x).any() or np.isposinf(x).any():
        raise ValueError(f"{name}: overflow (a term of the bound is not finite in float64; rescale beta or the "
                         "embeddings)")
    return float(logsumexp(x))


def _power(name, base, e):
    """base ** e as a float, with an overflow reported against ``name``."""
    try:
        return float(base) ** e
    except OverflowError:
        raise ValueError(f"{name}: {e} is out of range (base ** {e} overflows float64)") from None


def _finite(name, x):
    x = np.asarray(x, dtype=np.float64)
    if not np.all(np.isfinite(x)):
        raise ValueError(f"{name}: overflow (the result is not finite in float64; rescale beta or the embeddings)")
    return x


def cluster_eps(beta, q_norm, radii) -> np.ndarray:
    """eps_C = beta ||q|| rho(C): the certified bound on |s_i - s_r(C)| for every member i of C."""
    beta = check_positive("beta", beta)
    q_norm = check_positive("q_norm", q_norm, allow_zero=True)
    r = _vec("radii", radii, nonneg=True)
    with np.errstate(over="ignore"):
        return _finite("radii", beta * q_norm * r)


def log_partition_bounds(rep_logits, sizes, eps) -> tuple[float, float]:
    """(log Z_lo, log Z_hi) with Z_lo <= Z = sum_i exp(s_i) <= Z_hi (see the module docstring)."""
    s = _vec("rep_logits", rep_logits)
    sz = _vec("sizes", sizes, n=s.size, positive=True)
    e = _vec("eps", eps, n=s.size, nonneg=True)
    ls = np.log(sz)
    with np.errstate(over="ignore", invalid="ignore"):
        lo, hi = ls + s - e, ls + s + e
    return _lse("rep_logits", lo), _lse("eps", hi)


def log_proposal_normalizer(rep_logits, sizes) -> float:
    """log Zhat = log sum_C |C| exp(s_r(C)), the normaliser of the cluster proposal Q of Eq. 7."""
    s = _vec("rep_logits", rep_logits)
    sz = _vec("sizes", sizes, n=s.size, positive=True)
    with np.errstate(over="ignore"):
        return _lse("rep_logits", np.log(sz) + s)


def certified_log_max_ratio(rep_logits, sizes, eps) -> float:
    """Certified log max_i P(i)/Q(i) for the Eq. 7 proposal: max_C eps_C + log Zhat - log Z_lo (>= the truth)."""
    s = _vec("rep_logits", rep_logits)
    e = _vec("eps", eps, n=s.size, nonneg=True)
    lo, _ = log_partition_bounds(s, sizes, e)
    with np.errstate(over="ignore", invalid="ignore"):
        return float(_finite("eps", e.max() + log_proposal_normalizer(s, sizes) - lo))


def prop2_levels(gamma, beta_q, base) -> np.ndarray:
    """Prop. 2's start level for every query at once: l_b = max{l in Z : b^l <= log(gamma) / (2 beta ||q_b||)}.

    ``beta_q`` (B,) holds beta ||q_b|| (the query norm folded into beta; identical to the paper for unit queries).
    Same value as :func:`prop2_level` query by query, vectorised.
    """
    x = math.log(gamma) / (2.0 * np.maximum(np.asarray(beta_q, dtype=np.float64), 1e-300))
    lv = np.floor(np.log(x) / math.log(base)).astype(np.int64)
    lv += (base ** (lv + 1.0) <= x).astype(np.int64)
    lv -= (base ** lv.astype(np.float64) > x).astype(np.int64)
    return lv


def prop1_corrected_radius(base, level) -> float:
    """Radius of a level-l cluster implied by parent-child covering alone: sum_{k<=l} b^k = b^(l+1)/(b-1)
    (the erratum to Prop. 1). A node's MAXD is usually much smaller and always valid."""
    base = check_positive("base", base)
    if base <= 1:
        raise ValueError(f"base: must be > 1, got {base}")
    level = check_int("level", level)
    return _power("level", base, level + 1) / (base - 1)


def prop1_ratio_bound(beta, base, level, *, radius=None, q_norm=1.0) -> float:
    """Prop. 1: r such that e^-r <= exp(s_r(C(i))) / exp(s_i) <= e^r for level-l clusters.

    With ``radius=None``: the paper's printed r = beta b^l (unit norms; WRONG in general, see the §2 erratum and
    the test that breaks it). With a radius (a node's MAXD or rho(v, l), or :func:`prop1_corrected_radius`):
    the corrected and certified r = beta ||q|| radius."""
    beta = check_positive("beta", beta)
    if radius is None:
        base = check_positive("base", base)
        if base <= 1:
            raise ValueError(f"base: must be > 1, got {base}")
        return float(_finite("level", beta * _power("level", base, check_int("level", level))))
    return beta * check_positive("q_norm", q_norm, allow_zero=True) * check_positive("radius", radius,
                                                                                      allow_zero=True)


def prop2_level(gamma, beta, base) -> int:
    """Prop. 2: the level l = max{l in Z : b^l <= log(gamma) / (2 beta)} at which max P/Q <= gamma (unit norms,
    strong covering as the paper assumes). Alg. 2 line 3 prints the same value as (2/beta) log gamma^(1/2)."""
    gamma = check_positive("gamma", gamma)
    if gamma <= 1:
        raise ValueError(f"gamma: must be > 1 (max P/Q >= 1 always), got {gamma}")
    beta = check_positive("beta", beta)
    base = check_positive("base", base)
    if base <= 1:
        raise ValueError(f"base: must be > 1, got {base}")
    x = math.log(gamma) / (2.0 * beta)
    lv = math.floor(math.log(x) / math.log(base))
    while base ** (lv + 1) <= x:
        lv += 1
    while base ** lv > x:
        lv -= 1
    return int(lv)


def prop6_drift(w, eta, beta, L, M) -> float:
    """Prop. 6: after w SGD steps at learning rate eta every pairwise target distance moves by at most
    U = 4 w eta beta L M (A1: encoders L-Lipschitz in their parameters; A2: gradient norm < M)."""
    w = check_int("w", w, low=0)
    return 4.0 * w * check_positive("eta", eta, allow_zero=True) * check_positive("beta", beta) * \
        check_positive("L", L, allow_zero=True) * check_positive("M", M, allow_zero=True)

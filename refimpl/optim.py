"""Adam with learning-rate warm-up and linear decay, dense or lazy (sparse) (the paper trains both encoders with
Adam, §6).

Adam (Kingma & Ba 2015) with bias correction, applied in place to a list of float64 arrays (e.g.
``encoder.params == [A, B]``). A parameter's last axis indexes its *columns* (for an encoder matrix of shape
``(dim, n_features)`` a column is one feature's weights); every column ``j`` has its own step count ``t_j``.
One update of column ``j`` with gradient ``g`` at global step ``t`` (learning rate ``lr_t`` below):

    t_j <- t_j + 1;  m_j <- b1 m_j + (1 - b1) g;  v_j <- b2 v_j + (1 - b2) g^2
    p_j <- p_j - lr_t * (m_j / (1 - b1^t_j)) / (sqrt(v_j / (1 - b2^t_j)) + eps)

- Dense step (the gradient is an array of the parameter's shape): every column is updated, so ``t_j = t`` for all
  ``j`` and this is textbook Adam, column for column.
- Lazy step (the gradient is a :class:`ColumnGrad` ``(cols, values)``: the gradient is zero outside ``cols``):
  only the listed columns are updated; the others keep ``p``, ``m``, ``v`` and ``t_j`` unchanged. The cost is
  ``O(dim * len(cols))`` whatever ``n_features``. The difference from dense Adam on the same (zero-padded)
  gradient: dense Adam also moves an untouched column by its decaying momentum,
  ``p_j -= lr_t (b1^k m_j / c1) / (sqrt(b2^k v_j / c2) + eps)`` after ``k`` steps without gradient, and decays its
  moments; lazy Adam skips those moves and corrects the bias with the column's own count ``t_j`` (the number of
  steps in which the column had a gradient). When every column is in ``cols`` at every step the two coincide
  exactly.

Learning-rate schedule at global step ``t`` (1-based, the step being taken):

- warm-up: ``lr * t / warmup_steps`` for ``t <= warmup_steps``;
- then, if ``total_steps`` is given, linear decay ``lr * (total_steps - t) / (total_steps - warmup_steps)``,
  reaching 0 at ``t = total_steps`` and staying 0 afterwards (further steps do not move the parameters);
- otherwise constant ``lr``.
"""
from __future__ import annotations

from typing import NamedTuple

import numpy as np
from numba import njit

from refimpl._validate import check_int, check_positive

__all__ = ["Adam", "ColumnGrad"]


class ColumnGrad(NamedTuple):
    """A gradient that is zero outside some columns: ``values[..., c]`` is the gradient of column ``cols[c]``.

    cols : (c,) int64, distinct column indices. values : (dim, c) float64 for a (dim, F) parameter, (c,) for a
    1-D one.
    """

    cols: np.ndarray
    values: np.ndarray


@njit(cache=True)
def _lazy_adam_kernel(PT, MT, VT, counts, cols, GT, lr, b1, b2, eps):  # pragma: no cover - compiled
    """The lazy update of the module docstring on columns ``cols``, given the transposed (F, dim) views ``PT, MT,
    VT`` of the parameter and its moments and the (len(cols), dim) gradient ``GT``: one row per column, contiguous
    when the parameter is stored column-major (as the encoder's are)."""
    dim = PT.shape[1]
    for c in range(cols.shape[0]):
        j = cols[c]
        t = counts[j] + 1
        counts[j] = t
        c1 = 1.0 - b1 ** t
        c2 = 1.0 - b2 ** t
        for d in range(dim):
            g = GT[c, d]
            m = b1 * MT[j, d] + (1.0 - b1) * g
            v = b2 * VT[j, d] + (1.0 - b2) * g * g
            MT[j, d] = m
            VT[j, d] = v
            if lr > 0.0:
                PT[j, d] -= lr * (m / c1) / (np.sqrt(v / c2) + eps)


class Adam:
    """``Adam(params, lr, *, betas=(0.9, 0.999), eps=1e-8, warmup_steps=0, total_steps=None)``.

    Parameters
    ----------
    params : list of float64 ``numpy.ndarray`` updated in place by :meth:`step` (arrays of another dtype are
        rejected, because an in-place update of a converted copy would silently do nothing).
    lr : peak learning rate (> 0). betas, eps : Adam's moment decays (in [0, 1)) and denominator offset (> 0).
    warmup_steps, total_steps : the schedule of the module docstring.

    Attributes
    ----------
    t : global steps taken. m, v : first and second moments (one array per parameter).
    counts : per parameter, the (n_columns,) int64 step count of every column (last axis), ``t_j`` above.
    """

    def __init__(self, params, lr: float, *, betas=(0.9, 0.999), eps: float = 1e-8, warmup_steps: int = 0,
                 total_steps: int | None = None):
        if isinstance(params, np.ndarray) or not isinstance(params, (list, tuple)):
            raise TypeError(f"params: expected a list of numpy arrays, got {type(params).__name__}")
        if len(params) == 0:
            raise ValueError("params: is empty")
        for j, p in enumerate(params):
            if not isinstance(p, np.ndarray) or p.dtype != np.float64:
                raise TypeError(f"params[{j}]: expected a float64 numpy array, got "
                                f"{type(p).__name__} {getattr(p, 'dtype', '')}")
            if not p.flags.writeable:
                raise ValueError(f"params[{j}]: array is read-only")
        self.params = list(params)
        self.lr = check_positive("lr", lr)
        if not isinstance(betas, (tuple, list)) or len(betas) != 2:
            raise ValueError(f"betas: expected a pair (beta1, beta2), got {betas!r}")
        b1 = check_positive("betas[0]", betas[0], allow_zero=True)
        b2 = check_positive("betas[1]", betas[1], allow_zero=True)
        if b1 >= 1.0 or b2 >= 1.0:
            raise ValueError(f"betas: both must be in [0, 1), got {betas!r}")
        self.betas = (b1, b2)
        self.eps = check_positive("eps", eps)
        self.warmup_steps = check_int("warmup_steps", warmup_steps, low=0)
        if total_steps is not None:
            total_steps = check_int("total_steps", total_steps, low=1)
            if total_steps <= self.warmup_steps:
                raise ValueError(f"total_steps: must exceed warmup_steps ({self.warmup_steps}), got {total_steps}")
        self.total_steps = total_steps
        self.t = 0
        self.m = [np.zeros_like(p) for p in self.params]
        self.v = [np.zeros_like(p) for p in self.params]
        self.counts = [np.zeros(p.shape[-1:], dtype=np.int64) for p in self.params]

    def lr_at(self, t: int) -> float:
        """Learning rate used by step ``t`` (1-based), per the schedule in the module docstring."""
        t = check_int("t", t, low=1)
        if self.warmup_steps and t <= self.warmup_steps:
            return self.lr * t / self.warmup_steps
        if self.total_steps is None:
            return self.lr
        return self.lr * max(0.0, (self.total_steps - t) / (self.total_steps - self.warmup_steps))

    @property
    def current_lr(self) -> float:
        """The learning rate the next :meth:`step` will use."""
        return self.lr_at(self.t + 1)

    def _check_grad(self, j: int, g, p: np.ndarray):
        if isinstance(g, tuple):  # ColumnGrad or a plain (cols, values) pair
            if len(g) != 2 or p.ndim not in (1, 2):
                raise ValueError(f"grads[{j}]: a column gradient is a (cols, values) pair for a 1-D or 2-D "
                                 f"parameter (this one has shape {p.shape})")
            cols = np.asarray(g[0])
            if cols.ndim != 1 or (cols.size and not np.issubdtype(cols.dtype, np.integer)):
                raise ValueError(f"grads[{j}]: cols must be a 1-D integer array")
            cols = cols.astype(np.int64)
            if cols.size and (cols.min() < 0 or cols.max() >= p.shape[-1]):
                raise ValueError(f"grads[{j}]: cols must be in [0, {p.shape[-1]})")
            if cols.size > 1 and not np.all(cols[1:] > cols[:-1]) and np.unique(cols).size != cols.size:
                raise ValueError(f"grads[{j}]: cols must be distinct")
            vals = np.asarray(g[1], dtype=np.float64)
            if vals.shape != p.shape[:-1] + (cols.size,):
                raise ValueError(f"grads[{j}]: values must have shape {p.shape[:-1] + (cols.size,)}, "
                                 f"got {vals.shape}")
            if not np.all(np.isfinite(vals)):
                raise ValueError(f"grads[{j}]: contains NaN or Inf")
            return ColumnGrad(cols, vals)
        g = np.asarray(g, dtype=np.float64)
        if g.shape != p.shape:
            raise ValueError(f"grads[{j}]: expected shape {p.shape}, got {g.shape}")
        if not np.all(np.isfinite(g)):
            raise ValueError(f"grads[{j}]: contains NaN or Inf")
        return g

    def step(self, grads) -> float:
        """One Adam update of every parameter in place; returns the learning rate used.

        ``grads``: one entry per parameter, either a dense array of the parameter's shape (dense step) or a
        :class:`ColumnGrad` (lazy step on those columns only); see the module docstring for both formulas.
        """
        if isinstance(grads, np.ndarray) or not isinstance(grads, (list, tuple)) or isinstance(grads, ColumnGrad):
            raise TypeError(f"grads: expected a list of arrays, got {type(grads).__name__}")
        if len(grads) != len(self.params):
            raise ValueError(f"grads: expected {len(self.params)} arrays (one per parameter), got {len(grads)}")
        gs = [self._check_grad(j, g, p) for j, (g, p) in enumerate(zip(grads, self.params))]
        self.t += 1
        lr = self.lr_at(self.t)
        b1, b2 = self.betas
        for p, g, m, v, cnt in zip(self.params, gs, self.m, self.v, self.counts):
            if isinstance(g, ColumnGrad):
                PT, MT, VT, GT = (a.reshape(1, -1).T if a.ndim == 1 else a.T for a in (p, m, v, g.values))
                _lazy_adam_kernel(PT, MT, VT, cnt, g.cols, np.ascontiguousarray(GT), lr, b1, b2, self.eps)
                continue
            cnt += 1
            c1 = 1.0 - b1 ** cnt
            c2 = 1.0 - b2 ** cnt
            m *= b1
            m += (1.0 - b1) * g
            v *= b2
            v += (1.0 - b2) * (g * g)
            if lr > 0.0:
                p -= lr * (m / c1) / (np.sqrt(v / c2) + self.eps)
        return lr

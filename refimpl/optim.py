"""Adam with learning-rate warm-up and linear decay (PAPER.md §6: the paper trains both encoders with Adam).

Adam (Kingma & Ba 2015) with bias correction, applied in place to a list of float64 arrays (e.g.
``encoder.params == [A, B]``). Learning-rate schedule at step ``t`` (1-based, the step being taken):

- warm-up: ``lr * t / warmup_steps`` for ``t <= warmup_steps``;
- then, if ``total_steps`` is given, linear decay ``lr * (total_steps - t) / (total_steps - warmup_steps)``,
  reaching 0 at ``t = total_steps`` and staying 0 afterwards (further steps do not move the parameters);
- otherwise constant ``lr``.
"""
from __future__ import annotations

import numpy as np

from refimpl._validate import check_int, check_positive

__all__ = ["Adam"]


class Adam:
    """``Adam(params, lr, *, betas=(0.9, 0.999), eps=1e-8, warmup_steps=0, total_steps=None)``.

    ``params``: list of float64 ``numpy.ndarray`` updated in place by :meth:`step` (arrays of another dtype are
    rejected, because an in-place update of a converted copy would silently do nothing).
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

    def step(self, grads) -> float:
        """One Adam update of every parameter in place with ``grads`` (same shapes); returns the lr used."""
        if isinstance(grads, np.ndarray) or not isinstance(grads, (list, tuple)):
            raise TypeError(f"grads: expected a list of arrays, got {type(grads).__name__}")
        if len(grads) != len(self.params):
            raise ValueError(f"grads: expected {len(self.params)} arrays (one per parameter), got {len(grads)}")
        gs = []
        for j, (g, p) in enumerate(zip(grads, self.params)):
            g = np.asarray(g, dtype=np.float64)
            if g.shape != p.shape:
                raise ValueError(f"grads[{j}]: expected shape {p.shape}, got {g.shape}")
            if not np.all(np.isfinite(g)):
                raise ValueError(f"grads[{j}]: contains NaN or Inf")
            gs.append(g)
        self.t += 1
        lr = self.lr_at(self.t)
        b1, b2 = self.betas
        c1 = 1.0 - b1 ** self.t
        c2 = 1.0 - b2 ** self.t
        for p, g, m, v in zip(self.params, gs, self.m, self.v):
            m *= b1
            m += (1.0 - b1) * g
            v *= b2
            v += (1.0 - b2) * (g * g)
            if lr > 0.0:
                p -= lr * (m / c1) / (np.sqrt(v / c2) + self.eps)
        return lr

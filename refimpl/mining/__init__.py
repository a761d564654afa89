"""Negative miners behind one interface (paper §5, Alg. 4) and their registry.

:mod:`refimpl.mining.base` defines the interface (``Miner``, ``MinerContext``, ``Batch``, ``Negatives``),
:mod:`refimpl.mining.baselines` the paper's baselines, :mod:`refimpl.mining.dynnibal` DyNNIBAL. ``MINERS`` maps
each CLI name to its class; :func:`make_miner` builds one from CLI knobs.
"""
from __future__ import annotations

import inspect

from refimpl.mining.base import Batch, Miner, MinerContext, Negatives
from refimpl.mining.baselines import (BruteForceTopK, FullSoftmax, InBatch, NegativeCache, StochasticNegativeMining,
                                      Uniform)
from refimpl.mining.dynnibal import DyNNIBAL

__all__ = ["Negatives", "Batch", "MinerContext", "Miner", "InBatch", "Uniform", "StochasticNegativeMining",
           "NegativeCache", "BruteForceTopK", "FullSoftmax", "DyNNIBAL", "MINERS", "make_miner", "miner_names"]

MINERS = {
    "in-batch": InBatch,
    "uniform": Uniform,
    "snm": StochasticNegativeMining,
    "negative-cache": NegativeCache,
    "brute-force": BruteForceTopK,
    "full-softmax": FullSoftmax,
    "dynnibal": DyNNIBAL,
}


def miner_names() -> list[str]:
    """CLI names of every miner (the keys of ``MINERS``)."""
    return sorted(MINERS)


def make_miner(name: str, **knobs) -> Miner:
    """Build a miner by its CLI name (:func:`miner_names`).

    Knobs that the miner's constructor does not take, or that are None, are ignored (so one CLI can pass a common
    set).
    """
    cls = MINERS.get(name)
    if cls is None:
        raise ValueError(f"miner: unknown name {name!r}; choose from {', '.join(miner_names())}")
    params = inspect.signature(cls.__init__).parameters
    return cls(**{k: v for k, v in knobs.items() if k in params and v is not None})

"""refimpl: the reference implementation of DyNNIBAL (Monath, Zaheer, Allen, McCallum, AISTATS 2023).

The public contract (names that never move for users) is re-exported here. Names are resolved lazily (PEP 562) so that
``import refimpl`` is cheap and does not trigger Numba compilation of modules you do not use.
"""
from __future__ import annotations

import importlib

__version__ = "0.1.0"

_EXPORTS = {
    # encoders.py
    "LinearDualEncoder": "encoders",
    # sgtree.py
    "SGTree": "index.sgtree",
    # clustering.py
    "find_clustering": "sampling.clustering",
    "certify": "sampling.clustering",
    # samplers.py
    "sample_exact": "sampling.samplers",
    "sample_rejection": "sampling.samplers",
    "sample_adaptive": "sampling.samplers",
    "sample_astar": "sampling.samplers",
    "sample_mh": "sampling.samplers",
    "topk": "index.search",
    # nystrom.py
    "Nystrom": "nystrom",
    "RegressionReEncoder": "nystrom",
    # miners.py
    "InBatch": "mining",
    "Uniform": "mining",
    "StochasticNegativeMining": "mining",
    "NegativeCache": "mining",
    "BruteForceTopK": "mining",
    "FullSoftmax": "mining",
    "DyNNIBAL": "mining",
    # training.py
    "train": "training",
    # data.py, text.py
    "planted_dataset": "data",
    "load_text_pairs": "text",
}

__all__ = sorted(_EXPORTS) + ["__version__"]


def __getattr__(name: str):
    module = _EXPORTS.get(name)
    if module is None:
        raise AttributeError(f"module 'refimpl' has no attribute {name!r}")
    value = getattr(importlib.import_module(f"refimpl.{module}"), name)
    globals()[name] = value
    return value


def __dir__():
    return __all__

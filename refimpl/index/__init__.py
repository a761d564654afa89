"""The SG tree and exact search (paper §3.3, §3.5): the index layer.

Public names other layers may use: :class:`SGTree`, :class:`TreeArrays` (the struct-of-arrays view every kernel
takes, from ``SGTree.arrays()``) and its counter indices ``ROOT``, ``N_NODES``, ``FREE_TOP``, ``N_DIST``;
:class:`Clustering` (the one clustering type); :func:`topk`, :func:`brute_force_topk`; and the Numba row
primitives ``dot``, ``sqdist``, ``dist``, ``sqnorm``, ``dot_sqdist``, ``prefetch_row`` (float64 or float32 rows,
float64 accumulation) for the kernels of higher layers.
"""
from refimpl.index._arrays import FREE_TOP, N_DIST, N_NODES, ROOT, TreeArrays
from refimpl.index._distance import dist, dot, dot_sqdist, prefetch_row, sqdist, sqnorm
from refimpl.index.clusters import Clustering
from refimpl.index.sgtree import DEFAULT_BASE, SGTree
from refimpl.index.search import TopKResult, brute_force_topk, topk

__all__ = ["TreeArrays", "ROOT", "N_NODES", "FREE_TOP", "N_DIST", "Clustering", "SGTree", "DEFAULT_BASE", "topk",
           "brute_force_topk", "TopKResult", "dot", "sqdist", "dist", "sqnorm", "dot_sqdist", "prefetch_row"]

"""The SG tree and exact search (paper §3.3, §3.5): the index layer.

Public names other layers may use: :class:`SGTree`, :class:`TreeArrays` (the struct-of-arrays view every kernel
takes) and its counter indices, :class:`Clustering` (the one clustering type), :func:`topk`.
"""
from refimpl.index._arrays import FREE_TOP, N_DIST, N_NODES, ROOT, TreeArrays
from refimpl.index.clusters import Clustering

__all__ = ["TreeArrays", "ROOT", "N_NODES", "FREE_TOP", "N_DIST", "Clustering"]

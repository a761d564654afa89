"""TreeArrays: the one struct-of-arrays view of an SG tree that every Numba kernel takes.

Field names are the :class:`refimpl.index.sgtree.SGTree` attribute names (one naming everywhere). ``state`` holds
the tree's counters, indexed by the named constants below (never by bare numbers).
"""
from __future__ import annotations

from typing import NamedTuple

import numpy as np

__all__ = ["TreeArrays", "ROOT", "N_NODES", "FREE_TOP", "N_DIST"]

# indices into TreeArrays.state
ROOT = 0  # root node (-1 when empty)
N_NODES = 1  # node slots in use (live or freed)
FREE_TOP = 2  # height of the free-node stack
N_DIST = 3  # distance computations so far (work counter)


class TreeArrays(NamedTuple):
    """Per target: ``points`` (capacity, D), ``point_node``. Per node: representative ``node_point``, ``node_level``,
    ``node_parent``, ``node_first_child`` / ``node_next_sibling`` (children by descending level), ``node_count``
    (targets below, representative included), ``node_maxd`` (>= max distance to a descendant), ``node_mind``,
    ``node_pdist`` (distance to the parent's representative), ``node_maxnorm``, ``node_sepslack``; ``free_stack``;
    ``state`` (counters, see the module constants); ``base`` (b)."""

    points: np.ndarray
    point_node: np.ndarray
    node_point: np.ndarray
    node_level: np.ndarray
    node_parent: np.ndarray
    node_first_child: np.ndarray
    node_next_sibling: np.ndarray
    node_count: np.ndarray
    node_maxd: np.ndarray
    node_mind: np.ndarray
    node_pdist: np.ndarray
    node_maxnorm: np.ndarray
    node_sepslack: np.ndarray
    free_stack: np.ndarray
    state: np.ndarray
    base: float

"""The one clustering type: C_(l) of an SG tree, the clusterings of Alg. 2, and partitions given as arrays (paper §3,
Eq. 7).

A cluster of a tree is a pair (v, L): the representative p_v plus the subtrees of the children of v with level < L.
A clustering of a tree records the tree's ``version`` when it was computed; every consumer
(:func:`Clustering.check_tree`) refuses it on a tree of another version, so a clustering never outlives the tree
state it describes. A partition given as arrays (no tree) carries its members instead.
"""
from __future__ import annotations

from dataclasses import dataclass, field

import numpy as np

__all__ = ["Clustering"]


@dataclass
class Clustering:
    """A partition of the live targets into clusters with certified radii.

    Cluster i has tree node ``nodes[i]`` at level ``levels[i]`` (the pair (v, L) above), representative target
    ``reps[i]``, ``sizes[i]`` targets and every member within ``radii[i]`` of the representative (rho(v, L) =
    min(MAXD(v), max_c PDIST(c) + MAXD(c)) over the children c of level < L; never the b^L of Prop. 1).

    Parameters
    ----------
    level : int or None
        L for C_(L) (then ``levels`` defaults to L everywhere); None for mixed levels (Alg. 2) or array partitions.
    nodes, reps, sizes : (C,) int64
    radii : (C,) float64
    levels : (C,) int64, optional
    tree_version : int or None
        ``SGTree.version`` when computed (None for an array partition).
    mptr, members : (C + 1,) and (N,) int64, optional
        Array partitions: the members of cluster i are ``members[mptr[i]:mptr[i + 1]]``.
    stats : dict
        Work counters and, after certified refinement, the certificate.
    """

    level: int | None
    nodes: np.ndarray
    reps: np.ndarray
    sizes: np.ndarray
    radii: np.ndarray
    levels: np.ndarray | None = None
    tree_version: int | None = None
    mptr: np.ndarray | None = None
    members: np.ndarray | None = None
    stats: dict = field(default_factory=dict)

    def __post_init__(self):
        if self.levels is None and self.level is not None:
            self.levels = np.full(np.asarray(self.nodes).shape[0], int(self.level), np.int64)

    def __len__(self) -> int:
        return int(np.asarray(self.reps).shape[0])

    @property
    def is_partition(self) -> bool:
        """True for a partition given as arrays (members listed), False for clusters of a tree."""
        return self.members is not None

    def check_tree(self, tree, name: str = "clustering") -> None:
        """Raise ValueError unless this clustering describes ``tree`` in its current state (same ``version``)."""
        if self.is_partition:
            raise ValueError(f"{name}: an array partition has no tree; pass the points array instead of a tree")
        if self.tree_version is None:
            raise ValueError(f"{name}: records no tree version; compute it with tree.clustering, find_clustering "
                             "or refimpl.sampling.clustering.tree_clustering")
        if self.tree_version != tree.version:
            raise ValueError(f"{name}: computed on tree version {self.tree_version}, but the tree is at version "
                             f"{tree.version} (it was mutated since, or it is another tree); recompute it")

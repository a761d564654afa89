"""The clustering type: C_(l) of an SG tree and the clusterings Alg. 2 returns (paper §3, Eq. 7)."""
from __future__ import annotations

from dataclasses import dataclass

import numpy as np

__all__ = ["Clustering"]


@dataclass
class Clustering:
    """The clustering C_(level) of PAPER.md §3: cluster i has node ``nodes[i]``, representative target ``reps[i]``,
    ``sizes[i]`` targets and every member within ``radii[i]`` of the representative (rho(v, level))."""

    level: int
    nodes: np.ndarray
    reps: np.ndarray
    sizes: np.ndarray
    radii: np.ndarray

    def __len__(self) -> int:
        return int(self.nodes.shape[0])

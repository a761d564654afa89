"""SGTree: a compressed, dynamic SG tree (stable greedy cover tree) with certified radii (paper §3.3, §4, Alg. 3).

Data model (struct of arrays, one explicit node per live target, the lower "self-children" implicit; field names
as in :class:`refimpl.index.TreeArrays`): ``points`` (capacity, D), float64 or float32 rows (row = target id; all
geometry is computed in float64 from the stored values); per node ``node_point``, ``node_level`` (highest level of
its target), ``node_parent``, ``node_first_child`` / ``node_next_sibling`` (children by DESCENDING level),
``node_count``, ``node_maxd`` (>= distance from the representative to any descendant; exact after build/insert),
``node_mind`` (<= min pairwise distance within a child group), ``node_pdist`` (exact distance to the parent's
representative), ``node_maxnorm`` (>= max squared norm below; used by :func:`refimpl.index.search.topk`),
``node_sepslack`` (<= min over child groups of level l of (smallest non-identical pair distance) - b^l).

Definitions (the paper's erratum, §4):
* Covering in the cover-tree PARENT-CHILD form: a child c of level l has d(p_v, p_c) <= b^(l+1); a descendant can
  thus be b^(l+1)/(b-1) away, so every certified bound uses rho(v, L) = min(MAXD(v), max_c PDIST(c) + MAXD(c)).
  A freshly built tree even has strong covering (Prop. 1 as printed); moved points keep only the parent-child form.
* Separation: the explicit child group of cluster (v, l+1) (p_v and its children of level l) is pairwise >= b^l
  apart, except identical points (a copy of p_v goes to :func:`refimpl.index._kernels.duplicate_level`).
* Insertion (Zaheer et al. 2019): descend into the nearest covering child that is strictly nearer than p_v, else
  attach at the first level where the self-child no longer covers. The batch build does the same coarse-to-fine;
  ``rebuild`` runs it again in place over the live targets (after a re-encode has moved them all).
* Alg. 3 (``maintain``) with Eq. 10/11 in this covering form; ``granularity="child"`` cuts only the offending
  children and reinserts them under (v, l+1).

Numerical domain (checked at every entry): base in [MIN_BASE, MAX_BASE]; coordinates with magnitude <= MAX_ABS
(squared distances stay finite) and no non-zero coordinate below MIN_ABS (differences never go subnormal, so the
levels b^l stay exact); levels within +-LEVEL_LIMIT. ``save`` is atomic; ``load`` verifies every number.
"""
from __future__ import annotations

import itertools

import numpy as np

from refimpl.index import _build as KB
from refimpl.index import _io
from refimpl.index import _kernels as K
from refimpl.index._arrays import FREE_TOP, N_NODES, ROOT, TreeArrays
from refimpl.index._domain import (LEVEL_LIMIT, MAX_ABS, MAX_BASE, MIN_ABS, MIN_BASE, check_base, check_dtype,
                                   check_level, check_points)
from refimpl.index.check import check_tree
from refimpl.index.clusters import Clustering
from refimpl._validate import as_rng, check_ids, check_int, check_positive

__all__ = ["SGTree", "Clustering", "DEFAULT_BASE", "MIN_BASE", "MAX_BASE", "MAX_ABS", "MIN_ABS", "LEVEL_LIMIT"]

DEFAULT_BASE = 1.2
MAX_TARGETS = 2**31 - 3  # target ids, node ids and positions fit the batch kernels' int32 scratch
_VERSIONS = itertools.count(1)  # tree versions: process-wide, strictly increasing
_NODE_INT = _io.NODE_INT
_NODE_FLOAT = _io.NODE_FLOAT


def _run_ids(starts, levels):
    """Index of the run of equal (start, level) each position belongs to."""
    if starts.size == 0:
        return starts
    change = np.r_[True, (starts[1:] != starts[:-1]) | (levels[1:] != levels[:-1])]
    return np.cumsum(change)


class SGTree:
    """Compressed SG tree over the rows of a float64 (default) or float32 matrix (Euclidean distance); see the
    module docstring.

    Parameters
    ----------
    dim : dimension D of the points (>= 1).
    base : b in [MIN_BASE, MAX_BASE]; cluster (v, l) holds targets within rho(v, l) <= b^(l+1)/(b-1) of p_v.
    capacity : initial number of target / node slots (grown by doubling).
    dtype : float64 or float32 storage of the points (the geometry is always computed in float64).
    """

    def __init__(self, dim: int, *, base: float = DEFAULT_BASE, capacity: int = 16, dtype=np.float64):
        self.dim = check_int("dim", dim, low=1, itemsize=8)
        self.base = check_base(base)
        dtype = check_dtype(dtype)
        cap = max(1, check_int("capacity", capacity, low=0, itemsize=8 * self.dim))
        self.points = np.zeros((cap, self.dim), dtype=dtype)
        self.point_node = np.full(cap, -1, dtype=np.int64)
        self.n_targets = 0  # target ids handed out so far (removed ids are not reused)
        for name in _NODE_INT:
            setattr(self, name, np.full(cap, -1, dtype=np.int64))
        for name in _NODE_FLOAT:
            setattr(self, name, np.zeros(cap))
        self.free_stack = np.zeros(cap, dtype=np.int64)
        self._state = np.zeros(4, dtype=np.int64)  # counters, indexed by ROOT, N_NODES, FREE_TOP, N_DIST
        self._state[ROOT] = -1
        self.version = next(_VERSIONS)  # new at every mutation, unique across trees; derived objects record it

    # ------------------------------------------------------------------ basic properties
    @property
    def root(self) -> int:
        return int(self._state[ROOT])

    @property
    def n_nodes(self) -> int:
        return int(self._state[N_NODES])

    @property
    def dtype(self) -> np.dtype:
        """The storage type of the points (float64 or float32)."""
        return self.points.dtype

    def __len__(self) -> int:
        return 0 if self.root == -1 else int(self.node_count[self.root])

    def live_ids(self) -> np.ndarray:
        """Target ids currently in the tree, ascending."""
        return np.flatnonzero(self.point_node[: self.n_targets] >= 0).astype(np.int64)

    def copy(self) -> "SGTree":
        """An independent deep copy."""
        other = SGTree.__new__(SGTree)
        other.__dict__.update({k: (v.copy() if isinstance(v, np.ndarray) else v) for k, v in self.__dict__.items()})
        return other

    def arrays(self) -> TreeArrays:
        """The struct-of-arrays view every kernel takes (no copy; valid until the next mutation)."""
        return TreeArrays(self.points, self.point_node, self.node_point, self.node_level, self.node_parent,
                          self.node_first_child, self.node_next_sibling, self.node_count, self.node_maxd,
                          self.node_mind, self.node_pdist, self.node_maxnorm, self.node_sepslack, self.free_stack,
                          self._state, self.base)

    def _tuning(self) -> tuple[int, int]:
        """(gather, max_kids) of the batch kernels (:func:`refimpl.index._build.batch_place`): speed only, the
        tree built does not depend on them."""
        return KB.gather_rows(self.points), KB.GEMM_MAX_KIDS

    def _reserve(self, extra_targets: int, extra_nodes: int) -> None:
        need_t = self.n_targets + extra_targets
        if max(need_t, self.n_nodes + extra_nodes) > MAX_TARGETS:
            raise ValueError(f"points: an SGTree holds at most {MAX_TARGETS} targets (the kernels' int32 scratch)")
        if need_t > self.points.shape[0]:
            cap = max(need_t, 2 * self.points.shape[0])
            pts = np.zeros((cap, self.dim), dtype=self.points.dtype)
            pts[: self.n_targets] = self.points[: self.n_targets]
            self.points = pts
            pn = np.full(cap, -1, dtype=np.int64)
            pn[: self.n_targets] = self.point_node[: self.n_targets]
            self.point_node = pn
        need_n = self.n_nodes + extra_nodes
        if need_n > self.node_point.shape[0]:
            cap = max(need_n, 2 * self.node_point.shape[0])
            for name in _NODE_INT + _NODE_FLOAT + ("free_stack",):
                old = getattr(self, name)
                new = np.full(cap, -1, dtype=old.dtype) if old.dtype == np.int64 else np.zeros(cap)
                new[: old.shape[0]] = old
                setattr(self, name, new)

    # ------------------------------------------------------------------ construction
    @classmethod
    def build(cls, points, *, base: float = DEFAULT_BASE, rng=None, order: str = "random",
              method: str = "batch", dtype=np.float64, copy: bool = True) -> "SGTree":
        """Build over the rows of ``points`` (target id = row index).

        Parameters
        ----------
        points : (N, D) real array (finite, magnitudes in {0} U [MIN_ABS, MAX_ABS]).
        base : b in [MIN_BASE, MAX_BASE].
        rng : Generator or int seed (picks the root and the scan order of the greedy nets when ``order="random"``).
        order : "random" (default) or "given" (row order).
        method : "batch" (default; divisive construction, :func:`refimpl.index._build.batch_place`: the same
            invariants as insertion, coarse-to-fine, cache-friendly) or "insert" (one SG insertion per point).
        dtype : float64 (default) or float32 storage of the points (half the memory; the tree is built over the
            float32-rounded points and every statistic is computed in float64 from them, so all bounds hold).
        copy : with False, a C-contiguous ``points`` array already of ``dtype`` becomes the tree's storage without a
            copy (for data near the memory limit; the caller must not modify it afterwards).
        """
        dtype = check_dtype(dtype)
        pts = check_points("points", points, dtype=dtype)
        if order not in ("random", "given"):
            raise ValueError(f"order: expected 'random' or 'given', got {order!r}")
        if method not in ("batch", "insert"):
            raise ValueError(f"method: expected 'batch' or 'insert', got {method!r}")
        tree = cls(pts.shape[1], base=base, capacity=0, dtype=dtype)
        shared = isinstance(points, np.ndarray) and np.shares_memory(pts, points)
        tree.points = pts.copy() if shared and copy else pts  # the tree owns its rows
        tree.point_node = np.full(pts.shape[0], -1, dtype=np.int64)
        tree._reserve(0, pts.shape[0])
        tree.n_targets = pts.shape[0]
        ids = np.arange(pts.shape[0], dtype=np.int64)
        perm = as_rng(rng).permutation(ids) if order == "random" else ids
        if method == "insert":
            tree._insert_ids(perm)
        else:
            KB.batch_build(tree.arrays(), perm, *tree._tuning())
        return tree

    def rebuild(self, points=None, *, rng=None, copy: bool = True) -> None:
        """A fresh batch build (as :meth:`build`, random order) over the live targets, in place: the ids stay, the
        nodes are renumbered. With ``points`` the targets first move to their new rows.

        After a re-encode (Alg. 5) every representation moves, and ``update_points`` + Alg. 3 would detach and
        reinsert almost every target anyway; this skips the statistics update and the marking pass. The result
        satisfies every invariant of a built tree (strong covering included); Alg. 3's drift margin is not needed
        by it, since no old part is kept.

        Parameters
        ----------
        points : None (rebuild over the current rows) or an (n_targets, D) matrix whose row i is the new point of
            target i (rows of removed targets are stored but unused); validated like :meth:`build`'s.
        rng : Generator or int seed (root and scan order).
        copy : with False, a C-contiguous ``points`` already of the tree's dtype becomes the tree's storage
            without a copy (the caller must not modify it afterwards).
        """
        if points is not None:
            pts = check_points("points", points, self.dim, dtype=self.dtype)
            if pts.shape[0] != self.n_targets:
                raise ValueError(f"points: expected {self.n_targets} rows (one per target id), got {pts.shape[0]}")
            if not copy:
                self.points = pts
            elif pts is not self.points:
                self.points[: self.n_targets] = pts
            if self.points.shape[0] != self.point_node.shape[0]:  # adopted storage: capacities stay equal
                pn = np.full(self.points.shape[0], -1, dtype=np.int64)
                pn[: self.n_targets] = self.point_node[: self.n_targets]
                self.point_node = pn
        self.version = next(_VERSIONS)
        perm = as_rng(rng).permutation(self.live_ids())
        self.point_node[:] = -1
        self._state[ROOT] = -1
        self._state[N_NODES] = 0
        self._state[FREE_TOP] = 0
        if perm.size:
            KB.batch_build(self.arrays(), perm, *self._tuning())

    def _insert_ids(self, xs, starts=None, start_levels=None) -> None:
        self.version = next(_VERSIONS)
        self._reserve(0, xs.shape[0])
        if starts is None:
            starts = np.full(xs.shape[0], -1, dtype=np.int64)
            start_levels = np.zeros(xs.shape[0], dtype=np.int64)
        K.insert_many(self.arrays(), xs, starts, start_levels)

    def insert(self, points) -> np.ndarray:
        """Insert new targets (rows of ``points``); returns their ids (n_targets, n_targets+1, ...)."""
        pts = check_points("points", points, self.dim, dtype=self.dtype)
        m = pts.shape[0]
        self._reserve(m, m)
        ids = np.arange(self.n_targets, self.n_targets + m, dtype=np.int64)
        self.points[ids] = pts
        self.n_targets += m
        self._insert_ids(ids)
        return ids

    def _check_live(self, name, ids):
        arr = check_ids(name, ids, self.n_targets)
        if arr.size and (self.point_node[arr] < 0).any():
            bad = arr[self.point_node[arr] < 0][0]
            raise ValueError(f"{name}: target {int(bad)} is not in the tree (removed)")
        if np.unique(arr).size != arr.size:
            raise ValueError(f"{name}: contains duplicate ids")
        return arr

    def remove(self, ids) -> None:
        """Really remove targets: each removed node's subtree is detached and its other targets reinserted from the
        root (cost: the size of those subtrees)."""
        arr = self._check_live("ids", ids)
        if arr.size == 0:
            return
        out = np.empty(self.n_targets, dtype=np.int64)
        self.version = next(_VERSIONS)
        m = K.remove_nodes(self.arrays(), arr, out)
        self._insert_ids(out[:m].copy())

    # ------------------------------------------------------------------ dynamics (paper §3.5)
    def update_points(self, ids, points, *, repair: bool = True) -> None:
        """New embeddings for targets ``ids``. PDIST becomes exact, MAXD/MAXNORM valid upper bounds and MIND a valid
        lower bound at once (so every certified bound holds immediately), touching only the affected paths. With
        ``repair`` (default) the tree is then made a valid SG tree again by ``maintain(0, granularity="child")``;
        with
        ``repair=False`` covering/separation may be violated until ``maintain(U)`` (Alg. 3) is called."""
        arr = self._check_live("ids", ids)
        pts = check_points("points", points, self.dim, dtype=self.dtype)
        if pts.shape[0] != arr.size:
            raise ValueError(f"points: expected {arr.size} rows (one per id), got {pts.shape[0]}")
        if arr.size == 0:
            return
        self.version = next(_VERSIONS)
        self.points[arr] = pts
        nodes = self.point_node[arr]
        nodes = nodes[np.argsort(self.node_level[nodes], kind="stable")]
        K.update_stats(self.arrays(), nodes)
        if repair:
            self.maintain(0.0, granularity="child")

    def _rebuild_clusters(self, vs, ls, rng) -> int:
        if vs.size == 0:
            return 0
        out = np.empty(self.n_targets, dtype=np.int64)
        starts = np.empty(self.n_targets, dtype=np.int64)
        slev = np.empty(self.n_targets, dtype=np.int64)
        self.version = next(_VERSIONS)
        m = K.detach_clusters(self.arrays(), vs, ls, out, starts, slev)
        if rng is not None:  # shuffle within each cluster's run (runs stay contiguous)
            key = as_rng(rng).random(m)
            order = np.lexsort((key, _run_ids(starts[:m], slev[:m])))
            out[:m], starts[:m], slev[:m] = out[:m][order], starts[:m][order], slev[:m][order]
        self._reserve(0, m)
        KB.rebuild_segments(self.arrays(), out, starts, slev, m, *self._tuning())
        return m

    def rebuild_level(self, level: int, *, rng=None) -> int:
        """Rebuild every cluster of C_(level) (each subtree rooted at that level, re-attached under its
        representative, as the authors' code does). Returns the number of reinserted targets."""
        level = check_level(level)
        if self.root == -1:
            return 0
        c = self.clustering(level)
        return self._rebuild_clusters(c.nodes.copy(), np.full(len(c), level, dtype=np.int64), rng)

    def maintain(self, U: float, *, rng=None, granularity: str = "child") -> dict:
        """Alg. 3 UpdateSGTree for a drift bound U >= 0 (Prop. 6; Eq. 10/11 in our parent-child form, see the
        module docstring); returns statistics. Kept parts of the tree then survive any further drift <= U.

        ``granularity="child"`` (default; rebuild exactly the smallest subtrees that break covering or
        separation): only the failing children (covering failures and one member of each too-close pair) are cut with
        their subtrees and their points reinserted under (v, l+1) (from the root when out of reach); the rest of
        the group is kept. ``granularity="cluster"`` (Alg. 3 exactly as printed): a cluster (v, l+1) whose child
        group fails is emptied and rebuilt under p_v, with everything below it in v; every cluster of level l with
        b^l <= U too. Both leave a valid tree; ``python -m refimpl bench tree`` times both against a full build.
        When most targets moved, :meth:`rebuild` is the cheaper way to the same guarantee."""
        U = check_positive("U", U, allow_zero=True)
        if granularity not in ("cluster", "child"):
            raise ValueError(f"granularity: expected 'cluster' or 'child', got {granularity!r}")
        cap = max(self.n_nodes, 1)
        vs = np.empty(cap, dtype=np.int64)
        ls = np.empty(cap, dtype=np.int64)
        es = np.empty(cap, dtype=np.int64)
        k, ke = K.maintain_mark(self.arrays(), U, granularity == "child", vs, ls, es)
        m = 0
        if ke:
            out = np.empty(self.n_targets, dtype=np.int64)
            starts = np.empty(self.n_targets, dtype=np.int64)
            slev = np.empty(self.n_targets, dtype=np.int64)
            m = K.detach_nodes(self.arrays(), es[:ke].copy(), out, starts, slev)
            self._insert_ids(out[:m].copy(), starts[:m].copy(), slev[:m].copy())
        m2 = self._rebuild_clusters(vs[:k].copy(), ls[:k].copy(), rng)
        return {"clusters_rebuilt": int(k), "subtrees_reinserted": int(ke), "points_reinserted": int(m + m2)}

    # ------------------------------------------------------------------ views
    def clustering(self, level: int) -> Clustering:
        """C_(level): see the data model. Every live target lies in exactly one cluster."""
        level = check_level(level)
        n = max(self.n_nodes, 1)
        nodes = np.empty(n, dtype=np.int64)
        sizes = np.empty(n, dtype=np.int64)
        radii = np.empty(n)
        k = 0 if self.root == -1 else K.clustering_arrays(self.arrays(), level, nodes, sizes, radii)
        nodes = nodes[:k].copy()
        return Clustering(level, nodes, self.node_point[nodes].copy(), sizes[:k].copy(), radii[:k].copy(),
                          tree_version=self.version)

    def children(self, v: int) -> np.ndarray:
        out = []
        c = int(self.node_first_child[v])
        while c != -1:
            out.append(c)
            c = int(self.node_next_sibling[c])
        return np.array(out, dtype=np.int64)

    def subtree_targets(self, v: int, below_level: int | None = None) -> np.ndarray:
        """Targets of cluster(v, below_level) (the whole subtree of v when None)."""
        out, stack = [int(self.node_point[v])], [c for c in self.children(v)
                                                 if below_level is None or self.node_level[c] < below_level]
        while stack:
            u = stack.pop()
            out.append(int(self.node_point[u]))
            stack.extend(self.children(u).tolist())
        return np.array(out, dtype=np.int64)

    def cluster_members(self, clustering: Clustering, i: int) -> np.ndarray:
        return self.subtree_targets(int(clustering.nodes[i]), clustering.level)

    def level_range(self) -> tuple[int, int]:
        """(lowest, highest) level of a live node."""
        live = self.node_point[: self.n_nodes] >= 0
        lv = self.node_level[: self.n_nodes][live]
        return (int(lv.min()), int(lv.max())) if lv.size else (0, 0)

    def depth(self) -> int:
        """Number of explicit nodes on the longest root-to-leaf path."""
        if self.root == -1:
            return 0
        live = np.flatnonzero(self.node_point[: self.n_nodes] >= 0)
        d = np.zeros(self.n_nodes, dtype=np.int64)
        order = live[np.argsort(-self.node_level[live], kind="stable")]
        for v in order:  # parents (higher level) first
            p = self.node_parent[v]
            d[v] = 1 if p < 0 else d[p] + 1
        return int(d[live].max())

    def memory_bytes(self) -> int:
        arrs = [self.points, self.point_node, self.free_stack] + [getattr(self, n) for n in _NODE_INT + _NODE_FLOAT]
        return int(sum(a.nbytes for a in arrs))

    # ------------------------------------------------------------------ checking
    def check_invariants(self, *, geometry: bool = True) -> list[str]:
        """Every violated invariant, as text (empty list = valid); an independent NumPy oracle of the kernels.

        Structure: root, links, descending child levels, child level < parent level, counts, free list, every live
        target in exactly one node. Statistics: PDIST exact, MAXD >= every representative-descendant distance,
        MAXNORM >= every squared norm below, MIND <= the true group minimum. With ``geometry``: covering
        d(p_v, p_c) <= b^(level(c)+1) and sibling separation >= b^l within each child group (identical points
        exempt)."""
        return check_tree(self, geometry=geometry)

    # ------------------------------------------------------------------ persistence
    def save(self, path) -> None:
        """Write the tree to ``path`` (str or os.PathLike) atomically: a versioned .npz (plain arrays, no pickle)
        goes to a temporary file in the same directory, is fsynced, then renamed over ``path``; a failure or a kill
        at any moment leaves the previous file intact."""
        _io.save_tree(self, path)

    @classmethod
    def load(cls, path) -> "SGTree":
        """Load a file written by :meth:`save`. Verifies before returning: format and version, dtypes and shapes,
        finite points of the declared dtype within the numerical domain, base, levels, links, counts, one node per
        live target, and PDIST / MAXD / MAXNORM / MIND / SEPSLACK against a recomputation from the points. Any
        problem raises one ValueError naming the file."""
        tree = _io.load_tree(cls, path)
        tree.version = next(_VERSIONS)
        return tree

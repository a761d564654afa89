"""SGTree: a compressed, dynamic SG tree (stable greedy cover tree) with certified radii (PAPER.md §2-4).

Data model (COMMON.md "SGTree data model", followed exactly; extra arrays are additions, no renames)
------------------------------------------------------------------------------------------------------
One explicit node per live target; its lower "self-children" are implicit. ``points`` (capacity, D) float64 holds
the targets (row = target id). Node arrays, valid for ids < ``n_nodes`` (freed nodes have ``node_point == -1``):
``node_point``, ``node_level`` (highest level of the target), ``node_parent`` (-1 at the root),
``node_first_child`` / ``node_next_sibling`` (children in DESCENDING level order), ``node_maxd`` (>= distance from
the representative to any descendant), ``node_mind`` (see below), ``node_count`` (targets in the subtree,
representative included), ``point_node`` (node of a target, -1 if removed). Additions: ``node_pdist`` (exact
distance to the parent's representative, 0 at the root), ``node_maxnorm`` (>= max squared norm in the subtree,
used by :func:`refimpl.index.search.topk`) and ``node_sepslack`` (<= min over v's child groups of level l of
(smallest non-identical pair distance in the group) - b^l: Alg. 3's separation test for all groups of a node in
one comparison, SEPSLACK >= U; a valid lower bound maintained like MIND).

Definitions we chose (PAPER.md §4 erratum)
------------------------------------------
* Covering is the cover-tree PARENT-CHILD form: a child c of cluster (v, l+1) (i.e. node_level[c] == l) has
  d(p_v, p_c) <= b^(l+1). A descendant j levels down can thus be b^(l+1)/(b-1) away (Σ_k b^k): every certified
  bound uses the radius rho(v, L) = min(MAXD(v), max_c PDIST(c) + MAXD(c)) of the data model, never b^l.
  Observation (tested): our greedy insertion enters a child group of level l only when d(x, p_v) <= b^(l+1), and
  the batch build does the same, so a FRESHLY BUILT tree even satisfies strong covering (every member of a
  level-l cluster within b^l; Prop. 1 as printed holds there). Moving points (update_points + Alg. 3 in the
  parent-child form) keeps only the parent-child form, which is what check_invariants verifies.
* Separation (SG trees: siblings only): the explicit child group of cluster (v, l+1) -- p_v (the self-child) and
  the children of level l -- is pairwise >= b^l apart, EXCEPT pairs of identical points (exact duplicates).
* Duplicates / distance 0: a point identical to p_v (distance exactly 0; ``dist`` never underflows to 0 for distinct
  points) is attached as a child of v at the level of v's existing duplicate child if any, else one level below
  v's lowest child: no infinite descent, and separation holds against every non-identical sibling automatically
  (a child of level l is >= b^l from p_v, hence from a copy of p_v). ``check_invariants`` waives separation only
  between identical points.
* MIND(v) = the minimum, over v's child groups, of the pairwise distances inside the group (self-child included);
  stored as a valid LOWER bound (exact after insert; after the batch build, pairs that the triangle inequality
  already proved far count with that lower bound; possibly stale-low after update_points/remove). It is only a shortcut
  for Alg. 3's separation test, which falls back to the exact group minimum.
* MAXD is exact after build/insert (every ancestor on the insertion path sees the new point's exact distance) and a
  valid upper bound after update_points/remove (triangle inequality through the children).

Insertion (SG tree, Zaheer et al. 2019): at cluster (v, L) with d(x, p_v) <= b^L, walk v's child groups of levels
L-1, L-2, ... (descending); at group level l descend into the nearest child c with d(x, p_c) <= b^l if it is
strictly nearer than p_v (ties go to the self-child); stop at the first level l where the self-child does not
cover x (d(x, p_v) > b^l) and attach x there as a new child (covering d <= b^(l+1) and separation follow). The root
is raised to ceil(log_b d) when a new point lies beyond b^(root level). The batch build (default) does the same
coarse-to-fine (:func:`refimpl.index._build.batch_place`: a greedy net per level, then nearest-cover assignment),
with cache-friendly access and sibling nodes allocated contiguously; measured at N = 1e5 (D = 64): 0.5 s CPU vs
1.2 s for one-by-one insertion, and 0.22 vs 0.46-0.59 ms per exact top-10 query (875-898 vs 976-980 inner
products); random vs given scan order made no difference on this (randomly ordered) data.

Alg. 3 (maintain) with Eq. 10/11 in our covering definition: a cluster (v, l+1) survives a drift U if b^(l+1) > U,
PDIST(c) + U <= b^(l+1) for each child c of level l (Eq. 10) and every non-identical pair of its child group is
>= b^l + U apart (Eq. 11); otherwise it is emptied and its points reinserted under the same representative (from
the root when a point no longer lies within b^(l+1) of it). The printed test MAXD + U <= b^l is strong covering,
which our trees do not promise (MAXD reaches b^(l+1)/(b-1)), so it would rebuild almost everything.
``maintain(U, granularity="child")`` is our refinement: only the offending children (covering failures, one member
of each too-close pair) are cut with their subtrees and reinserted under (v, l+1); measured at N = 1e6 (D = 64,
1% of the targets moved by ~0.05, U = 0): Alg. 3 as printed rebuilt 3737 clusters / 307k points, 2.9x cheaper than
a full build; the child granularity reinserted 21k points, 16.6x cheaper (``python -m refimpl bench tree``).

Base default b = 1.2, chosen by measurement (``python -m refimpl bench tree --sizes 1e6 --bases 1.15,1.2,1.3`` and
``--sizes 1e5 --bases ...``; hierarchical_points, D = 64, one thread, CPU seconds on the shared machine):

    N = 1e6   base 1.15: build 8.4 s, depth 12, top-10 2.41 ms / 5105 inner products per query
              base 1.2 : build 9.0 s, depth 11, top-10 2.24 ms / 5184
              base 1.3 : build 12.8 s, depth 9, top-10 2.21 ms / 4900
    N = 1e5   (ball bound before the parent-distance test) top-10 inner products 1443 / 1378 / 1106, 2.0: 2416;
              build 1.36 / 1.45 / 1.68 s (2.0: 3.1 s); certified log Z gap (beta = 20, ~1000 clusters)
              11.0 / 11.2 / 9.9 (1.05: 15.2, 2.0: 9.4): the gap follows the cluster radii, ~0.21 at every base.

Larger bases (1.5, 2) build 2-4x slower (groups of up to |S| mutually far points at the bottom levels cost
|S|^2 distances) without better search; bases near 1 (1.05) give deep trees and looser bounds at equal cluster
counts. 1.2 builds near the fastest and searches near the best.
"""
from __future__ import annotations

import itertools
import zipfile
from dataclasses import dataclass

import numpy as np

from refimpl.index import _build as KB
from refimpl.index import _kernels as K
from refimpl.index._arrays import TreeArrays
from refimpl.index.clusters import Clustering
from refimpl._validate import as_rng, check_ids, check_int, check_matrix, check_positive

__all__ = ["SGTree", "Clustering", "DEFAULT_BASE"]

DEFAULT_BASE = 1.2
MAX_ABS = 1e140  # larger magnitudes would overflow squared distances / inner products in float64
_VERSIONS = itertools.count(1)  # tree versions: process-wide, strictly increasing
_FORMAT = "refimpl.SGTree"
_VERSION = 2
_NODE_INT = ("node_point", "node_level", "node_parent", "node_first_child", "node_next_sibling", "node_count")
_NODE_FLOAT = ("node_maxd", "node_mind", "node_pdist", "node_maxnorm", "node_sepslack")


def _check_points(name, points, dim=None):
    arr = check_matrix(name, points, n_cols=dim)
    if arr.size and np.abs(arr).max() > MAX_ABS:
        raise ValueError(f"{name}: values must have magnitude <= {MAX_ABS:g} (squared distances would overflow)")
    return arr


def _run_ids(starts, levels):
    """Index of the run of equal (start, level) each position belongs to."""
    if starts.size == 0:
        return starts
    change = np.r_[True, (starts[1:] != starts[:-1]) | (levels[1:] != levels[:-1])]
    return np.cumsum(change)


class SGTree:
    """Compressed SG tree over the rows of a float64 matrix (Euclidean distance). See the module docstring."""

    def __init__(self, dim: int, *, base: float = DEFAULT_BASE, capacity: int = 16):
        self.dim = check_int("dim", dim, low=1)
        self.base = check_positive("base", base)
        if not self.base > 1.0:
            raise ValueError(f"base: must be > 1, got {self.base}")
        cap = max(1, int(capacity))
        self.points = np.zeros((cap, self.dim))
        self.point_node = np.full(cap, -1, dtype=np.int64)
        self.n_targets = 0  # target ids handed out so far (removed ids are not reused)
        for name in _NODE_INT:
            setattr(self, name, np.full(cap, -1, dtype=np.int64))
        for name in _NODE_FLOAT:
            setattr(self, name, np.zeros(cap))
        self.free_stack = np.zeros(cap, dtype=np.int64)
        self._state = np.array([-1, 0, 0, 0], dtype=np.int64)  # root, n_nodes, free_top, #distances
        self.version = next(_VERSIONS)  # new at every mutation, unique across trees; derived objects record it

    # ------------------------------------------------------------------ basic properties
    @property
    def root(self) -> int:
        return int(self._state[0])

    @property
    def n_nodes(self) -> int:
        return int(self._state[1])

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

    def _T(self):
        return (self.points, self.base, self.point_node, self.node_point, self.node_level, self.node_parent,
                self.node_first_child, self.node_next_sibling, self.node_maxd, self.node_mind, self.node_count,
                self.node_pdist, self.node_maxnorm, self.node_sepslack, self.free_stack, self._state)

    def _reserve(self, extra_targets: int, extra_nodes: int) -> None:
        need_t = self.n_targets + extra_targets
        if need_t > self.points.shape[0]:
            cap = max(need_t, 2 * self.points.shape[0])
            pts = np.zeros((cap, self.dim))
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
              method: str = "batch") -> "SGTree":
        """Build over the rows of ``points`` (target id = row index).

        ``method``: "batch" (default; divisive construction in Numba, :func:`_sgtree_batch.batch_place`: the
        same invariants as insertion, coarse-to-fine, cache-friendly) or "insert" (one SG insertion per point).
        ``order``: "random" (a permutation drawn from ``rng``; default; it picks the root and the scan order of the
        greedy nets) or "given" (row order)."""
        pts = _check_points("points", points)
        if order not in ("random", "given"):
            raise ValueError(f"order: expected 'random' or 'given', got {order!r}")
        if method not in ("batch", "insert"):
            raise ValueError(f"method: expected 'batch' or 'insert', got {method!r}")
        tree = cls(pts.shape[1], base=base, capacity=pts.shape[0])
        tree.points[:] = pts
        tree.n_targets = pts.shape[0]
        perm = as_rng(rng).permutation(pts.shape[0]) if order == "random" else np.arange(pts.shape[0])
        perm = perm.astype(np.int64)
        if method == "insert":
            tree._insert_ids(perm)
        else:
            KB.batch_build(perm, *tree._T())
        return tree

    def _insert_ids(self, xs, starts=None, start_levels=None) -> None:
        self.version = next(_VERSIONS)
        self._reserve(0, xs.shape[0])
        if starts is None:
            starts = np.full(xs.shape[0], -1, dtype=np.int64)
            start_levels = np.zeros(xs.shape[0], dtype=np.int64)
        K.insert_many(xs, starts, start_levels, *self._T())

    def insert(self, points) -> np.ndarray:
        """Insert new targets (rows of ``points``); returns their ids (n_targets, n_targets+1, ...)."""
        pts = _check_points("points", points, self.dim)
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
        m = K.remove_nodes(arr, out, *self._T())
        self._insert_ids(out[:m].copy())

    # ------------------------------------------------------------------ dynamics (PAPER.md §4)
    def update_points(self, ids, points, *, repair: bool = True) -> None:
        """New embeddings for targets ``ids``. PDIST becomes exact, MAXD/MAXNORM valid upper bounds and MIND a valid
        lower bound at once (so every certified bound holds immediately), touching only the affected paths. With
        ``repair`` (default) the tree is then made a valid SG tree again by ``maintain(0, granularity="child")``;
        with
        ``repair=False`` covering/separation may be violated until ``maintain(U)`` (Alg. 3) is called."""
        arr = self._check_live("ids", ids)
        pts = _check_points("points", points, self.dim)
        if pts.shape[0] != arr.size:
            raise ValueError(f"points: expected {arr.size} rows (one per id), got {pts.shape[0]}")
        if arr.size == 0:
            return
        self.version = next(_VERSIONS)
        self.points[arr] = pts
        nodes = self.point_node[arr]
        nodes = nodes[np.argsort(self.node_level[nodes], kind="stable")]
        K.update_stats(nodes, *self._T())
        if repair:
            self.maintain(0.0, granularity="child")

    def _rebuild_clusters(self, vs, ls, rng) -> int:
        if vs.size == 0:
            return 0
        out = np.empty(self.n_targets, dtype=np.int64)
        starts = np.empty(self.n_targets, dtype=np.int64)
        slev = np.empty(self.n_targets, dtype=np.int64)
        self.version = next(_VERSIONS)
        m = K.detach_clusters(vs, ls, out, starts, slev, *self._T())
        if rng is not None:  # shuffle within each cluster's run (runs stay contiguous)
            key = as_rng(rng).random(m)
            order = np.lexsort((key, _run_ids(starts[:m], slev[:m])))
            out[:m], starts[:m], slev[:m] = out[:m][order], starts[:m][order], slev[:m][order]
        self._reserve(0, m)
        KB.rebuild_segments(out, starts, slev, m, *self._T())
        return m

    def rebuild_level(self, level: int, *, rng=None) -> int:
        """Rebuild every cluster of C_(level) (each subtree rooted at that level, re-attached under its
        representative, as the authors' code does). Returns the number of reinserted targets."""
        level = check_int("level", level)
        if self.root == -1:
            return 0
        c = self.clustering(level)
        return self._rebuild_clusters(c.nodes.copy(), np.full(len(c), level, dtype=np.int64), rng)

    def maintain(self, U: float, *, rng=None, granularity: str = "child") -> dict:
        """Alg. 3 UpdateSGTree for a drift bound U >= 0 (Prop. 6; Eq. 10/11 in our parent-child form, see the
        module docstring); returns statistics. Kept parts of the tree then survive any further drift <= U.

        ``granularity="child"`` (default; "rebuild exactly the smallest subtrees that break covering or separation",
        issue 3): only the failing children (covering failures and one member of each too-close pair) are cut with
        their subtrees and their points reinserted under (v, l+1) (from the root when out of reach); the rest of
        the group is kept. ``granularity="cluster"`` (Alg. 3 exactly as printed): a cluster (v, l+1) whose child
        group fails is emptied and rebuilt under p_v, with everything below it in v; every cluster of level l with
        b^l <= U too. Both leave a valid tree. Measured by ``python -m refimpl bench tree`` at N = 1e6 (1 % of the
        targets moved, U = 0): "child" is 16.6x cheaper than a full build, "cluster" 2.9x (the paper reports ~4x)."""
        U = check_positive("U", U, allow_zero=True)
        if granularity not in ("cluster", "child"):
            raise ValueError(f"granularity: expected 'cluster' or 'child', got {granularity!r}")
        cap = max(self.n_nodes, 1)
        vs = np.empty(cap, dtype=np.int64)
        ls = np.empty(cap, dtype=np.int64)
        es = np.empty(cap, dtype=np.int64)
        k, ke = K.maintain_mark(U, granularity == "child", vs, ls, es, *self._T())
        m = 0
        if ke:
            out = np.empty(self.n_targets, dtype=np.int64)
            starts = np.empty(self.n_targets, dtype=np.int64)
            slev = np.empty(self.n_targets, dtype=np.int64)
            m = K.detach_nodes(es[:ke].copy(), out, starts, slev, *self._T())
            self._insert_ids(out[:m].copy(), starts[:m].copy(), slev[:m].copy())
        m2 = self._rebuild_clusters(vs[:k].copy(), ls[:k].copy(), rng)
        return {"clusters_rebuilt": int(k), "subtrees_reinserted": int(ke), "points_reinserted": int(m + m2)}

    # ------------------------------------------------------------------ views
    def clustering(self, level: int) -> Clustering:
        """C_(level): see the data model. Every live target lies in exactly one cluster."""
        level = check_int("level", level)
        n = max(self.n_nodes, 1)
        nodes = np.empty(n, dtype=np.int64)
        sizes = np.empty(n, dtype=np.int64)
        radii = np.empty(n)
        k = 0 if self.root == -1 else K.clustering_arrays(level, *self._T(), nodes, sizes, radii)
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
        from refimpl.index.check import check_tree

        return check_tree(self, geometry=geometry)

    # ------------------------------------------------------------------ persistence
    def save(self, path) -> None:
        """Versioned .npz (plain arrays, no pickle) written exactly at ``path``."""
        n, t = self.n_nodes, self.n_targets
        arrays = {name: getattr(self, name)[:n] for name in _NODE_INT + _NODE_FLOAT}
        arrays.update(format=np.array(_FORMAT), version=np.array(_VERSION, dtype=np.int64),
                      base=np.array(self.base), dim=np.array(self.dim, dtype=np.int64), state=self._state.copy(),
                      points=self.points[:t], point_node=self.point_node[:t],
                      free_stack=self.free_stack[: self._state[2]])
        with open(path, "wb") as fh:
            np.savez(fh, **arrays)

    @classmethod
    def load(cls, path) -> "SGTree":
        """Load a file written by :meth:`save`; a truncated, foreign or newer-version file raises ValueError."""
        try:
            with np.load(path, allow_pickle=False) as z:
                data = {k: z[k] for k in z.files}
        except (OSError, ValueError, EOFError, zipfile.BadZipFile, KeyError) as exc:
            raise ValueError(f"path: {path!s} is not a readable SGTree file ({exc})") from None
        if "format" not in data or data["format"].dtype.kind != "U" or str(data["format"]) != _FORMAT:
            raise ValueError(f"path: {path!s} is not an SGTree file (no '{_FORMAT}' marker)")
        if int(data.get("version", -1)) != _VERSION:
            raise ValueError(f"path: {path!s} has SGTree format version {data.get('version')}, expected {_VERSION}")
        try:
            state = data["state"].astype(np.int64)
            n, free_top = int(state[1]), int(state[2])
            tree = cls(int(data["dim"]), base=float(data["base"]), capacity=max(n, data["points"].shape[0], 1))
            t = data["points"].shape[0]
            tree.points[:t] = data["points"]
            tree.point_node[:t] = data["point_node"]
            tree.n_targets = t
            for name in _NODE_INT + _NODE_FLOAT:
                a = data[name]
                if a.shape != (n,):
                    raise ValueError(f"array {name} has shape {a.shape}, expected ({n},)")
                getattr(tree, name)[:n] = a
            tree.free_stack[:free_top] = data["free_stack"]
            if state.shape != (4,):
                raise ValueError(f"state has shape {state.shape}")
            tree._state[:] = state
            tree._validate_links()
            tree.version = next(_VERSIONS)
        except (KeyError, IndexError, TypeError, ValueError) as exc:
            raise ValueError(f"path: {path!s} is a damaged SGTree file ({exc})") from None
        return tree

    def _validate_links(self) -> None:
        """Vectorised sanity check of a loaded tree, so that no kernel can index out of bounds or loop forever:
        ids in range, every live non-root node referenced exactly once by a first-child/next-sibling link (the
        root never), parents consistent with the lists, child levels below their parent's."""
        n, t, root = self.n_nodes, self.n_targets, self.root
        NP, par = self.node_point[:n], self.node_parent[:n]
        fc, ns = self.node_first_child[:n], self.node_next_sibling[:n]
        if not (-1 <= root < max(n, 1)) or not (0 <= self._state[2] <= n) or n > self.node_point.shape[0]:
            raise ValueError("root / node counts out of range")
        for name, a, hi in (("node_point", NP, t), ("node_parent", par, n), ("node_first_child", fc, n),
                            ("node_next_sibling", ns, n), ("point_node", self.point_node[:t], n)):
            if a.size and (a.min() < -1 or a.max() >= hi):
                raise ValueError(f"{name} has ids out of range")
        live = NP >= 0
        if root >= 0 and not live[root]:
            raise ValueError("the root is not a live node")
        refs = np.concatenate([fc[live], ns[live]])
        cnt = np.bincount(refs[refs >= 0], minlength=n)
        expect = live.astype(np.int64)
        if root >= 0:
            expect[root] = 0
        if not np.array_equal(cnt, expect):
            raise ValueError("child links do not reference every live node exactly once")
        kids = np.flatnonzero(live & (par >= 0))
        if (self.node_level[kids] >= self.node_level[par[kids]]).any():
            raise ValueError("a child's level is not below its parent's")
        heads = fc[live][fc[live] >= 0]
        owners = np.flatnonzero(live)[fc[live] >= 0]
        if not np.array_equal(par[heads], owners):
            raise ValueError("first-child links disagree with node_parent")
        sib = np.flatnonzero(live & (ns >= 0))
        if not np.array_equal(par[ns[sib]], par[sib]):
            raise ValueError("sibling links disagree with node_parent")
        fs = self.free_stack[: self._state[2]]
        if fs.size and (fs.min() < 0 or fs.max() >= n or live[fs].any()):
            raise ValueError("the free list holds live or out-of-range nodes")

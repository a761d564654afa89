"""The invariant checker of :class:`refimpl.index.sgtree.SGTree`: plain Python/NumPy, independent of the Numba kernels
(an oracle for them). Distances are recomputed with NumPy; comparisons allow a relative slack of 1e-9 for rounding
differences between NumPy and the kernels (the kernels decide with their own arithmetic)."""
from __future__ import annotations

import numpy as np

from refimpl.index._arrays import FREE_TOP

_TOL = 1e-9


def _d(a, b):
    diff = a - b
    m = np.abs(diff).max() if diff.size else 0.0
    return 0.0 if m == 0 else float(m * np.linalg.norm(diff / m))


def check_tree(tree, *, geometry: bool = True) -> list[str]:
    errs: list[str] = []
    P = np.asarray(tree.points, dtype=np.float64)  # float32 storage: the geometry is that of the stored values
    b = tree.base
    n = tree.n_nodes
    NP, NL, NPar = tree.node_point, tree.node_level, tree.node_parent
    root = tree.root
    live_t = np.flatnonzero(tree.point_node[: tree.n_targets] >= 0)
    live_n = np.flatnonzero(NP[:n] >= 0)
    # --- free list
    free = set(np.flatnonzero(NP[:n] < 0).tolist())
    fs = tree.free_stack[: tree.arrays().state[FREE_TOP]].tolist()
    if set(fs) != free or len(fs) != len(free):
        errs.append(f"free list {sorted(fs)[:10]} does not match the freed nodes {sorted(free)[:10]}")
    if root == -1:
        if live_t.size or live_n.size:
            errs.append(f"empty tree (root -1) but {live_t.size} live targets / {live_n.size} live nodes")
        return errs
    if not (0 <= root < n) or NP[root] < 0:
        return errs + [f"root {root} is not a live node"]
    if NPar[root] != -1:
        errs.append(f"root {root} has parent {NPar[root]}")
    # --- targets <-> nodes
    for t in live_t:
        v = tree.point_node[t]
        if not (0 <= v < n) or NP[v] != t:
            errs.append(f"target {t}: point_node {v} does not point back (node_point {NP[v] if 0 <= v < n else None})")
    for v in live_n:
        t = NP[v]
        if not (0 <= t < tree.n_targets) or tree.point_node[t] != v:
            errs.append(f"node {v}: represents target {t} whose point_node is not {v}")
    # --- traversal from the root: links, order, levels, reachability
    children: dict[int, list[int]] = {}
    seen = set()
    order = []
    stack = [root]
    while stack:
        v = stack.pop()
        if v in seen:
            errs.append(f"node {v} reached twice (cycle or shared child)")
            continue
        seen.add(v)
        order.append(v)
        ch = []
        c = int(tree.node_first_child[v])
        while c != -1 and len(ch) <= n:
            if not (0 <= c < n) or NP[c] < 0:
                errs.append(f"node {v}: child {c} is not a live node")
                break
            if NPar[c] != v:
                errs.append(f"node {c}: parent {NPar[c]} but listed as a child of {v}")
            if NL[c] >= NL[v]:
                errs.append(f"node {c}: level {NL[c]} not below its parent {v}'s level {NL[v]}")
            if ch and NL[c] > NL[ch[-1]]:
                errs.append(f"node {v}: children not in descending level order at child {c}")
            ch.append(c)
            c = int(tree.node_next_sibling[c])
        children[v] = ch
        stack.extend(ch)
    if len(seen) != live_n.size:
        errs.append(f"{live_n.size - len(seen)} live nodes are not reachable from the root")
    if errs:
        return errs
    # --- bottom-up: counts, descendants, MAXD, MAXNORM
    desc: dict[int, np.ndarray] = {}
    sq = np.einsum("ij,ij->i", P[: tree.n_targets], P[: tree.n_targets])
    for v in reversed(order):
        ch = children[v]
        cnt = 1 + sum(int(tree.node_count[c]) for c in ch)
        if tree.node_count[v] != cnt:
            errs.append(f"node {v}: count {tree.node_count[v]} != {cnt}")
        ids = np.concatenate([desc[c] for c in ch]) if ch else np.zeros(0, dtype=np.int64)
        t = NP[v]
        if ids.size:
            diff = P[ids] - P[t]
            scale = np.abs(diff).max()
            true = 0.0 if scale == 0 else float(scale * np.linalg.norm(diff / scale, axis=1).max())
            if true > tree.node_maxd[v] * (1 + _TOL) + 1e-300:
                errs.append(f"node {v}: MAXD {tree.node_maxd[v]!r} < true max distance {true!r}")
            mn = max(sq[t], sq[ids].max())
        else:
            mn = sq[t]
        if mn > tree.node_maxnorm[v] * (1 + _TOL) + 1e-300:
            errs.append(f"node {v}: MAXNORM {tree.node_maxnorm[v]!r} < true {mn!r}")
        desc[v] = np.concatenate([[t], ids]).astype(np.int64)
    if len(desc[root]) != live_t.size or tree.node_count[root] != live_t.size:
        errs.append(f"the root holds {len(desc[root])} targets but {live_t.size} are live")
    # --- PDIST, MIND, covering, separation
    for v in order:
        pv = P[NP[v]]
        ch = children[v]
        if v == root and tree.node_pdist[v] != 0:
            errs.append(f"root {v}: PDIST {tree.node_pdist[v]} != 0")
        groups: dict[int, list[int]] = {}
        for c in ch:
            groups.setdefault(int(NL[c]), []).append(c)
            d = _d(P[NP[c]], pv)
            if abs(d - tree.node_pdist[c]) > _TOL * max(d, abs(tree.node_pdist[c])) + 1e-300:
                errs.append(f"node {c}: PDIST {tree.node_pdist[c]!r} != distance to parent {d!r}")
            if geometry and d > b ** (int(NL[c]) + 1) * (1 + _TOL):
                errs.append(f"covering: node {c} (level {NL[c]}) is {d!r} from parent {v} > b^{NL[c] + 1}")
        true_mind = np.inf
        true_slack = np.inf
        for lev, g in groups.items():
            members = [NP[v]] + [NP[c] for c in g]
            for i in range(len(members)):
                for j in range(i + 1, len(members)):
                    d = _d(P[members[i]], P[members[j]])
                    true_mind = min(true_mind, d)
                    if d > 0:
                        true_slack = min(true_slack, d - b ** lev)
                    if geometry and d > 0 and d < b ** lev * (1 - _TOL):
                        errs.append(f"separation: targets {members[i]} and {members[j]} (group of node {v}, level "
                                    f"{lev}) are {d!r} apart < b^{lev}")
        if tree.node_mind[v] > true_mind * (1 + _TOL) + 1e-300:
            errs.append(f"node {v}: MIND {tree.node_mind[v]!r} > true group minimum {true_mind!r}")
        if np.isfinite(true_slack) and tree.node_sepslack[v] > true_slack + _TOL * (abs(true_slack) + b ** NL[v]):
            errs.append(f"node {v}: SEPSLACK {tree.node_sepslack[v]!r} > true {true_slack!r}")
    return errs

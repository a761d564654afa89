"""Persistence of an SG tree: atomic ``save`` and a ``load`` that verifies every number before returning.

File format: a versioned .npz of plain arrays (no pickle). ``save`` writes a temporary file in the target's
directory, fsyncs it, renames it over the target (``os.replace``, atomic on POSIX) and fsyncs the directory, so a
failure or a kill at any moment leaves the previous file intact. ``load`` checks, in order: the format marker and
version; dtypes and shapes; finite points of the declared dtype inside the tree's numerical domain; the base;
counters; id ranges; levels; links (parents, child lists, one node per live target, the free list); then the
counts exactly and PDIST, MAXD, MAXNORM, MIND, SEPSLACK against :func:`refimpl.index._kernels.recompute_stats`;
last, a BLAKE2b digest of every stored array (written by ``save``), which catches the changes the checks above
cannot see (e.g. a base lowered slightly: covering and separation are not required of a saved tree, since
``update_points(repair=False)`` may leave them broken). Every problem is one ValueError naming the file.
"""
from __future__ import annotations

import hashlib
import os
import tempfile
import zipfile

import numpy as np

from refimpl.index import _kernels as K
from refimpl.index._arrays import FREE_TOP, N_DIST, N_NODES, ROOT
from refimpl.index._domain import DTYPES, LEVEL_LIMIT, check_base, check_points

__all__ = ["save_tree", "load_tree", "NODE_INT", "NODE_FLOAT"]

FORMAT = "refimpl.SGTree"
VERSION = 4
NODE_INT = ("node_point", "node_level", "node_parent", "node_first_child", "node_next_sibling", "node_count")
NODE_FLOAT = ("node_maxd", "node_mind", "node_pdist", "node_maxnorm", "node_sepslack")
_RTOL = 1e-12  # relative rounding allowance between stored statistics and their recomputation


def _check_path(path):
    if not isinstance(path, (str, os.PathLike)):
        raise TypeError(f"path: expected a str or os.PathLike, got {type(path).__name__}")
    p = os.fspath(path)
    return os.fsdecode(p)


def _digest(arrays) -> str:
    """BLAKE2b over every array (name, dtype, shape, bytes), in name order, except the digest itself."""
    h = hashlib.blake2b(digest_size=32)
    for name in sorted(k for k in arrays if k != "digest"):
        a = np.ascontiguousarray(arrays[name])
        h.update(f"{name}|{a.dtype.str}|{a.shape}|".encode())
        h.update(a.tobytes())
    return h.hexdigest()


def _umask() -> int:
    mask = os.umask(0)
    os.umask(mask)
    return mask


def save_tree(tree, path) -> None:
    """Write ``tree`` to ``path`` atomically (see the module docstring)."""
    path = _check_path(path)
    n, t = tree.n_nodes, tree.n_targets
    state = tree.arrays().state
    arrays = {name: getattr(tree, name)[:n] for name in NODE_INT + NODE_FLOAT}
    arrays.update(format=np.array(FORMAT), version=np.array(VERSION, dtype=np.int64), base=np.array(tree.base),
                  dim=np.array(tree.dim, dtype=np.int64), dtype=np.array(tree.points.dtype.name),
                  state=state.copy(), points=tree.points[:t], point_node=tree.point_node[:t],
                  free_stack=tree.free_stack[: state[FREE_TOP]])
    arrays["digest"] = np.array(_digest(arrays))
    directory = os.path.dirname(os.path.abspath(path))
    fd, tmp = tempfile.mkstemp(prefix="." + os.path.basename(path) + ".", suffix=".tmp", dir=directory)
    try:
        os.fchmod(fd, 0o666 & ~_umask())
        with os.fdopen(fd, "wb") as fh:
            np.savez(fh, **arrays)
            fh.flush()
            os.fsync(fh.fileno())
        os.replace(tmp, path)
    except BaseException:
        try:
            os.unlink(tmp)
        except OSError:
            pass
        raise
    try:  # make the rename itself durable
        dfd = os.open(directory, os.O_RDONLY)
        try:
            os.fsync(dfd)
        finally:
            os.close(dfd)
    except OSError:  # pragma: no cover - directories cannot be fsynced on some file systems
        pass


def load_tree(cls, path):
    """Read, assemble and verify a tree written by :func:`save_tree` (``cls``: the SGTree class)."""
    path = _check_path(path)
    try:
        with np.load(path, allow_pickle=False) as z:
            data = {k: z[k] for k in z.files}
    except (OSError, ValueError, EOFError, zipfile.BadZipFile, KeyError) as exc:
        raise ValueError(f"path: {path} is not a readable SGTree file ({exc})") from None
    if "format" not in data or data["format"].dtype.kind != "U" or str(data["format"]) != FORMAT:
        raise ValueError(f"path: {path} is not an SGTree file (no '{FORMAT}' marker)")
    version = data.get("version")
    if version is None or version.shape != () or version.dtype.kind not in "iu" or int(version) != VERSION:
        raise ValueError(f"path: {path} has SGTree format version {version}, expected {VERSION}")
    try:
        tree = _assemble(cls, data)
        _verify(tree)
        digest = data.get("digest")
        if digest is None or digest.shape != () or digest.dtype.kind != "U" or str(digest) != _digest(data):
            raise ValueError("the content digest does not match the stored arrays")
    except (KeyError, IndexError, TypeError, ValueError, OverflowError) as exc:
        raise ValueError(f"path: {path} is a damaged SGTree file ({exc})") from None
    return tree


def _scalar(data, name, kinds):
    a = data[name]
    if a.shape != () or a.dtype.kind not in kinds:
        raise ValueError(f"{name} must be a scalar of kind {kinds!r}, got {a.dtype} {a.shape}")
    return a[()]


def _assemble(cls, data):
    dtype_name = str(_scalar(data, "dtype", "U"))
    if dtype_name not in [d.name for d in DTYPES]:
        raise ValueError(f"declared point dtype {dtype_name!r} is not float64 or float32")
    pts = data["points"]
    if pts.dtype != np.dtype(dtype_name) or pts.ndim != 2:
        raise ValueError(f"points are {pts.dtype} {pts.shape}, declared {dtype_name} (N, D)")
    dim = int(_scalar(data, "dim", "iu"))
    if pts.shape[1] != dim or dim < 1:
        raise ValueError(f"points have {pts.shape[1]} columns, declared dim {dim}")
    base = check_base(float(_scalar(data, "base", "f")))
    if pts.shape[0]:
        check_points("points", pts, dim, dtype=pts.dtype)
    state = data["state"]
    if state.dtype != np.int64 or state.shape != (4,):
        raise ValueError(f"state is {state.dtype} {state.shape}, expected int64 (4,)")
    n, t = int(state[N_NODES]), pts.shape[0]
    for name in NODE_INT + NODE_FLOAT + ("point_node", "free_stack"):
        a = data[name]
        want = np.float64 if name in NODE_FLOAT else np.int64
        if a.dtype != want or a.ndim != 1:
            raise ValueError(f"array {name} is {a.dtype} {a.shape}, expected {np.dtype(want).name} 1-D")
    for name in NODE_INT + NODE_FLOAT:
        if data[name].shape != (n,):
            raise ValueError(f"array {name} has shape {data[name].shape}, expected ({n},)")
    if data["point_node"].shape != (t,):
        raise ValueError(f"point_node has shape {data['point_node'].shape}, expected ({t},)")
    free_top = int(state[FREE_TOP])
    if not (0 <= free_top <= n) or data["free_stack"].shape != (free_top,):
        raise ValueError(f"free list of {data['free_stack'].shape} entries, state says {free_top} of {n} nodes")
    if not (-1 <= int(state[ROOT]) < max(n, 1)) or state[N_DIST] < 0:
        raise ValueError(f"counters {state.tolist()} out of range")
    tree = cls(dim, base=base, capacity=1, dtype=pts.dtype)
    tree.points = np.ascontiguousarray(pts)
    tree.point_node = np.ascontiguousarray(data["point_node"])
    tree.n_targets = t
    cap = max(n, 1)
    for name in NODE_INT + NODE_FLOAT:
        arr = np.full(cap, -1, dtype=np.int64) if name in NODE_INT else np.zeros(cap)
        arr[:n] = data[name]
        setattr(tree, name, arr)
    tree.free_stack = np.zeros(cap, dtype=np.int64)
    tree.free_stack[:free_top] = data["free_stack"]
    tree.arrays().state[:] = state
    return tree


def _verify(tree) -> None:
    n, t, root = tree.n_nodes, tree.n_targets, tree.root
    NP, NL, par = tree.node_point[:n], tree.node_level[:n], tree.node_parent[:n]
    fc, ns = tree.node_first_child[:n], tree.node_next_sibling[:n]
    pn = tree.point_node[:t]
    for name, a, hi in (("node_point", NP, t), ("node_parent", par, n), ("node_first_child", fc, n),
                        ("node_next_sibling", ns, n), ("point_node", pn, n)):
        if a.size and (a.min() < -1 or a.max() >= hi):
            raise ValueError(f"{name} has ids out of range")
    live = NP >= 0
    nodes = np.flatnonzero(live)
    if root == -1:
        if nodes.size or (pn >= 0).any():
            raise ValueError("an empty tree (root -1) with live nodes or targets")
        return
    if not live[root] or par[root] != -1:
        raise ValueError("the root is not a live node without parent")
    # one node per live target: point_node and node_point are inverse bijections on the live sets
    targets = np.flatnonzero(pn >= 0)
    if not np.array_equal(pn[NP[nodes]], nodes) or targets.size != nodes.size:
        raise ValueError("node_point / point_node are not one node per live target")
    lv = NL[nodes]
    if (np.abs(lv) > LEVEL_LIMIT).any():
        raise ValueError(f"a level is outside +-{LEVEL_LIMIT}")
    kids = nodes[nodes != root]
    if (par[kids] < 0).any() or not live[par[kids]].all():
        raise ValueError("a live non-root node has no live parent")
    if (NL[kids] >= NL[par[kids]]).any():
        raise ValueError("a child's level is not below its parent's")
    refs = np.concatenate([fc[nodes], ns[nodes]])
    cnt = np.bincount(refs[refs >= 0], minlength=n)
    expect = live.astype(np.int64)
    expect[root] = 0
    if not np.array_equal(cnt, expect):
        raise ValueError("child links do not reference every live node exactly once")
    heads = fc[nodes]
    if not np.array_equal(par[heads[heads >= 0]], nodes[heads >= 0]):
        raise ValueError("first-child links disagree with node_parent")
    sib = nodes[ns[nodes] >= 0]
    if not np.array_equal(par[ns[sib]], par[sib]) or (NL[ns[sib]] > NL[sib]).any():
        raise ValueError("sibling links disagree with node_parent or are not in descending level order")
    fs = tree.free_stack[: tree.arrays().state[FREE_TOP]]
    if fs.size != n - nodes.size or (fs.size and (live[fs].any() or np.bincount(fs, minlength=n).max() > 1)):
        raise ValueError("the free list is not exactly the freed nodes")
    # statistics against a recomputation from the points and links
    count = np.zeros(n, dtype=np.int64)
    maxd, maxnorm, pdist, mind, slack = (np.zeros(n) for _ in range(5))
    K.recompute_stats(tree.arrays(), nodes, count, maxd, maxnorm, pdist, mind, slack)
    if not np.array_equal(tree.node_count[nodes], count[nodes]):
        raise ValueError("node_count differs from the number of targets below each node")
    for name in NODE_FLOAT:
        a = getattr(tree, name)[nodes]
        if np.isnan(a).any() or (name in ("node_maxd", "node_pdist", "node_maxnorm") and not np.isfinite(a).all()):
            raise ValueError(f"{name} holds NaN or Inf")
    tol = lambda x: _RTOL * np.abs(x)  # noqa: E731
    with np.errstate(over="ignore"):  # b^level may overflow to inf at extreme (still legal) levels
        sep = np.power(tree.base, NL[nodes].astype(np.float64))
    checks = (
        ("node_pdist", np.abs(tree.node_pdist[nodes] - pdist[nodes]) > tol(pdist[nodes]), "differs from"),
        ("node_maxd", tree.node_maxd[nodes] < maxd[nodes] - tol(maxd[nodes]), "is below"),
        ("node_maxnorm", tree.node_maxnorm[nodes] < maxnorm[nodes] - tol(maxnorm[nodes]), "is below"),
        ("node_mind", np.isfinite(mind[nodes]) & (tree.node_mind[nodes] > mind[nodes] + tol(mind[nodes])),
         "is above"),
        ("node_sepslack", np.isfinite(slack[nodes]) & (tree.node_sepslack[nodes] > slack[nodes] + _RTOL * (
            np.abs(slack[nodes]) + sep)), "is above"),
    )
    for name, bad, how in checks:
        if bad.any():
            v = int(nodes[np.flatnonzero(bad)[0]])
            raise ValueError(f"{name} of node {v} ({getattr(tree, name)[v]!r}) {how} its recomputation from the "
                             f"points")

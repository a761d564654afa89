"""The ONE place where the newer checks call refimpl: one small adapter per library use.

refimpl's internals are being rewritten (batched kernels, version-checked caches, a mining engine); the checks call
only these functions, each a thin wrapper of a public refimpl name, so that re-pointing a check after a library
change means editing one function here. Every adapter returns plain NumPy arrays / dicts.
"""
from __future__ import annotations

import numpy as np

from refimpl.index.sgtree import SGTree
from refimpl.nystrom import Nystrom, RegressionReEncoder
from refimpl.sampling.clustering import certify, cluster_members, find_clustering, level_clustering
from refimpl.sampling.engine import sample_paper
from refimpl.sampling.samplers import sample_exact, sample_mh, sample_rejection


def build_tree(X, base, seed, *, given_order=False) -> SGTree:
    """SGTree.build (random scan order; ``given_order``: insert the rows in order, the first is the root)."""
    if given_order:
        return SGTree.build(X, base=base, order="given", method="insert")
    return SGTree.build(X, base=base, rng=int(seed))


def level_clusters(tree, level, *, with_object=False):
    """C_(level): (reps, sizes, radii, list of member arrays) [+ the library's clustering object, for certify/MH]."""
    cl = level_clustering(tree, level)
    out = (cl.reps.copy(), cl.sizes.copy(), cl.radii.copy(), [cluster_members(tree, cl, j) for j in range(len(cl))])
    return out + (cl,) if with_object else out


def tree_shape(tree) -> dict:
    """Depth and branching of an SG tree: the number of explicit nodes on the longest root-leaf path, and per
    child group (a node v and its children of one level l, self-child included) its size: max and mean."""
    lv = np.asarray(tree.node_level)
    groups = []
    for v in np.flatnonzero(np.asarray(tree.node_point)[: tree.n_nodes] >= 0):
        ch = tree.children(int(v))
        if ch.size:
            _, counts = np.unique(lv[ch], return_counts=True)
            groups.extend((counts + 1).tolist())
    g = np.array(groups or [1])
    return {"depth": int(tree.depth()), "max_branching": int(g.max()), "mean_branching": float(g.mean())}


def level_count(tree, level) -> int:
    """|C_(level)|."""
    return len(tree.clustering(int(level)))


def alg2(tree, q, *, beta, gamma, m=None, max_clusters=None):
    """Alg. 2 (FindClustering) with the frontier capped to ``max_clusters`` and the excess finalised (Remark 2).
    Returns (reps, sizes, members, levels, stats) with stats = distance evaluations, start level, m."""
    cl = find_clustering(tree, q, beta=beta, gamma=gamma, m=m, max_clusters=max_clusters)
    return (cl.reps.copy(), cl.sizes.copy(), [cluster_members(tree, cl, j) for j in range(len(cl))], cl.levels.copy(),
            dict(cl.stats), cl)


def eq7_inner_products(tree, q, clustering_obj, *, beta) -> int:
    """Inner products the library spends to form Eq. 7's proposal (its certificate) for a clustering."""
    return int(certify(tree, q, clustering_obj, beta=beta).inner_products)


def mh_on_clustering(tree, q, clustering_obj, k, *, beta, chain_length, rng) -> dict:
    """sample_mh with a given clustering and chain length; returns its stats (inner products, proposals)."""
    r = sample_mh(tree, q, k, beta=beta, rng=rng, clustering=clustering_obj, chain_length=chain_length)
    return dict(r.stats)


def rejection_stats(tree, q, k, *, beta, level, rng) -> dict:
    """Alg. 1 (sample_rejection) from a fixed start level; returns its stats (attempts, inner products)."""
    return dict(sample_rejection(tree, q, k, beta=beta, rng=rng, level=int(level)).stats)


def maintain_library(tree, new_points, U) -> dict:
    """The library's Alg. 3: update_points without repair, then maintain(U) (default granularity); returns the
    maintain statistics and the invariant violations left."""
    tree.update_points(np.arange(new_points.shape[0]), new_points, repair=False)
    st = dict(tree.maintain(U))
    st["violations"] = tree.check_invariants()
    return st


def experiments_procedure(tree, q, k, *, beta, rng, max_clusters, chain_length, gamma=4.0):
    """The experiments' procedure as ``DyNNIBAL(sampler="paper")`` runs it (:func:`refimpl.sampling.engine.sample_paper`:
    Alg. 2 with the frontier capped to 100, the ``max_clusters`` clusters closest to the query, MH chains of
    ``chain_length`` states, the top-scoring distinct final states). Returns the selected target ids: one array per
    query for a batch."""
    ids, _ = sample_paper(tree, q, k, beta=beta, rng=rng, gamma=gamma, n_top_clusters=max_clusters,
                          chain_length=chain_length)
    return [np.asarray(x) for x in ids] if np.ndim(q) == 2 else np.asarray(ids)


def exact_samples(points, q, k, *, beta, rng):
    """sample_exact: k i.i.d. draws of the softmax (the reference)."""
    return np.asarray(sample_exact(points, q, k, beta=beta, rng=rng).ids)


def nystrom_fit(T, n_landmarks, seed, split="paper"):
    return Nystrom(n_landmarks, split=split, rng=int(seed)).fit(T)


def regression_reencoder(n_landmarks, n_samples, seed, ridge=1e-3):
    """Alg. 5-6: a RegressionReEncoder (initial_encode(encoder, X), reencode(encoder), exact_reencode(encoder),
    query_representations(Q), representations, last_cost)."""
    return RegressionReEncoder(n_landmarks, n_samples, ridge=ridge, rng=int(seed))

"""Alg. 3 UpdateSGTree (paper §3.5, Eq. 10-11; PAPER.md §4): if every pairwise target distance moved by at most U,
re-checking covering with margin U (Eq. 10), separation with margin U (Eq. 11), and rebuilding the clusters that fail
(and every cluster with b^l <= U) leaves a valid SG tree.

Checked with refimpl.index.sgtree.SGTree: build, move every target by a displacement of norm <= U/2 (so every pairwise
distance moves by <= U; displacements random, or adversarial: all of norm exactly U/2, pushing points away from their
parent's representative), ``update_points(..., repair=False)`` (statistics updated, no repair), then ``maintain(U)``;
the tree's independent NumPy invariant checker (``check_invariants``: nesting, parent-child covering, sibling
separation, MAXD >= true distances, counts, every target in exactly one place) must return no violation, and every
level clustering must partition the targets with certified radii >= the true extents. Several rounds per tree
(drift accumulates), U from 1e-4 to above the root's scale, bases 1.05/1.3/2, duplicates and deep trees.
Also on drift produced by real training (SGD steps of the trained linear dual encoder of the Prop. 5/6 checks,
U = 2 max_i ||t_i' - t_i||). Non-vacuity: the same drift WITHOUT maintain leaves invariant violations in some cases (counted and reported).
"""
from __future__ import annotations

import numpy as np

from proofs_check import _instances as I
from proofs_check._framework import Budget, Outcome, Verdict, claim
from proofs_check.check_prop5_prop6 import trained
from refimpl.softmax import full_softmax_grad


@claim("alg3_maintain", paper_ref="Alg. 3, Eq. 10-11 (library's parent-child form)", order=60,
       perturbation="maintain skipped after the drift (the repair the claim is about removed)",
       statement="After every pairwise distance moves by at most U, the library's UpdateSGTree(U) (Alg. 3 with Eq. 10 "
                 "as parent-child covering, granularity 'child') restores a valid SG tree: covering, separation, "
                 "MAXD/MIND, every target present.")
def check(budget: Budget, rng) -> Outcome:
    n_trees = budget.cases(24, minimum=4)
    cases = bad = broken_without = 0
    rebuilt = 0
    cex, lines = None, []
    for t in range(n_trees):
        kind = I.KINDS[t % len(I.KINDS)]
        n = int(rng.integers(10, 400))
        dim = int(rng.choice([2, 3, 8]))
        base = float(rng.choice([1.05, 1.3, 2.0]))
        X = I.points(kind, n, dim, rng)
        tree = I.build(X, base, rng)
        ids = np.arange(n)
        for rnd in range(4):
            U = float(10 ** rng.uniform(-4, 0.5))
            step = I.unit_rows(rng.normal(size=X.shape))
            if t % 2:  # adversarial: every point moves exactly U/2, away from its parent's representative
                par = tree.node_parent[tree.point_node[ids]]
                away = X - np.where(par[:, None] >= 0, tree.points[tree.node_point[np.maximum(par, 0)]], X)
                nz = np.linalg.norm(away, axis=1) > 0
                step[nz] = I.unit_rows(away[nz])
                scale = np.full((n, 1), U / 2)
            else:
                scale = rng.uniform(0, U / 2, size=(n, 1))
            Xn = X + scale * step
            tree.update_points(ids, Xn, repair=False)
            if tree.check_invariants():
                broken_without += 1
            st = {"clusters_rebuilt": 0} if budget.perturb else tree.maintain(U)
            rebuilt += st["clusters_rebuilt"]
            X = Xn
            errs = tree.check_invariants()
            cases += 1
            lo, hi = tree.level_range()
            for L in (lo, (lo + hi) // 2, hi):
                c, mems, ext = I.cluster_extents(tree, L)
                if sorted(np.concatenate(mems).tolist()) != list(range(n)):
                    errs.append(f"C_({L}) is not a partition of the targets")
                if np.any(ext > c.radii * (1 + 1e-9) + 1e-300):
                    errs.append(f"C_({L}) radius below the true extent")
            if errs:
                bad += 1
                cex = cex or f"{kind} n={n} D={dim} b={base} round {rnd} U={U:.3g}: {errs[:3]}"
        if len(lines) < 8:
            lines.append(f"{kind} n={n} D={dim} b={base}: 4 drift rounds, tree depth {tree.depth()}")
    # drift produced by real training: SGD steps of the trained linear dual encoder of the Prop. 5/6 checks
    ds, enc = trained(11)
    Xq, Xt = np.asarray(ds.query_features), np.asarray(ds.target_features)
    for base, eta in ((1.3, 0.05), (2.0, 0.2)):
        T = enc.encode_targets(Xt)
        tree = I.build(T, base, rng)
        for rnd in range(3):
            for _ in range(5):
                b = rng.choice(ds.train_ids, size=32, replace=False)
                _, dA, dB = full_softmax_grad(enc, Xq[b], Xt, [ds.positives[i] for i in b])
                enc.A -= eta * dA
                enc.B -= eta * dB
            Tn = enc.encode_targets(Xt)
            U = 2 * float(np.max(np.linalg.norm(Tn - T, axis=1)))  # >= every pairwise distance change
            tree.update_points(np.arange(Tn.shape[0]), Tn, repair=False)
            broken = bool(tree.check_invariants())
            broken_without += broken
            st = {"clusters_rebuilt": 0} if budget.perturb else tree.maintain(U)
            rebuilt += st["clusters_rebuilt"]
            errs = tree.check_invariants()
            cases += 1
            if errs:
                bad += 1
                cex = cex or f"trained encoder b={base} eta={eta} round {rnd} U={U:.3g}: {errs[:3]}"
            lines.append(f"trained encoder ({Tn.shape[0]} targets), b={base}, 5 SGD steps at eta={eta}: U={U:.3g}, "
                         f"invariants broken before maintain: {broken}, clusters rebuilt {st['clusters_rebuilt']}, "
                         f"valid after: {not errs}")
            T = Tn
    return Outcome(Verdict.HOLDS if bad == 0 else Verdict.FAILS, cases=cases, violations=bad, counterexample=cex,
                   details=f"{cases} (tree, drift round) cases, {rebuilt} clusters rebuilt in total; trees left invalid "
                           f"after maintain(U): {bad}. Non-vacuity: after the drift and before maintain(U) the invariant "
                           f"checker found violations in {broken_without}/{cases} cases.\n" + "\n".join(lines))

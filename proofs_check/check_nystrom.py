"""Nyström exactness at full rank (paper §4, App. B; PAPER.md §5): with the linear kernel and d' >= rank of the
embeddings, the Nyström approximation KS (S^T K S)^-1 S^T K of the inner products is exact.

Checked with refimpl.nystrom.Nystrom (both splits, "paper" and "symmetric"), d' uniform landmarks among the targets,
on random low-rank target sets (rank r <= D, N up to 400, d' from r to 3r), queries inside and outside the targets'
span, and adversarial sets with exact duplicates. Error = max |<z_q, z_t> - <q, t>| / (||q|| ||t||); exact means
<= 1e-8.

Finding: d' >= rank is not enough: the landmarks must SPAN the targets' span (rank of the landmark embeddings = rank
of the embeddings). With uniform landmarks and many exact duplicates (a target repeated N - r + 1 times), d' >= r
landmarks almost surely miss the rare directions and the approximation is not exact. Corrected statement (verified):
exact iff rank(S^T T) = rank(T), whatever d'.
"""
from __future__ import annotations

import numpy as np

from proofs_check import _instances as I
from proofs_check._framework import Budget, Outcome, Verdict, claim
from refimpl.nystrom import Nystrom

EXACT = 1e-8


def _err(ny, Qm, T):
    approx = ny.inner(Qm, T)
    true = Qm @ T.T
    scale = np.outer(np.linalg.norm(Qm, axis=1), np.linalg.norm(T, axis=1))
    return float(np.max(np.abs(approx - true) / np.maximum(scale, 1e-300)))


@claim("nystrom_full_rank", paper_ref="ours (about §4, App. B; the paper claims no exactness)",
       expected=Verdict.HOLDS_CORRECTED, order=50,
       perturbation="Nyström fitted on embeddings with 1e-3 noise (the landmarks are no longer the targets' own rows)",
       statement="OUR statement, not the paper's: with the linear kernel and d' >= rank of the embeddings (d' "
                 "landmarks drawn uniformly from the targets), the Nyström approximation of <q, t> is exact.")
def check(budget: Budget, rng) -> Outcome:
    n_inst = budget.cases(40, minimum=8)
    cases = viol = corr_bad = 0
    worst_exact = 0.0
    small = I.Smallest()
    for t in range(n_inst):
        dim = int(rng.choice([4, 16, 64]))
        r = int(rng.integers(1, dim + 1))
        n = int(rng.integers(max(r, 3 * r), 400))
        adversarial = t % 4 == 3
        G = rng.normal(size=(r, dim))
        if adversarial:  # one direction repeated, the r - 1 others once each
            T = np.vstack([np.repeat(G[:1], n - r + 1, axis=0), G[1:]])
        else:
            T = rng.normal(size=(n, r)) @ G * np.exp(rng.normal(size=(n, 1)))
        rank = int(np.linalg.matrix_rank(T))
        Qm = np.vstack([rng.normal(size=(3, r)) @ G, rng.normal(size=(3, dim))])  # in and outside the span
        for split in ("paper", "symmetric"):
            d = int(rng.integers(rank, min(3 * rank, T.shape[0]) + 1))
            Tfit = T + 1e-3 * np.linalg.norm(T) / np.sqrt(T.size) * rng.normal(size=T.shape) if budget.perturb else T
            ny = Nystrom(d, split=split, rng=int(rng.integers(1 << 31))).fit(Tfit)
            e = _err(ny, Qm, T)
            spans = int(np.linalg.matrix_rank(T[ny.landmark_ids])) == rank
            cases += 1
            if e > EXACT:
                viol += 1
                small.offer((T.shape[0], d), lambda: (
                    f"N={T.shape[0]} targets in R^{dim} of rank {rank} ({'one target repeated ' + str(n - r + 1) + ' times' if adversarial else 'generic'}), "
                    f"d'={d} >= rank uniform landmarks ({split} split) spanning rank "
                    f"{int(np.linalg.matrix_rank(T[ny.landmark_ids]))}: max relative inner-product error {e:.3g}."))
            if spans:
                worst_exact = max(worst_exact, e)
                if e > EXACT:
                    corr_bad += 1
            elif e <= EXACT and np.linalg.norm(T - ny.project(T)) > 1e-6 * np.linalg.norm(T):
                corr_bad += 1  # "exact iff spanning": a non-spanning set must show an error on some target
    return Outcome(I.verdict_printed_vs_corrected(viol, corr_bad), cases=cases, violations=viol,
                   counterexample=small.text, tightness=worst_exact / EXACT,
                   correction="exact iff the d' landmark embeddings span the embeddings' span (rank S^T T = rank T); "
                              "d' >= rank is necessary, not sufficient (uniform landmarks can repeat a direction).",
                   details=f"{cases} (instance, split) cases, a quarter adversarial (duplicates). Printed condition "
                           f"d' >= rank: {viol} inexact cases. Corrected condition (landmarks span): {corr_bad} "
                           f"contradictions; worst error when spanning {worst_exact:.2g} (tightness = error / {EXACT:g}).")

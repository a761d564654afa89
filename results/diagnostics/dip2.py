"""Diagnostic (not project code): at each evaluation, where does the top-1 target fall relative to the positive:
in its fine cluster (near-duplicates, ~25 targets), its coarse cluster, or elsewhere? Run from the repository root
(about 12 CPU minutes; run at commit 3991cde):
    PYTHONPATH=. python results/diagnostics/dip2.py snm-3"""
import dataclasses
import json
import os
import sys

import numpy as np
from refimpl import reproduce as R
import refimpl.training as TR
row = sys.argv[1]
sc = dataclasses.replace(R.FULL, eval_points=14)
orig = TR.evaluate
out = []
def ev(encoder, dataset, *a, **k):
    m = orig(encoder, dataset, *a, **k)
    ids = dataset.test_ids
    T = encoder.encode_targets(dataset.target_features)
    def scorer(sel):
        Q = encoder.encode_queries(dataset.query_features[sel])
        return lambda lo, hi: Q @ T[lo:hi].T
    top = TR._ranked_top_k(scorer, ids, T.shape[0], 1, 256, 2 ** 22)[:, 0]
    pos = np.array([dataset.positives[q][0] for q in ids])
    fine, coarse = dataset.metadata["fine_labels"], dataset.metadata["coarse_labels"]
    hit = top == pos
    same_fine = (fine[top] == fine[pos]) & ~hit
    same_coarse = (coarse[top] == coarse[pos]) & ~hit & ~same_fine
    out.append({"R@1": float(hit.mean()), "top1_other_in_fine": float(same_fine.mean()),
                "top1_other_in_coarse": float(same_coarse.mean()), "top1_elsewhere": float((~hit & ~same_fine & ~same_coarse).mean())})
    return m
TR.evaluate = ev
ds = R._planted(sc, 0)
rec = R.run_one(ds, "planted", row, 0, sc)
steps = [e["step"] for e in rec["evals"]]
for s_, o in zip(steps, out):
    print(row, s_, {k: round(v, 3) for k, v in o.items()}, flush=True)
json.dump({"row": row, "steps": steps, "out": out}, open(os.path.join(os.path.dirname(__file__), f"dip2_{row}.json"), "w"))

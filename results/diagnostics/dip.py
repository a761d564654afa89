"""Diagnostic (not project code): why do the hard-negative rows' R@1 dip after the uniform warm-up on the planted
task? Logs the gradient norm and the relative Adam update per step; variant 'reset' restarts Adam (m, v, counts = 0)
at the first mining step. Run from the repository root (about 12 CPU minutes; run at commit 3cd3aef):
    PYTHONPATH=. python results/diagnostics/dip.py snm-3 default   (or: snm-3 reset)"""
import dataclasses
import json
import os
import sys

import numpy as np
from refimpl import reproduce as R
from refimpl import optim
row, variant = sys.argv[1], sys.argv[2]
sc = dataclasses.replace(R.FULL, eval_points=14)
W = int(round(sc.warmup_fraction * sc.steps))
log = []
orig = optim.Adam.step
def step(self, grads):
    if variant == "reset" and self.t == W:
        for a in self.m + self.v: a[...] = 0
        for c in self.counts: c[...] = 0
    before = [p.copy() for p in self.params]
    g2 = sum(float(np.sum(np.asarray(g) ** 2)) for g in grads)
    lr = orig(self, grads)
    du = np.sqrt(sum(float(np.sum((p - b) ** 2)) for p, b in zip(self.params, before)))
    pn = np.sqrt(sum(float(np.sum(p ** 2)) for p in self.params))
    log.append({"t": self.t, "gnorm": g2 ** 0.5, "rel_update": du / pn, "lr": lr})
    return lr
optim.Adam.step = step
ds = R._planted(sc, 0)
rec = R.run_one(ds, "planted", row, 0, sc)
out = {"row": row, "variant": variant, "evals": [{"step": e["step"], "R@1": e["R@1"]} for e in rec["evals"]], "log": log}
json.dump(out, open(os.path.join(os.path.dirname(__file__), f"dip_{row}_{variant}.json"), "w"))
print(row, variant, [(e["step"], round(e["R@1"], 3)) for e in rec["evals"]])
g = np.array([l["gnorm"] for l in log]); u = np.array([l["rel_update"] for l in log])
for a, b in ((W - 25, W), (W, W + 10), (W + 10, W + 50), (W + 50, W + 175), (W + 175, 700)):
    print(f"steps {a + 1}-{b}: grad norm {g[a:b].mean():.3g}, relative update {u[a:b].mean():.3g}")

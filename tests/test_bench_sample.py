"""``python -m refimpl bench sample``: the NumPy float32 baseline it compares against is a correct softmax sampler
(both of its code paths), and the command runs end to end with one-line errors for bad arguments."""
from __future__ import annotations

import json
import subprocess
import sys

import numpy as np
import pytest

from refimpl.benchmarks import sample as B
from refimpl.data import hierarchical_points
from refimpl.testing import ALPHA, chi2_gof, required_sample_size

N_GOF = required_sample_size(0.04)  # 16,036 draws: power >= 0.99 at TV 0.04, alpha 0.001


@pytest.mark.parametrize("n,bs", [(3000, 4), (70_000, 1024)])
def test_numpy_baseline_follows_the_softmax(n, bs):
    """The baseline's draws for one query (repeated as a batch) follow the softmax of the float32 points
    (chi-square, alpha 0.001, n = 16,036, power >= 0.99 at TV 0.04): the one-GEMM path (bs x N fits in 256 MB)
    and the chunked two-pass path (bs x N > 2^26: per-chunk masses, then a recomputed chunk per draw)."""
    X = hierarchical_points(n, 8, rng=60, dtype=np.float32)
    q = X[9].astype(np.float64)
    assert (bs * n <= 1 << 26) == (n == 3000)
    Q = np.repeat(q[None], N_GOF // 4 + 1, axis=0)
    ids = B._numpy_float32_sampler(X, 1.0, Q, 4, 20.0, bs, np.random.default_rng(61)).ravel()[:N_GOF]
    s = 20.0 * (X.astype(np.float64) @ q)
    p = np.exp(s - s.max())
    assert chi2_gof(ids, p / p.sum())[0] > ALPHA


def test_bench_sample_smoke(tmp_path):
    """The command runs end to end on a small size (subprocess: it pins BLAS threads) and writes every sampler's
    row; bad arguments are one line on stderr with exit status 2."""
    out = tmp_path / "s.json"
    proc = subprocess.run([sys.executable, "-m", "refimpl", "bench", "sample", "--sizes", "3000", "--ks", "3",
                           "--data", "hierarchical", "--queries", "4", "--samplers", "exact,flat,adaptive",
                           "--json", str(out)], capture_output=True, text=True, timeout=600)
    assert proc.returncode == 0, proc.stderr[-2000:]
    res = json.loads(out.read_text())["results"]
    rows = res[0]["by_k"][0]["rows"]
    assert [r["sampler"] for r in rows][1:] == ["exact", "flat", "adaptive"]
    assert rows[0]["sampler"].startswith("numpy float32")
    for r in rows:
        assert r["ms_per_query"] > 0 and r["ip_per_query"] > 0
    assert res[0]["per_version_precompute_cpu_s"] >= 0
    for bad in (["--sizes", "0"], ["--samplers", "nope"], ["--queries", "5000", "--sizes", "3000"]):
        proc = subprocess.run([sys.executable, "-m", "refimpl", "bench", "sample", *bad], capture_output=True,
                              text=True, timeout=600)
        assert proc.returncode == 2 and proc.stdout == "", bad
        assert len(proc.stderr.strip().splitlines()) == 1, (bad, proc.stderr)

"""Every figure module runs with ``quick=True``, writes a non-empty PNG, and has a one-line caption; the CLI writes
CAPTIONS.md. (Figures are regenerated in full by ``python -m figures``; this only checks that each still runs.)"""
from pathlib import Path

import numpy as np
import pytest

import figures

MODULES = figures.load_all()


def test_registry_not_empty():
    assert len(MODULES) >= 1


@pytest.mark.parametrize("name", sorted(MODULES))
def test_figure_quick(name, tmp_path):
    mod = MODULES[name]
    assert isinstance(mod.CAPTION, str) and mod.CAPTION.strip() and "\n" not in mod.CAPTION
    out = Path(mod.make(tmp_path, np.random.default_rng(0), True))
    assert out.exists() and out.suffix == ".png" and out.parent == tmp_path
    data = out.read_bytes()
    assert data[:8] == b"\x89PNG\r\n\x1a\n" and len(data) > 5000


def test_cli_writes_captions(tmp_path):
    from figures.__main__ import main

    name = sorted(MODULES)[0]
    assert main(["--list"]) == 0
    with pytest.raises(SystemExit):
        main(["--only", "no_such_figure", "--out", str(tmp_path)])
    assert main(["--only", name, "--out", str(tmp_path), "--quick"]) == 0
    assert (tmp_path / f"{name}.png").exists()
    caps = (tmp_path / "CAPTIONS.md").read_text()
    for n, mod in MODULES.items():
        assert f"{n}.png" in caps and mod.CAPTION in caps


def test_mh_law_step_matches_transition_matrix():
    """The O(N log N) independent-MH law update of fig_mh_chain equals p @ K for the explicit N x N kernel
    K(x, y) = Q(y) min(1, w(y)/w(x)) (y != x), K(x, x) = 1 - sum_{y != x} K(x, y); ties in w included."""
    from figures.fig_mh_chain import mh_law_step

    gen = np.random.default_rng(3)
    n = 40
    lq = np.log(gen.dirichlet(np.ones(n)))
    lp = np.log(gen.dirichlet(np.ones(n) * 0.5))
    lp[5], lq[5] = lp[7], lq[7]  # a tie in w
    w = np.exp(lp - lq)
    K = np.exp(lq)[None, :] * np.minimum(1.0, w[None, :] / w[:, None])
    np.fill_diagonal(K, 0.0)
    K[np.arange(n), np.arange(n)] = 1.0 - K.sum(axis=1)
    p = gen.dirichlet(np.ones(n))
    for _ in range(5):
        ref = p @ K
        p = mh_law_step(p, lp - lq, lq)
        np.testing.assert_allclose(p, ref, rtol=1e-10, atol=1e-14)
    P = np.exp(lp)
    np.testing.assert_allclose(mh_law_step(P, lp - lq, lq), P, rtol=1e-10, atol=1e-14)  # P is stationary


def test_softmax_error_measured_below_certified():
    """Every plotted (level, beta) point of fig_softmax_error: measured max log P/Q <= certified log gamma,
    KL <= log gamma, TV <= 1 - 1/gamma; and the cluster proposal of _common is a distribution."""
    from figures import _common as C
    from figures.fig_softmax_error import compute
    from refimpl.index.sgtree import SGTree

    rows, _, _ = compute(np.random.default_rng(1), True)
    assert rows.shape[0] >= 5
    x, lr, cert, tv, tvb, kl = rows[:, 2:8].T
    assert np.all(lr <= cert + 1e-9) and np.all(kl <= cert + 1e-9) and np.all(tv <= tvb + 1e-9)
    T, Q = C.planted(300, 1, 8, np.random.default_rng(2))
    tree = SGTree.build(T, rng=0)
    lo, hi = tree.level_range()
    for L in (lo, (lo + hi) // 2, hi):
        lq = C.cluster_log_q(tree, tree.clustering(L), Q[0], 20.0)
        assert abs(np.exp(lq).sum() - 1.0) < 1e-9

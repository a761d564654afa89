"""Tests of refimpl.training: repeatability, accounting, evaluation, probes, the CLI, and bad input."""
import os

import numpy as np
import pytest

from refimpl.data import RetrievalDataset, planted_dataset
from refimpl.mining import (BruteForceTopK, FullSoftmax, InBatch, NegativeCache, StochasticNegativeMining, Uniform)
from refimpl.experiments import train_main
from refimpl.training import evaluate, train

FIX = os.path.join(os.path.dirname(__file__), "fixtures", "text_pairs")


@pytest.fixture(scope="module")
def ds():
    return planted_dataset(n_targets=300, n_queries=300, branching=(5, 6), n_features=16, dim=8, rng=2)


def _run(main, argv) -> int:
    """A CLI entry point's exit status (argparse errors exit through SystemExit)."""
    try:
        return main(argv)
    except SystemExit as exc:
        return int(exc.code or 0)


KW = dict(steps=24, batch_size=16, dim=8, uniform_warmup=4, n_uniform=8, probe_every=0)


@pytest.mark.parametrize("make", [lambda: StochasticNegativeMining(8, mem_percent=10, refresh_every=5),
                                  lambda: NegativeCache(8, size=30, policy="lru"), lambda: InBatch()])
def test_bit_for_bit_repeatable(ds, make):
    r1, r2 = train(ds, make(), seed=5, **KW), train(ds, make(), seed=5, **KW)
    assert [h["loss"] for h in r1.history] == [h["loss"] for h in r2.history]
    assert np.array_equal(r1.encoder.A, r2.encoder.A) and np.array_equal(r1.encoder.B, r2.encoder.B)
    f1, f2 = ({k: v for k, v in r.final.items() if "time" not in k} for r in (r1, r2))
    assert f1.keys() == f2.keys() and all(f1[k] == f2[k] or (np.isnan(f1[k]) and np.isnan(f2[k])) for k in f1)
    r3 = train(ds, make(), seed=6, **KW)
    assert not np.array_equal(r1.encoder.B, r3.encoder.B)


def test_probes_do_not_change_the_trajectory(ds):
    a = train(ds, StochasticNegativeMining(8, mem_percent=10, refresh_every=5), seed=1, **KW)
    b = train(ds, StochasticNegativeMining(8, mem_percent=10, refresh_every=5), seed=1, **{**KW, "probe_every": 5})
    assert np.array_equal(a.encoder.B, b.encoder.B) and len(b.probes) == 5 and not a.probes


def test_accounting(ds):
    n = ds.n_targets
    bf = train(ds, BruteForceTopK(8), seed=0, **KW)
    assert bf.final["encoder_calls_mining"] == n * (24 - 4) and bf.final["mem_percent"] == 100.0
    snm = StochasticNegativeMining(8, mem_percent=10, refresh_every=5)
    r = train(ds, snm, seed=0, **KW)
    assert snm.refreshed_at == [4, 9, 14, 19]
    assert r.final["encoder_calls_mining"] == 30 * 4 and r.final["mem_percent"] == pytest.approx(10.0)
    un = train(ds, Uniform(8), seed=0, **KW)
    assert un.final["encoder_calls_mining"] == 0 and un.final["mem_percent"] == 0.0
    assert 0 < un.final["encoder_calls_loss"] <= 24 * (16 + 16)  # positives + 8 mined + 8 uniform per step
    assert un.final["encoder_calls"] == un.final["encoder_calls_loss"]
    fs = train(ds, FullSoftmax(), seed=0, **KW)  # no uniform warm-up for the gold standard
    assert fs.final["encoder_calls_loss"] == n * 24 and all(h["mining"] for h in fs.history)
    assert all(h["n_negatives"] == n for h in fs.history)


def test_probe_values(ds):
    fs = train(ds, FullSoftmax(), seed=0, **{**KW, "probe_every": 6})
    assert len(fs.probes) == 4
    assert all(p["grad_rel_error"] < 1e-10 and abs(p["tv"]) < 1e-12 for p in fs.probes)
    un = train(ds, Uniform(8), seed=0, **{**KW, "probe_every": 6})
    assert all(p["grad_rel_error"] > 0.01 and 0.05 < p["tv"] < 1 for p in un.probes)


def test_evaluate_teacher_is_perfect_and_multi_positive_hits(ds):
    m = evaluate(ds.teacher, ds)
    assert m["R@1"] == 1.0 and m["MRR@10"] == 1.0
    # a hit if ANY positive is in the top k: give every test query a second positive = its rank-3 target
    t = ds.teacher
    S = t.encode_queries(ds.query_features) @ t.encode_targets(ds.target_features).T
    order = np.argsort(-S, axis=1)
    pos = [np.array([order[i, 4], order[i, 2]]) for i in range(ds.n_queries)]
    d2 = RetrievalDataset(ds.query_features, ds.target_features, pos, ds.train_ids, ds.test_ids)
    m2 = evaluate(t, d2, ks=(1, 2, 3, 5))
    assert m2["R@1"] == 0.0 and m2["R@2"] == 0.0 and m2["R@3"] == 1.0 and m2["R@5"] == 1.0
    assert m2["MRR@10"] == pytest.approx(1 / 3)


def test_learning_beats_initialisation(ds):
    r = train(ds, FullSoftmax(), steps=60, batch_size=32, dim=8, seed=0)
    r0 = train(ds, FullSoftmax(), steps=1, batch_size=32, dim=8, seed=0, lr_warmup=0, lr_decay=False, lr=1e-12)
    assert r.final["R@10"] > r0.final["R@10"] + 0.2


def test_log_q_correction_paths(ds):
    r = train(ds, StochasticNegativeMining(8, mem_percent=10), log_q_correction=True, in_batch=True, seed=0, **KW)
    assert np.isfinite(r.final["final_loss"])
    with pytest.raises(ValueError, match="log_q_correction"):
        train(ds, BruteForceTopK(8), log_q_correction=True, **KW)


def test_per_query_negatives_combine_with_shared(ds):
    r = train(ds, StochasticNegativeMining(4, mem_percent=10, shared=False), in_batch=True, seed=0, **KW)
    assert r.history[-1]["n_negatives"] == 4 + 8 + 16


def test_bad_input(ds, tmp_path, capsys):
    with pytest.raises(TypeError, match="dataset"):
        train({"positives": []}, Uniform(4))
    assert _run(train_main, ["--data", str(tmp_path), "--miner", "uniform"]) == 2
    assert "--data: " in capsys.readouterr().err
    with pytest.raises(TypeError, match="miner"):
        train(ds, "uniform")
    with pytest.raises(ValueError, match="steps"):
        train(ds, Uniform(4), steps=0)
    with pytest.raises(ValueError, match="lr_warmup"):
        train(ds, Uniform(4), steps=10, lr_warmup=20)


def test_train_main_on_text_fixture(capsys, tmp_path):
    out = tmp_path / "m.json"
    rc = train_main(["--data", FIX, "--miner", "negative-cache", "--steps", "12", "--batch-size", "4", "--k", "4",
                     "--mem-percent", "50", "--policy", "lru", "--n-features", "512", "--dim", "8",
                     "--no-progress", "--json", str(out), "--probe-every", "4"])
    text = capsys.readouterr().out
    assert rc == 0 and "| method | Mem % | R@1 | R@5 | R@10 | R@20 | R@100 |" in text
    assert "negative-cache" in text and "probes:" in text and out.exists()
    assert "| TF-IDF (no training) | - |" in text and "learning beat the TF-IDF baseline on R@1: " in text
    import json

    saved = json.loads(out.read_text())
    assert set(saved) == {"final", "baseline_tfidf", "beat_baseline", "config"}
    assert saved["config"]["init"] == "shared" and saved["config"]["sparse_updates"] is True
    assert saved["config"]["in_batch"] is True and saved["config"]["input_weights"] == "idf"  # the text defaults
    rc = train_main(["--data", FIX, "--miner", "uniform", "--steps", "3", "--batch-size", "4", "--k", "4",
                     "--n-features", "512", "--dim", "8", "--no-progress", "--json", str(out), "--no-in-batch",
                     "--input-weights", "none"])
    saved = json.loads(out.read_text())
    assert rc == 0 and saved["config"]["in_batch"] is False and saved["config"]["input_weights"] is None
    assert saved["config"]["log_q_correction"] is True          # the default for a miner with a proposal
    for miner, extra, want in [("brute-force", [], False), ("uniform", ["--no-log-q"], False)]:
        rc = train_main(["--data", FIX, "--miner", miner, "--steps", "3", "--batch-size", "4", "--k", "4",
                         "--n-features", "512", "--dim", "8", "--no-progress", "--json", str(out)] + extra)
        assert rc == 0 and json.loads(out.read_text())["config"]["log_q_correction"] is want
    assert "log-Q correction off" in capsys.readouterr().out


def test_log_q_offsets_of_mixed_sources_estimate_z_without_bias():
    """Mixed sources (k1 = 8 from a skewed proposal, k2 = 56 uniform): sum_j exp(s_j - log_c_j) with the offsets of
    ``_combine`` is an unbiased estimate of Z = sum_i exp(s_i). 20000 independent trials give a standard error of
    the mean of about 0.3 % of Z; the test allows 4 standard errors. Negative control: the per-source offset
    ``log(k_s q_s)`` (each source normalised as if it were alone) estimates 2 Z and fails by hundreds of standard
    errors."""
    from refimpl.training import _combine

    rng = np.random.default_rng(5)
    n, k1, k2, trials = 400, 8, 56, 20000
    s = rng.normal(0.0, 1.5, n)
    z = np.exp(s).sum()
    q1 = np.exp(1.2 * s)
    q1 /= q1.sum()
    est, wrong = np.empty(trials), np.empty(trials)
    for t in range(trials):
        a = rng.choice(n, size=k1, p=q1)
        b = rng.integers(0, n, size=k2)
        ids, log_c = _combine([(a, np.log(q1[a])), (b, np.full(k2, -np.log(n)))], 1)
        est[t] = np.exp(s[ids] - log_c).sum()
        lq = np.concatenate([np.log(q1[a]), np.full(k2, -np.log(n))])
        ks = np.concatenate([np.full(k1, k1), np.full(k2, k2)])
        wrong[t] = np.exp(s[ids] - lq - np.log(ks)).sum()
    se = est.std() / np.sqrt(trials)
    assert abs(est.mean() - z) < 4 * se, (est.mean(), z, se)
    assert abs(wrong.mean() - z) > 20 * wrong.std() / np.sqrt(trials)


def test_train_cli_passes_dynnibal_knobs_and_reports_bad_ones_cleanly(capsys):
    """The DyNNIBAL knobs reach the miner (its config is printed) and a knob the data cannot satisfy (more
    landmarks than targets) ends with exit status 2 and a one-line error, not a traceback."""
    from pathlib import Path

    data = str(Path(__file__).parent / "fixtures" / "text_pairs")
    code = train_main(["--data", data, "--miner", "dynnibal", "--steps", "5", "--n-landmarks", "500",
                       "--n-samples", "7", "--reencode-every", "3", "--sampler", "rejection", "--no-progress"])
    out = capsys.readouterr()
    assert code == 2
    assert "'n_samples': 7" in out.out and "'reencode_every': 3" in out.out and "'sampler': 'rejection'" in out.out
    assert out.err.startswith("python -m refimpl train: error: n_landmarks") and "Traceback" not in out.err


@pytest.mark.parametrize("extra, msg", [
    (["--steps", "0"], "argument --steps: must be an integer >= 1"),
    (["--batch-size", "-3"], "argument --batch-size: must be an integer >= 1"),
    (["--lr", "nan"], "argument --lr: must be a finite number in (0, 1000]"),
    (["--lr", "0"], "argument --lr: must be a finite number in (0, 1000]"),
    (["--beta", "-1"], "argument --beta: must be a finite number in (0, 10000]"),
    (["--mem-percent", "150"], "argument --mem-percent: must be a finite number in (0, 100]"),
    (["--n-features", "0"], "argument --n-features: must be an integer in [1, 67108864]"),
    (["--n-features", str(2 ** 40)], "argument --n-features: must be an integer in [1, 67108864]"),
    (["--seed", "-1"], "argument --seed: must be an integer in [0, "),
    (["--lr-warmup", "60", "--steps", "50"], "--lr-warmup: must be < --steps"),
    (["--n-landmarks", "0"], "argument --n-landmarks: must be an integer >= 1"),
    (["--steps", "x"], "argument --steps: must be an integer"),
    (["--optimizer", "sgd"], "argument --optimizer: invalid choice"),
    (["--json", "/nonexistent-dir/x.json"], "argument --json: directory '/nonexistent-dir' of"),
    (["--json", "/tmp"], "argument --json: must be a file path"),
    (["--tied", "--init", "independent"], "--tied"),
    (["--miner", "brute-force", "--log-q"], "--log-q: miner 'brute-force' has no sampling distribution"),
])
def test_train_cli_rejects_every_bad_argument_up_front(capsys, extra, msg, monkeypatch):
    """One line on stderr, exit 2, no traceback, and no work done (the loader is never reached)."""
    import refimpl.experiments

    monkeypatch.setattr(refimpl.experiments, "load_text_pairs", lambda *a, **k: pytest.fail("work before checks"))
    assert _run(train_main, ["--data", FIX, "--miner", "uniform", "--no-progress"] + extra) == 2
    err = capsys.readouterr().err
    assert msg in err and err.startswith("python -m refimpl train: error: ") and err.count("\n") == 1


def test_lazy_and_dense_updates_train_the_same_when_every_column_is_touched():
    """On dense features every column is touched at every step: the lazy and dense optimisers coincide; on CSR
    features they differ (untouched columns keep their weights under lazy Adam)."""
    from refimpl.text import load_text_pairs

    ds = planted_dataset(n_targets=200, n_queries=200, branching=(4, 5), n_features=12, dim=6, rng=1)
    kw = dict(steps=15, batch_size=16, dim=6, seed=0)
    a, b = train(ds, Uniform(8), sparse_updates=True, **kw), train(ds, Uniform(8), sparse_updates=False, **kw)
    assert np.array_equal(a.encoder.A, b.encoder.A) and np.array_equal(a.encoder.B, b.encoder.B)
    tx = load_text_pairs(os.path.join(FIX, "targets.tsv"), os.path.join(FIX, "queries.tsv"), n_features=512)
    kw = dict(steps=6, batch_size=3, dim=4, seed=0, lr_warmup=1)
    a, b = train(tx, Uniform(3), sparse_updates=True, **kw), train(tx, Uniform(3), sparse_updates=False, **kw)
    used = np.unique(np.concatenate([tx.query_features.indices, tx.target_features.indices]))
    unused = np.setdiff1d(np.arange(512), used)
    a0 = train(tx, Uniform(3), **{**kw, "steps": 1, "lr": 1e-300, "lr_warmup": 0, "lr_decay": False}).encoder
    assert np.array_equal(a.encoder.A[:, unused], a0.A[:, unused]) and not np.allclose(a.encoder.A, b.encoder.A)


def test_chunked_evaluation_equals_one_block_and_bounds_memory():
    """Tiny blocks give exactly the one-block metrics; with N = 200,000 targets and 2,000 queries the peak of
    traced allocations stays far below the N x chunk scores a one-block pass would hold (3.2 GB)."""
    import tracemalloc

    ds = planted_dataset(n_targets=300, n_queries=300, branching=(5, 6), n_features=16, dim=8, rng=2)
    enc = ds.teacher
    one = evaluate(enc, ds, ks=(1, 3, 10))
    assert evaluate(enc, ds, ks=(1, 3, 10), chunk=7, max_scores=50) == one
    rng = np.random.default_rng(0)
    n, nq, f = 200_000, 2_000, 4
    big = RetrievalDataset(rng.standard_normal((nq, f)), rng.standard_normal((n, f)),
                           [np.array([i]) for i in range(nq)], np.arange(1), np.arange(1, nq))
    from refimpl.encoders import LinearDualEncoder

    enc = LinearDualEncoder(f, f, 4, rng=0)
    tracemalloc.start()
    m = evaluate(enc, big, chunk=2_000, max_scores=2 ** 20)
    peak = tracemalloc.get_traced_memory()[1]
    tracemalloc.stop()
    assert peak < 150e6, peak                 # targets (6.4 MB x a few) + 2^20-score blocks, not 2000 x 200000
    assert 0.0 <= m["R@100"] <= 1.0


def test_paper_negative_counts_and_phase_times(ds):
    """The experiments' counts: k sampled per example shared by the batch (B k shared ids), n_uniform uniform per
    example, in-batch positives; every step records the CPU seconds of its phases. A DyNNIBAL run with the exact
    refresh re-initialises Alg. 6 every R mining steps (N encoder calls each)."""
    from refimpl.mining import DyNNIBAL

    calls = []

    class Spy(StochasticNegativeMining):
        def mine(self, ctx, batch):
            negs = super().mine(ctx, batch)
            calls.append(negs.ids.shape)
            return negs

    r = train(ds, Spy(4, mem_percent=20, refresh_every=5, per_example=True), steps=6, batch_size=16, dim=8,
              n_uniform=3, uniform_per_example=True, in_batch=True, seed=0)
    assert calls and all(c == (16 * 4,) for c in calls)
    assert all(h["n_negatives"] == 16 * 4 + 3 + 16 for h in r.history)
    assert all(h["cpu_mine"] >= 0 and h["cpu_loss"] > 0 and h["cpu_optimizer"] >= 0 for h in r.history)
    mi = DyNNIBAL(4, n_landmarks=8, n_samples=16, reencode_every=2, refresh_every=3, per_example=True)
    r = train(ds, mi, steps=9, batch_size=16, dim=8, uniform_warmup=1, seed=0)
    assert mi.refreshed_at == [4, 7] and r.final["encoder_calls_mining"] >= 3 * ds.n_targets


def test_idf_input_weights_reach_the_encoder_and_bad_ones_are_refused(ds):
    """``input_weights="idf"``: both towers carry the targets' IDF (the weights of the lexical baseline) and the
    trained encoder applies them (its encodings equal those of an unweighted copy on reweighted inputs)."""
    import scipy.sparse as sp

    from refimpl.text import idf_weights, load_text_pairs

    tx = load_text_pairs(os.path.join(FIX, "targets.tsv"), os.path.join(FIX, "queries.tsv"), n_features=512)
    r = train(tx, Uniform(3), steps=4, batch_size=3, dim=4, seed=0, lr_warmup=1, input_weights="idf")
    idf = idf_weights(tx.target_features)
    enc = r.encoder
    assert np.array_equal(enc.query_weights, idf) and np.array_equal(enc.target_weights, idf)
    assert r.config["input_weights"] == "idf"
    plain = enc.copy()
    plain.query_weights = plain.target_weights = None
    Xw = sp.csr_matrix(tx.target_features @ sp.diags(idf))
    np.testing.assert_allclose(enc.encode_targets(tx.target_features), plain.encode_targets(Xw), atol=1e-14)
    with pytest.raises(ValueError, match="input_weights"):
        train(tx, Uniform(3), steps=2, input_weights="bm25")
    with pytest.raises(ValueError, match="input_weights: 'idf' needs CSR"):
        train(ds, Uniform(3), steps=2, input_weights="idf")

"""Smoke tests of the demo command (tiny sizes; the real runs are `python -m refimpl demo`)."""
import json
import os

from refimpl.experiments import demo_main

HEADER = "| method | Mem % | R@1 | R@5 | R@10 | R@20 | R@100 | R@1 gap to BF (pts) |"


def test_demo_quick_prints_the_table(capsys, tmp_path):
    rc = demo_main(["--quick", "--n-targets", "240", "--n-queries", "200", "--steps", "12", "--probe-every", "6",
                    "--skip", "DyNNIBAL", "--no-progress", "--out-dir", str(tmp_path)])
    out = capsys.readouterr().out
    assert rc == 0 and HEADER in out
    for label in ("in-batch", "uniform", "SNM 1%", "SNM 3%", "SNM 10%", "Negative Cache", "brute force",
                  "full softmax"):
        assert f"| {label}" in out
    assert "full softmax beats uniform negatives on R@1:" in out
    assert os.path.exists(tmp_path / "demo_quick_curves.png")
    data = json.load(open(tmp_path / "demo_quick.json"))
    bf = next(m for m in data["methods"] if m["method"] == "brute force")
    assert bf["final"]["mem_percent"] == 100.0 and bf["final"]["encoder_calls_mining"] > 0


def test_claims_summary_verdicts():
    from refimpl.experiments import claims_summary
    from refimpl.training import TrainResult

    def row(label, r1, mem, mrr=0.5, calls=10):
        return label, TrainResult(final={"R@1": r1, "mem_percent": mem, "MRR@10": mrr, "encoder_calls": calls})

    base = [row("uniform", 0.30, 0), row("SNM 3%", 0.44, 3), row("SNM 10%", 0.46, 10),
            row("Negative Cache 6.3%", 0.47, 6.3), row("brute force", 0.50, 100)]
    good = claims_summary(base + [row("DyNNIBAL", 0.485, 0.3)])
    assert "DyNNIBAL 1.5 pts" in good and "SNM 3% 6.0 pts" in good and "CONFIRMED" in good
    assert "ratio 21.0x" in good
    bad = claims_summary(base + [row("DyNNIBAL", 0.47, 0.3)])
    assert "NOT confirmed" in bad
    assert "need the DyNNIBAL" in claims_summary(base)

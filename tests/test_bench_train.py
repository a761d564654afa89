"""`python -m refimpl bench train` (refimpl/benchmarks/train.py): the acceptance check on measured rows."""
from refimpl.benchmarks.train import acceptance


def _row(n, row, step, amort=None):
    return {"N": n, "row": row, "step": step, "amortised_step": step if amort is None else amort}


def test_acceptance_uses_steady_steps_and_the_limit_of_each_size():
    rows = [_row(100_000, "snm 3%", 10.0), _row(100_000, "dynnibal paper", 39.0, 80.0),
            _row(100_000, "brute-force", 300.0), _row(100_000, "dynnibal rejection", 101.0),
            _row(1_000_000, "brute-force", 3000.0), _row(1_000_000, "dynnibal mh", 299.0),
            _row(1_000_000, "snm 3% per-example", 100.0), _row(1_000_000, "dynnibal paper per-example", 100.5)]
    got = {(c["N"], c["claim"].split(" step")[0]): c for c in acceptance(rows)}
    assert set(got) == {(100_000, "dynnibal paper"), (100_000, "dynnibal rejection"), (1_000_000, "dynnibal mh"),
                        (1_000_000, "dynnibal paper per-example")}
    assert got[(100_000, "dynnibal paper")]["holds"] and got[(100_000, "dynnibal paper")]["amortised_ratio"] == 8.0
    assert not got[(100_000, "dynnibal rejection")]["holds"]        # 101 / 300 > 1/3
    assert got[(1_000_000, "dynnibal mh")]["holds"]                 # 299 / 3000 <= 1/10
    assert not got[(1_000_000, "dynnibal paper per-example")]["holds"]

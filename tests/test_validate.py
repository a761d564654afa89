"""Input validation helpers (DESIGN.md principles 4 and 5)."""
import numpy as np
import pytest
import scipy.sparse as sp

from refimpl._validate import (as_rng, check_features, check_ids, check_int, check_matrix, check_positive,
                               csr_arrays)


def test_as_rng_seed_is_reproducible_and_generator_passes_through():
    assert as_rng(3).integers(1 << 30) == as_rng(3).integers(1 << 30)
    g = np.random.default_rng(0)
    assert as_rng(g) is g
    with pytest.raises(TypeError, match="rng"):
        as_rng("seed")
    with pytest.raises(ValueError, match="rng"):
        as_rng(-1)


def test_check_matrix_rejects_bad_input():
    with pytest.raises(ValueError, match="X: expected a 2-D"):
        check_matrix("X", np.zeros(3))
    with pytest.raises(ValueError, match="NaN"):
        check_matrix("X", np.array([[np.nan]]))
    with pytest.raises(ValueError, match="empty"):
        check_matrix("X", np.zeros((0, 2)))
    with pytest.raises(ValueError, match="columns"):
        check_matrix("X", np.zeros((2, 2)), n_cols=3)
    out = check_matrix("X", [[1, 2]])
    assert out.dtype == np.float64 and out.flags.c_contiguous


def test_check_features_accepts_csr_only():
    X = sp.random(4, 5, density=0.5, format="csr", random_state=0)
    out = check_features("X", X)
    assert out.format == "csr" and out.has_canonical_format
    data, indices, indptr = csr_arrays(out)
    assert indices.dtype == np.int64 and indptr.dtype == np.int64 and data.dtype == np.float64
    with pytest.raises(TypeError, match="CSR"):
        check_features("X", X.tocoo())
    with pytest.raises(TypeError, match="CSR"):
        check_features("X", X.tocsc())


def test_scalar_and_id_checks():
    assert check_positive("beta", 2) == 2.0
    for bad in (0, -1.0, float("nan"), float("inf")):
        with pytest.raises(ValueError, match="beta"):
            check_positive("beta", bad)
    with pytest.raises(TypeError, match="beta"):
        check_positive("beta", "1")
    assert check_int("k", 3, low=1) == 3
    with pytest.raises(ValueError, match="k"):
        check_int("k", 0, low=1)
    np.testing.assert_array_equal(check_ids("ids", [0, 2], 3), [0, 2])
    with pytest.raises(ValueError, match="out of range"):
        check_ids("ids", [3], 3)
    with pytest.raises(TypeError, match="integers"):
        check_ids("ids", [0.5], 3)


def test_cli_help_lists_commands(capsys):
    from refimpl.cli import main

    assert main(["--help"]) == 0
    out = capsys.readouterr().out
    for cmd in ("demo", "train", "reproduce", "bench"):
        assert cmd in out
    assert main(["nonsense"]) == 2

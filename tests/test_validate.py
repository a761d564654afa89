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


# ---------------------------------------------------------------- classes of bad input (every validator)
_NOT_REAL = {
    "complex": np.array([[1 + 2j, 3.0]]),
    "object": np.array([[1.0, "a"]], dtype=object),
    "object_floats": np.array([[1.0, 2.0]], dtype=object),
    "bool": np.array([[True, False]]),
    "str": np.array([["1", "2"]]),
    "ragged": [[1.0, 2.0], [3.0]],
}


@pytest.mark.parametrize("kind", sorted(_NOT_REAL))
def test_non_real_arrays_are_a_type_error_naming_the_argument(kind):
    a = _NOT_REAL[kind]
    with pytest.raises(TypeError, match="^X:"):
        check_matrix("X", a)
    if kind != "ragged":
        from refimpl._validate import check_vector

        with pytest.raises(TypeError, match="^v:"):
            check_vector("v", np.asarray(a).reshape(-1))


def test_sparse_complex_and_bool_are_refused():
    X = sp.random(3, 4, density=0.5, format="csr", random_state=0)
    for bad in (X.astype(np.complex128), X.astype(bool)):
        with pytest.raises(TypeError, match="^X:"):
            check_features("X", bad)


def test_float32_overflow_is_a_value_error():
    with pytest.raises(ValueError, match="X: values overflow float32"):
        check_matrix("X", np.array([[1e300]]), dtype=np.float32)


@pytest.mark.parametrize("value", [2**63, -(2**63), 10**30])
def test_huge_integers_are_a_value_error_naming_the_argument(value):
    with pytest.raises(ValueError, match="^level:"):
        check_int("level", value)


def test_allocation_sizes_beyond_memory_are_a_value_error():
    with pytest.raises(ValueError, match="^dim: .*exceed this machine's memory"):
        check_int("dim", 10**13, low=1, itemsize=8)
    assert check_int("dim", 64, low=1, itemsize=8) == 64


@pytest.mark.parametrize("value", [None, "3", 3.0, [3], np.array([3]), True, np.bool_(True), 1 + 0j])
def test_wrong_object_types_for_integers_are_a_type_error(value):
    with pytest.raises(TypeError, match="^k:"):
        check_int("k", value)


@pytest.mark.parametrize("value", [None, "1", [1.0], 1 + 0j, True])
def test_wrong_object_types_for_reals_are_a_type_error(value):
    with pytest.raises(TypeError, match="^beta:"):
        check_positive("beta", value)


def test_check_positive_range_and_huge_python_ints():
    with pytest.raises(ValueError, match="^beta: must be finite"):
        check_positive("beta", 10**400)
    with pytest.raises(ValueError, match="^base: must be >= 1.01"):
        check_positive("base", 1 + 1e-9, low=1.01)
    with pytest.raises(ValueError, match="^base: must be <= 100"):
        check_positive("base", 1e3, high=100)


def test_ids_classes():
    with pytest.raises(TypeError, match="^ids:"):
        check_ids("ids", np.array([True, False]), 3)
    with pytest.raises(TypeError, match="^ids:"):
        check_ids("ids", np.array([1 + 0j]), 3)
    with pytest.raises(ValueError, match="^ids: id 18446744073709551615 out of range"):
        check_ids("ids", np.array([2**64 - 1], dtype=np.uint64), 3)

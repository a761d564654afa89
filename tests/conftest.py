"""Shared pytest configuration: hypothesis profiles.

- ``default``: lean, so the whole suite stays well under 10 minutes on 2 cores (Numba compile time included).
- ``thorough``: ``HYPOTHESIS_PROFILE=thorough python -m pytest`` for deep runs.
"""
import os

from refimpl._env import single_threaded_blas

single_threaded_blas()  # before NumPy is imported by any test module (see refimpl._env)

from hypothesis import HealthCheck, settings  # noqa: E402

settings.register_profile(
    "default",
    max_examples=25,
    deadline=None,
    derandomize=True,
    suppress_health_check=[HealthCheck.too_slow, HealthCheck.data_too_large],
)
settings.register_profile(
    "thorough",
    max_examples=500,
    deadline=None,
    suppress_health_check=[HealthCheck.too_slow, HealthCheck.data_too_large],
)
settings.load_profile(os.environ.get("HYPOTHESIS_PROFILE", "default"))


import pytest  # noqa: E402


@pytest.fixture
def rejection_path(monkeypatch):
    """The adaptive sampler switches to brute force only when a query's work reaches N (``BRUTE_SHARE`` = 1, the
    engine's rule), so that tests of its rejection path on small trees, where N / 8 is a few hundred, exercise it."""
    from refimpl.sampling import samplers

    monkeypatch.setattr(samplers, "BRUTE_SHARE", 1.0)

"""Shared fixtures for the native kernel tests (compiled kernels and pure twins)."""

from __future__ import annotations

from hypothesis import HealthCheck, settings

# Two shared cores: keep property tests small and free of deadlines.
settings.register_profile(
    "native",
    max_examples=40,
    deadline=None,
    suppress_health_check=[HealthCheck.too_slow, HealthCheck.data_too_large],
)
settings.load_profile("native")

"""Shared test configuration: hypothesis profiles and small helpers."""

from __future__ import annotations

import os
import zlib

import pytest
import torch
from hypothesis import HealthCheck
from hypothesis import settings

settings.register_profile(
    "ci", max_examples=30, deadline=None, suppress_health_check=[HealthCheck.too_slow]
)
settings.register_profile(
    "dev", max_examples=50, deadline=None, suppress_health_check=[HealthCheck.too_slow]
)
settings.load_profile(os.environ.get("HYPOTHESIS_PROFILE", "dev"))

torch.set_num_threads(max(1, min(2, torch.get_num_threads())))


@pytest.fixture(autouse=True)
def _seeded_global_rng(request: pytest.FixtureRequest) -> None:
    """Each test starts from torch's global generator seeded by its own name, so what an
    unseeded ``torch.randn`` in a test draws does not depend on which tests ran before it
    in the same worker (``pytest -n 2`` shares them out differently from run to run: a
    test whose batch happened to sort into its own order passed or failed by that)."""
    torch.manual_seed(zlib.crc32(request.node.nodeid.encode()))

"""DP aggregation with an infinite clip and no noise is the plain mean (0 * inf must not
turn into NaN), and infinite clip with noise is refused."""

from __future__ import annotations

import math

import pytest
import torch

import functorch_pipeline as fp


def test_infinite_clip_without_noise_is_the_mean():
    g = {"w": torch.tensor([[3.0, 4.0], [1.0, 2.0]], dtype=torch.float64)}
    tx = fp.optim.differentially_private_aggregate(math.inf, 0.0, seed=0)
    out, _ = tx.update(g, tx.init({"w": torch.zeros(2, dtype=torch.float64)}))
    torch.testing.assert_close(out["w"], g["w"].mean(0), rtol=0, atol=0)


def test_infinite_clip_with_noise_is_refused():
    with pytest.raises(ValueError, match="finite `l2_norm_clip`"):
        fp.optim.differentially_private_aggregate(math.inf, 1.0, seed=0)

"""Shared by the per-sample gradient tests: the independent reference (one
``torch.autograd.grad`` per example), the parameter dict of a module, and float64 as the
default dtype for a test module (import ``float64_default`` into it: an autouse fixture)."""

from __future__ import annotations

import pytest
import torch
import torch.nn.functional as F
from torch import nn


@pytest.fixture(autouse=True)
def float64_default():
    old = torch.get_default_dtype()
    torch.set_default_dtype(torch.float64)
    yield
    torch.set_default_dtype(old)


def params_of(module: nn.Module) -> dict[str, torch.Tensor]:
    return {k: v.detach() for k, v in module.named_parameters()}


def loop_grads(loss_fn, params, *batch):
    """The reference: one ``torch.autograd.grad`` per example (batches of one)."""
    rows = []
    for i in range(batch[0].shape[0]):
        p = {k: v.detach().clone().requires_grad_() for k, v in params.items()}
        loss = loss_fn(p, *(b[i:i + 1] for b in batch))
        assert loss.shape == (1,)
        grads = torch.autograd.grad(loss.sum(), list(p.values()), allow_unused=True)
        rows.append([torch.zeros_like(v) if g is None else g
                     for v, g in zip(p.values(), grads, strict=True)])
    return {k: torch.stack([r[j] for r in rows]) for j, k in enumerate(params)}


class SmallConvNet(nn.Module):
    """A tiny CNN for the engine tests: conv 1 -> 4 (3x3), ReLU, Linear to 5 classes, on
    ``side x side`` single-channel images."""

    def __init__(self, side: int = 8) -> None:
        super().__init__()
        self.conv = nn.Conv2d(1, 4, 3)
        self.fc = nn.Linear(4 * (side - 2) ** 2, 5)

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        return self.fc(F.relu(self.conv(x)).flatten(1))


class StraightThrough(torch.autograd.Function):
    """``w.round()`` forward, the identity backward (a straight-through estimator), in the
    ``setup_context`` style that ``vmap`` runs: a custom Function the fast methods refuse."""

    generate_vmap_rule = True

    @staticmethod
    def forward(w):
        return w.round()

    @staticmethod
    def setup_context(ctx, inputs, output):
        pass

    @staticmethod
    def backward(ctx, g):
        return g

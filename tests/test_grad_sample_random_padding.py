"""NOTE [random draws in a padded run]: a model that draws random numbers per example in
training mode (dropout, stochastic depth) and needs a padded run (rows merged into axis 0)
takes the fast path on every draw, with a per-example loop's numbers when each example
replays the masks its rows drew. Before, the padding examples drew masks of their own,
the proof of the merged rows failed in some calls and not others, and the default method
fell back to ``vmap``, which refuses PyTorch's global RNG."""

from __future__ import annotations

import warnings

import pytest
import torch
import torch.nn.functional as F
from per_example_reference import float64_default  # noqa: F401 (autouse fixture)
from per_example_reference import params_of
from test_grad_sample_broadcast import close
from torch import nn

import functorch_pipeline as fp
from functorch_pipeline.transforms._grad_sample import _padding
from functorch_pipeline.transforms._grad_sample._same_draws import SameDraws

torchvision = pytest.importorskip("torchvision")

D, W = 4, 2  # features; rows per window


class Windows(nn.Module):
    """Swin's pattern in small: windows of ``W`` positions merged into axis 0, a layer on
    them, dropout (its mask observable as the dropout of ones), stochastic depth (a
    ``bernoulli_`` per example), then a second windowed layer, whose merged rows only a
    padded run proves, after the draws. ``replay`` gives the masks instead of drawing."""

    def __init__(self) -> None:
        super().__init__()
        self.proj, self.proj2, self.head = nn.Linear(D, D), nn.Linear(D, D), nn.Linear(D, 3)
        self.drawn: tuple[torch.Tensor, torch.Tensor] | None = None

    def forward(self, x: torch.Tensor, replay: tuple | None = None) -> torch.Tensor:
        B, T, _ = x.shape
        h = self.proj(_windows(x))
        drop = F.dropout(torch.ones_like(h), 0.5, self.training) if replay is None else replay[0]
        h = torch.tanh(h * drop).reshape(B, T, D)
        keep = torch.empty(B, 1, 1).bernoulli_(0.7) if replay is None else replay[1]
        h = x + h * keep / 0.7
        self.drawn = (drop, keep)
        return self.head(self.proj2(_windows(h)).reshape(B, -1, D).mean(1))


def _windows(h: torch.Tensor) -> torch.Tensor:
    """Positions ``j, j + T / W, ...`` as one window (a permute before the merge, as Swin's
    partition has): ``(B * T / W, W, D)``, rows of one example consecutive."""
    B, T, _ = h.shape
    return h.reshape(B, W, T // W, D).transpose(1, 2).reshape(B * (T // W), W, D)


def ce_losses(model: nn.Module):
    def losses(p, xb, yb):
        return F.cross_entropy(torch.func.functional_call(model, p, (xb,)), yb, reduction="none")

    return losses


def replayed(model: Windows, drawn: tuple, params: dict, x: torch.Tensor, y: torch.Tensor,
             i: int) -> list:
    """Example ``i``'s gradient with the masks its rows drew (``drawn``, a padded run's)."""
    windows = x.shape[1] // W
    p = {k: v.clone().requires_grad_() for k, v in params.items()}
    replay = (drawn[0][i * windows:(i + 1) * windows], drawn[1][i:i + 1])
    out = torch.func.functional_call(model, p, (x[i:i + 1],), {"replay": replay})
    return list(torch.autograd.grad(F.cross_entropy(out, y[i:i + 1]), list(p.values())))


@pytest.mark.parametrize("what", ["grads (auto: hooks)", "norms (ghost)"])
def test_random_masks_in_a_padded_run_match_the_replayed_loop(what):
    torch.manual_seed(0)
    model = Windows().train()
    params = params_of(model)
    x, y = torch.randn(3, 4, D), torch.tensor([0, 2, 1])
    for seed in range(12):
        torch.manual_seed(seed)
        with warnings.catch_warnings():
            warnings.simplefilter("error")  # no fall-back, on any draw
            if what.startswith("grads"):
                got = fp.per_sample_grads(ce_losses(model))(params, x, y)
            else:
                norms = fp.per_sample_grad_norms(ce_losses(model), method="ghost")(params, x, y)
        drawn = model.drawn
        assert drawn[0].shape[0] > 3 * 2  # the run that returned was padded
        for i in range(3):
            want = replayed(model, drawn, params, x, y, i)
            if what.startswith("grads"):
                assert all(close(got[k][i], g) for k, g in zip(params, want, strict=True)), (seed, i)
            else:
                assert close(norms[i], torch.cat([g.reshape(-1) for g in want]).norm()), (seed, i)


@pytest.mark.parametrize("batch", [2, 3])
def test_torchvision_swin_in_training_mode_takes_the_fast_path_on_every_draw(batch):
    """Stochastic depth 0.5 and dropout 0.2: before, some seeds fell back to ``vmap``,
    which raised (PyTorch's RNG under ``randomness="error"``)."""
    torch.manual_seed(batch)
    model = torchvision.models.SwinTransformer(
        patch_size=[2, 2], embed_dim=8, depths=[2, 2], num_heads=[2, 2], window_size=[2, 2],
        num_classes=3, stochastic_depth_prob=0.5, dropout=0.2).train()
    params = params_of(model)
    x, y = torch.randn(batch, 3, 8, 8), torch.randint(0, 3, (batch,))
    losses = ce_losses(model)
    for seed in range(8):
        torch.manual_seed(seed)
        with warnings.catch_warnings():
            warnings.simplefilter("error")
            grads = fp.per_sample_grads(losses)(params, x, y)
            clipped, norms = fp.clipped_grad(losses, 1.0)(params, x, y)
        assert all(torch.isfinite(g).all() for g in grads.values())
        assert torch.isfinite(norms).all() and norms.shape == (batch,)


def test_a_model_that_draws_nothing_never_pays_for_the_mode(monkeypatch):
    """A padded run of a deterministic model runs without the mode (it costs every op a
    Python call); the same model with dropout on enters it."""
    made = []

    class Counting(SameDraws):
        def __init__(self, real: int, padded: int) -> None:
            made.append((real, padded))
            super().__init__(real, padded)

    monkeypatch.setattr(_padding, "SameDraws", Counting)
    torch.manual_seed(2)
    model = Windows().eval()  # F.dropout off; bernoulli_ still draws: replay it
    params = params_of(model)
    x, y = torch.randn(3, 4, D), torch.tensor([0, 1, 2])
    fixed = (torch.ones(40, W, D), torch.ones(20, 1, 1))  # enough rows for a padded batch

    def deterministic(p, xb, yb):
        replay = (fixed[0][: xb.shape[0] * 2], fixed[1][: xb.shape[0]])
        out = torch.func.functional_call(model, p, (xb,), {"replay": replay})
        return F.cross_entropy(out, yb, reduction="none")

    fp.per_sample_grads(deterministic, method="hooks")(params, x, y)
    assert made == []
    model.train()
    random = ce_losses(model)
    for seed in range(6):  # a padded run without the mode may pass by luck: some will not
        torch.manual_seed(seed)
        fp.per_sample_grads(random, method="hooks")(params, x, y)
    assert made and all(m == (3, 4) for m in made)


def test_padding_rows_of_a_draw_copy_the_first_examples_rows():
    """The mode itself: bernoulli_, rand_like and dropout masks with m rows per example."""
    with SameDraws(2, 4):
        a = torch.empty(8, 3).bernoulli_(0.5)  # m = 2
        b = torch.rand_like(torch.empty(4, 5))
        c = F.dropout(torch.ones(4, 6), 0.5, True)
        d = torch.rand(5, 2)  # 5 is no multiple of 4: left alone
    assert torch.equal(a[4:], a[:2].repeat(2, 1))
    assert torch.equal(b[2:], b[:1].repeat(2, 1))
    assert torch.equal(c[2:], c[:1].repeat(2, 1)) and set(c.unique().tolist()) <= {0.0, 2.0}
    assert not torch.equal(d[4:], d[:1])

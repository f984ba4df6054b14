"""Ghost clipping in float32 (NOTE [centred Gram sums] in ``_grad_sample/_ghost_math.py``
and NOTE [long rows] in ``tree/_math.py``): per-example norms against a float64
per-example loop, beside the float32 loop's own error (the floor). Inputs that share a
large part across positions made the Gram sums cancel (1-5% off, a clipped example above
the bound, one under the bound clipped), and float32 norms of very long rows were 1.3e-3
low."""

from __future__ import annotations

import copy

import pytest
import torch
import torch.nn.functional as F
from per_example_reference import loop_grads
from torch import nn
from torch.func import functional_call

import functorch_pipeline as fp
from functorch_pipeline.transforms._grad_sample._ghost_math import _centred_gram_sq
from functorch_pipeline.tree._math import _rows_sq_norms


def _loop_norms(model: nn.Module, lossf, x, y) -> torch.Tensor:
    p = {k: v.detach().clone().requires_grad_() for k, v in model.named_parameters()}
    out = []
    for b in range(x.shape[0]):
        gs = torch.autograd.grad(lossf(functional_call(model, p, (x[b:b + 1],)), y[b:b + 1]).sum(),
                                 list(p.values()))
        out.append(torch.stack([g.double().square().sum() for g in gs]).sum().sqrt())
    return torch.stack(out)


def _errors(model, lossf, x, y, max_norm):
    ref = _loop_norms(copy.deepcopy(model).double(), lossf, x.double(), y)
    floor = ((_loop_norms(model, lossf, x, y) - ref).abs() / ref).max().item()
    params = {k: v.detach() for k, v in model.named_parameters()}
    total, norms = fp.clipped_grad(lambda p, x, y: lossf(functional_call(model, p, (x,)), y),
                                   max_norm, method="ghost")(params, x, y)
    return ((norms.double() - ref).abs() / ref).max().item(), max(floor, 1e-7), total, ref


def test_offset_inputs_on_the_gram_path():
    torch.manual_seed(0)
    B, T, D = 4, 128, 256  # T (2 D) <= D^2: the Gram path
    x = torch.randn(B, T, D) + 1e3
    y = torch.randn(B, T, D)
    y = y - y.mean(1, keepdim=True)  # output gradients centred over the positions
    err, floor, _, _ = _errors(nn.Linear(D, D), lambda o, y: (o * y).sum((1, 2)), x, y, 1.0)
    assert err < 20 * floor, (err, floor)  # was 1.45e-2 against a floor of 7.7e-7


class _LinearInstanceNorm(nn.Module):
    def __init__(self, d: int = 256) -> None:
        super().__init__()
        self.lin, self.head = nn.Linear(d, d), nn.Linear(d, 10)

    def forward(self, x):
        h = F.instance_norm(self.lin(x).transpose(1, 2)).transpose(1, 2)
        return self.head(torch.tanh(h)).mean(1)


def test_a_clipped_example_stays_within_the_bound():
    torch.manual_seed(1)
    m = _LinearInstanceNorm()
    x = torch.randn(4, 128, 256)
    x[:, :, 0] += 1e4  # one large feature, cancelled by the instance norm's gradient
    y = torch.randint(0, 10, (4,))
    lossf = lambda o, y: F.cross_entropy(o, y, reduction="none")  # noqa: E731
    err, floor, _, _ = _errors(m, lossf, x, y, 1.0)
    assert err < 20 * floor, (err, floor)  # was 4.1-4.5% low
    total, _ = fp.clipped_grad(lambda p, x, y: lossf(functional_call(m, p, (x,)), y), 0.5,
                               method="ghost")({k: v.detach() for k, v in m.named_parameters()},
                                               x[:1], y[:1])
    norm = torch.stack([v.double().square().sum() for v in total.values()]).sum().sqrt().item()
    assert norm <= 0.5 * (1 + 1e-5)  # was 0.523


def test_a_small_norm_is_not_rounding_noise():
    # An example whose input is nearly the same at every position: its gradient cancels to
    # 0.288 where the others are ~3e3; the uncentred Gram sum read 0.795 and clipped it.
    torch.manual_seed(2)
    B, T, D = 3, 128, 256
    lin = nn.Linear(D, D)
    x = torch.randn(B, T, D)
    x[0] = 50 + 1e-3 * torch.randn(T, D)
    y = torch.randn(B, T, D)
    y[0] = y[0] - y[0].mean(0)
    lossf = lambda o, y: (o * y).sum((1, 2))  # noqa: E731
    _, _, _, ref = _errors(lin, lossf, x, y, 1.0)
    assert ref[0] < 1e-2 * ref[1:].min()
    max_norm = 2 * ref[0].item()
    total, norms = fp.clipped_grad(lambda p, x, y: lossf(functional_call(lin, p, (x,)), y), max_norm,
                                   method="ghost")({k: v.detach() for k, v in lin.named_parameters()},
                                                   x[:1], y[:1])
    assert abs(norms[0].item() - ref[0].item()) < 1e-3 * ref[0].item()
    # under the bound: not clipped, the sum is the example's own gradient
    got = torch.stack([v.double().square().sum() for v in total.values()]).sum().sqrt().item()
    assert got == pytest.approx(ref[0].item(), rel=1e-3)


def test_conv_gram_path_with_offset_inputs():
    torch.manual_seed(3)
    # L (din + cout) <= din cout: 36 * (576 + 64) <= 576 * 64, the conv's Gram path
    m = nn.Sequential(nn.Conv2d(64, 64, 3), nn.InstanceNorm2d(64), nn.Flatten(), nn.Linear(64 * 36, 5))
    x = torch.randn(3, 64, 8, 8) + 300
    y = torch.randint(0, 5, (3,))
    err, floor, _, _ = _errors(m, lambda o, y: F.cross_entropy(o, y, reduction="none"), x, y, 1.0)
    assert err < 20 * floor, (err, floor)


def test_long_rows_are_summed_in_blocks():
    torch.manual_seed(4)
    t = torch.rand(2, (1 << 23) + 7)  # positive entries: every rounding of a long sum errs low
    ref = t.double().square().sum(1)
    got = _rows_sq_norms(t, torch.float32).double()
    assert ((got - ref).abs() / ref).max().item() < 1e-6  # was ~7e-4 at this length
    short = torch.rand(3, 1000)
    torch.testing.assert_close(_rows_sq_norms(short, torch.float32),
                               torch.linalg.vector_norm(short, dim=1).square(), rtol=0, atol=0)


@pytest.mark.parametrize("offset", [0.0, 3.0, 100.0])
def test_centred_sums_of_bfloat16_inputs(offset):
    # The means were taken and subtracted in bfloat16: 7e-4 off the exact norm of the same
    # bfloat16 values (autocast's dtype), 1e-3 to 2e-3 end to end under autocast.
    torch.manual_seed(5)
    a = (torch.randn(3, 64, 128) + offset).bfloat16()
    g = torch.randn(3, 64, 96).bfloat16()
    exact = torch.einsum("btd,bte->bde", g.double(), a.double()).square().sum((1, 2))
    got = _centred_gram_sq(a, g).double()
    assert ((got - exact).abs() / exact).max().item() < 1e-5


# NOTE [centred Gram sums], last paragraph: padding positions (input rows exactly 0) with
# huge output gradients (torchvision's Swin v2 normalises its padded zero queries) swamped
# the centred Gram sum: norms of 201,995 for the loop's 186, a clipped sum off by its size.


def _padded_rows_losses():
    torch.manual_seed(0)
    lin = torch.nn.Linear(64, 64, bias=False).double()
    pad = torch.zeros(1, 8, 1, dtype=torch.float64)
    pad[:, 5:] = 1.0  # the last 3 positions are padding

    def losses(p, x):
        h = torch.func.functional_call(lin, p, (x * (1 - pad),))  # padded inputs are exactly 0
        # a huge gradient at the padded positions (as 1/eps from normalising zero rows)
        return (h * (1 + 1e11 * pad)).tanh().sum((1, 2))

    return {k: v.detach() for k, v in lin.named_parameters()}, torch.randn(3, 8, 64, dtype=torch.float64), losses


def test_ghost_norms_ignore_huge_gradients_at_zero_input_rows():
    params, x, losses = _padded_rows_losses()
    ref = loop_grads(losses, params, x)["weight"].flatten(1).norm(dim=1)
    got = fp.per_sample_grad_norms(losses, method="ghost")(params, x)
    torch.testing.assert_close(got, ref, rtol=1e-10, atol=0)


def test_swin_v2_window_attention_on_a_map_smaller_than_its_window():
    from torchvision.models.swin_transformer import ShiftedWindowAttentionV2

    torch.manual_seed(0)
    attn = ShiftedWindowAttentionV2(256, [8, 8], [0, 0], 8).double().eval()
    params = {k: v.detach() for k, v in attn.named_parameters() if k.startswith("qkv.")}
    rest = {k: v.detach() for k, v in attn.named_parameters() if not k.startswith("qkv.")}
    x = torch.randn(2, 2, 2, 256, dtype=torch.float64)  # a 2 x 2 map, padded to the 8 x 8 window

    def losses(p, x):
        return torch.func.functional_call(attn, {**rest, **p}, (x,)).pow(2).flatten(1).sum(1)

    per = loop_grads(losses, params, x)
    ref = torch.cat([g.flatten(1) for g in per.values()], 1).norm(dim=1)
    torch.testing.assert_close(fp.per_sample_grad_norms(losses, method="ghost")(params, x), ref,
                               rtol=1e-10, atol=0)
    total, _ = fp.clipped_grad(losses, 1.0, method="ghost")(params, x)
    factor = (1.0 / ref).clamp(max=1)
    for k, g in per.items():
        torch.testing.assert_close(total[k], (factor.view(-1, *[1] * (g.dim() - 1)) * g).sum(0),
                                   rtol=1e-9, atol=1e-12)

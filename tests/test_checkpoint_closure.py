"""NOTE [tensors checkpoint does not receive] (``transforms/_control.py``): a tensor that
requires grad and that ``fp.checkpoint``'s function reads from its closure got no
gradient, silently 0 (``loss.backward()``, ``fp.grad``), or a PyTorch internal assert
under ``fp.vmap``. It is now refused, naming it; passed as an argument, the gradients
equal autograd's without the checkpoint."""

from __future__ import annotations

import pytest
import torch
import torch.nn.functional as F
from torch import nn
from torch.func import functional_call

import functorch_pipeline as fp


class _Net(nn.Module):
    def __init__(self, mode: str) -> None:
        super().__init__()
        self.mode = mode
        self.l1, self.l2 = nn.Linear(4, 5), nn.Linear(5, 3)

    def forward(self, x):
        h = self.l1(x)
        if self.mode == "closure":
            return fp.checkpoint(lambda h: self.l2(torch.tanh(h)))(h)
        if self.mode == "argument":
            return fp.checkpoint(lambda p, h: functional_call(self.l2, p, (torch.tanh(h),)))(
                dict(self.l2.named_parameters()), h)
        return self.l2(torch.tanh(h))


def _pair(mode: str) -> tuple[nn.Module, nn.Module]:
    torch.manual_seed(0)
    m = _Net(mode).double()
    plain = _Net("plain").double()
    plain.load_state_dict(m.state_dict())
    return m, plain


def test_a_closed_over_parameter_is_refused_under_backward():
    m, _ = _pair("closure")
    x = torch.randn(6, 4, dtype=torch.float64)
    with pytest.raises(ValueError, match=r"checkpoint: f reads a tensor that requires grad and is not "
                       r"one of its arguments \(shape \(3, 5\), torch.float64, used by `linear`\)"):
        m(x).sum().backward()


def test_passed_as_an_argument_it_gets_autograd_gradients():
    m, plain = _pair("argument")
    x = torch.randn(6, 4, dtype=torch.float64)
    m(x).square().sum().backward()
    plain(x).square().sum().backward()
    for (k, a), b in zip(m.named_parameters(), plain.parameters(), strict=True):
        torch.testing.assert_close(a.grad, b.grad, rtol=0, atol=1e-12, msg=k)


@pytest.mark.parametrize("transform", ["grad", "vmap_grad"])
def test_a_closed_over_parameter_is_refused_under_fp_transforms(transform):
    m, _ = _pair("closure")
    params = {k: v.detach() for k, v in m.named_parameters()}
    x, y = torch.randn(5, 4, dtype=torch.float64), torch.randint(0, 3, (5,))

    def loss(p, x, y):
        return F.cross_entropy(functional_call(m, p, (x,)), y)

    with pytest.raises(ValueError, match="checkpoint: f reads a tensor that requires grad"):
        if transform == "grad":
            fp.grad(loss)(params, x, y)
        else:
            fp.vmap(fp.grad(loss), in_axes=(None, 0, 0))(params, x[:, None], y[:, None])


def test_argument_form_under_vmap_grad_matches_the_loop():
    m, plain = _pair("argument")
    params = {k: v.detach() for k, v in m.named_parameters()}
    x, y = torch.randn(5, 4, dtype=torch.float64), torch.randint(0, 3, (5,))
    got = fp.vmap(fp.grad(lambda p, x, y: F.cross_entropy(functional_call(m, p, (x,)), y)),
                  in_axes=(None, 0, 0))(params, x[:, None], y[:, None])
    for i in range(5):
        p = {k: v.clone().requires_grad_() for k, v in params.items()}
        want = torch.autograd.grad(F.cross_entropy(functional_call(plain, p, (x[i:i + 1],)), y[i:i + 1]),
                                   list(p.values()))
        for k, w in zip(p, want, strict=True):
            torch.testing.assert_close(got[k][i], w, rtol=0, atol=1e-12, msg=k)


def test_without_gradients_a_closure_is_fine():
    m, plain = _pair("closure")
    x = torch.randn(6, 4, dtype=torch.float64)
    with torch.no_grad():
        torch.testing.assert_close(m(x), plain(x), rtol=0, atol=0)
    const = torch.randn(5, dtype=torch.float64)  # a closed-over tensor without grad
    w = torch.randn(5, dtype=torch.float64, requires_grad=True)
    fp.checkpoint(lambda w: (w * const).sin())(w).sum().backward()
    torch.testing.assert_close(w.grad, const * (w * const).cos().detach(), rtol=0, atol=1e-12)


def test_tensors_f_makes_itself_may_require_grad():
    # an inner derivative of a tensor f creates is not a closed-over tensor
    def f(x):
        with torch.enable_grad():
            w = torch.ones(4, dtype=torch.float64, requires_grad=True)  # made by f
            (score,) = torch.autograd.grad((w * x.detach()).sum(), w)  # = x
        return x * score

    x = torch.randn(4, dtype=torch.float64, requires_grad=True)
    (g,) = torch.autograd.grad(fp.checkpoint(f)(x).sum(), x)
    torch.testing.assert_close(g, x.detach(), rtol=0, atol=1e-12)


def test_the_refusal_says_how_to_ask_for_input_gradients_only():
    m, _ = _pair("closure")
    x = torch.randn(6, 4, dtype=torch.float64, requires_grad=True)
    with pytest.raises(ValueError, match=r"turn that tensor's requires_grad off \(model.requires_grad_\(False\)\)"):
        torch.autograd.grad(m(x).sum(), x)
    m.requires_grad_(False)
    (g,) = torch.autograd.grad(m(x).sum(), x)
    _, plain = _pair("closure")
    plain.mode = "plain"
    x2 = x.detach().clone().requires_grad_()
    (want,) = torch.autograd.grad(plain(x2).sum(), x2)
    torch.testing.assert_close(g, want, rtol=0, atol=1e-12)

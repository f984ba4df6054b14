"""Hooks on activations and modules (NOTE [tensor hooks on a recorded output] in
``_grad_sample/_engine.py``, and the refusal of ``Module.register_backward_hook`` in
``_state.py``): a tensor hook on a layer's output reached the layers below it but not
that layer's own per-example gradients (error 1.65), and a legacy module backward hook
that scales its gradients was missed by that layer (1/3 of the loop's); both are now
refused by the fast methods and the default method runs vmap. The reference is a
per-example autograd loop in float64, which applies the hooks."""

from __future__ import annotations

import warnings

import pytest
import torch
import torch.nn.functional as F
from per_example_reference import float64_default  # noqa: F401 (autouse fixture)
from per_example_reference import loop_grads
from per_example_reference import params_of
from torch import nn
from torch.func import functional_call

import functorch_pipeline as fp


class _Hooked(nn.Module):
    """Three layers; ``hook`` is registered on the output of layer ``where``."""

    def __init__(self, where: int, hook, conv: bool = False) -> None:
        super().__init__()
        self.where, self.hook, self.conv = where, hook, conv
        if conv:
            self.l1 = nn.Conv1d(2, 3, 3)
            self.l2 = nn.Conv1d(3, 4, 3)
            self.l3 = nn.Linear(4 * 4, 3)
        else:
            self.l1, self.l2, self.l3 = nn.Linear(4, 5), nn.Linear(5, 5), nn.Linear(5, 3)

    def forward(self, x):
        z1 = self.l1(x)
        if self.where == 1 and z1.requires_grad:
            z1.register_hook(self.hook)
        z2 = self.l2(torch.tanh(z1))
        if self.where == 2 and z2.requires_grad:
            z2.register_hook(self.hook)
        z3 = self.l3(torch.tanh(z2).flatten(1))
        if self.where == 3 and z3.requires_grad:
            z3.register_hook(self.hook)
        return z3


_HOOKS = {
    "scale": lambda g: -3 * g,
    "clamp": lambda g: g.clamp(-0.05, 0.05),
    "observe": lambda g: None,
}


@pytest.mark.parametrize("conv", [False, True])
@pytest.mark.parametrize("hook", sorted(_HOOKS))
@pytest.mark.parametrize("where", [1, 2, 3])
def test_a_tensor_hook_on_a_layer_output(where, hook, conv):
    # A hook that replaces the gradient of a layer's output was missed by that layer's own
    # per-example gradients (1.65 off). Where autograd captures the gradient after the
    # hook (the first layer) and for a hook that only observes, the fast methods give the
    # loop's numbers; otherwise they refuse, and auto runs vmap, which applies the hook.
    torch.manual_seed(where)
    m = _Hooked(where, _HOOKS[hook], conv)
    x = torch.randn(6, 2, 8) if conv else torch.randn(6, 4)
    y = torch.randint(0, 3, (6,))

    def losses(p, x, y):
        return F.cross_entropy(functional_call(m, p, (x,)), y, reduction="none")

    params = params_of(m)
    want = loop_grads(losses, params, x, y)
    norms = torch.cat([g.flatten(1) for g in want.values()], 1).norm(dim=1)
    fast = where == 1 or hook == "observe"
    with warnings.catch_warnings():
        warnings.simplefilter("ignore")
        got = fp.per_sample_grads(losses)(params, x, y)
        got_norms = fp.per_sample_grad_norms(losses)(params, x, y)
        total, _ = fp.clipped_grad(losses, 0.3)(params, x, y)
    for k in params:
        torch.testing.assert_close(got[k], want[k], rtol=0, atol=1e-10, msg=k)
    torch.testing.assert_close(got_norms, norms, rtol=0, atol=1e-10)
    factors = (0.3 / norms).clamp(max=1.0)
    for k in params:
        want_k = (factors.view(-1, *[1] * (want[k].dim() - 1)) * want[k]).sum(0)
        torch.testing.assert_close(total[k], want_k, rtol=0, atol=1e-10, msg=k)
    for method, api in (("hooks", fp.per_sample_grads), ("ghost", fp.per_sample_grad_norms)):
        if fast:
            out = api(losses, method=method)(params, x, y)
            if method == "hooks":
                for k in params:
                    torch.testing.assert_close(out[k], want[k], rtol=0, atol=1e-10, msg=k)
            else:
                torch.testing.assert_close(out, norms, rtol=0, atol=1e-10)
        else:
            with pytest.raises(ValueError, match=r"registers a tensor hook \(Tensor.register_hook\) "
                               r"on the output of a call .* method='vmap' applies it"):
                api(losses, method=method)(params, x, y)


def test_a_legacy_module_backward_hook_is_refused_and_auto_takes_vmap():
    torch.manual_seed(0)
    m = nn.Sequential(nn.Linear(4, 5), nn.Tanh(), nn.Linear(5, 5), nn.Tanh(), nn.Linear(5, 3))
    with warnings.catch_warnings():
        warnings.simplefilter("ignore")
        m[2].register_backward_hook(lambda mod, gi, go: tuple(None if g is None else 3 * g for g in gi))

    def losses(p, x, y):
        return F.cross_entropy(functional_call(m, p, (x,)), y, reduction="none")

    params = params_of(m)
    x, y = torch.randn(5, 4), torch.randint(0, 3, (5,))
    want = loop_grads(losses, params, x, y)
    for method, api in (("hooks", fp.per_sample_grads), ("ghost", fp.per_sample_grad_norms)):
        with pytest.raises(ValueError, match=r"a Linear has a backward hook registered with "
                           r"Module.register_backward_hook.*method='vmap'"):
            api(losses, method=method)(params, x, y)
    with warnings.catch_warnings():
        warnings.simplefilter("ignore")
        got = fp.per_sample_grads(losses)(params, x, y)
    for k in params:
        torch.testing.assert_close(got[k], want[k], rtol=0, atol=1e-10, msg=k)


@pytest.mark.parametrize("kind", ["full", "full_pre"])
def test_full_module_backward_hooks_are_followed(kind):
    torch.manual_seed(1)
    m = nn.Sequential(nn.Linear(4, 5), nn.Tanh(), nn.Linear(5, 5), nn.Tanh(), nn.Linear(5, 3))
    if kind == "full":
        m[2].register_full_backward_hook(lambda mod, gi, go: tuple(None if g is None else 3 * g for g in gi))
    else:
        m[2].register_full_backward_pre_hook(lambda mod, go: tuple(-2 * g for g in go))

    def losses(p, x, y):
        return F.cross_entropy(functional_call(m, p, (x,)), y, reduction="none")

    params = params_of(m)
    x, y = torch.randn(5, 4), torch.randint(0, 3, (5,))
    want = loop_grads(losses, params, x, y)
    got = fp.per_sample_grads(losses, method="hooks")(params, x, y)
    for k in params:
        torch.testing.assert_close(got[k], want[k], rtol=0, atol=1e-10, msg=k)


class _Packed(nn.Module):
    """Activations saved for the backward through ``saved_tensors_hooks``."""

    def __init__(self, pack, unpack) -> None:
        super().__init__()
        self.pack, self.unpack = pack, unpack
        self.l1, self.l2 = nn.Linear(4, 5), nn.Linear(5, 3)

    def forward(self, x):
        with torch.autograd.graph.saved_tensors_hooks(self.pack, self.unpack):
            return self.l2(torch.tanh(self.l1(x)))


@pytest.mark.parametrize("kind", ["float16", "identity"])
def test_saved_tensor_hooks_apply_to_the_rules_saved_inputs(kind):
    # NOTE [saved-tensor hooks] in _engine: a pack hook that compresses the activations
    # changes the loop's gradients (2e-4 with float16); the rules ignored it.
    torch.manual_seed(2)
    packs: list[int] = []

    def pack(t):
        packs.append(1)
        return t.to(torch.float16) if kind == "float16" else t

    m = _Packed(pack, lambda t: t.to(torch.float64))

    def losses(p, x, y):
        return F.cross_entropy(functional_call(m, p, (x,)), y, reduction="none")

    params = params_of(m)
    x, y = torch.randn(6, 4), torch.randint(0, 3, (6,))
    want = loop_grads(losses, params, x, y)
    norms = torch.cat([g.flatten(1) for g in want.values()], 1).norm(dim=1)
    packs.clear()
    got = fp.per_sample_grads(losses, method="hooks")(params, x, y)
    assert packs  # the hooks ran
    for k in params:
        torch.testing.assert_close(got[k], want[k], rtol=0, atol=1e-10, msg=k)
    torch.testing.assert_close(fp.per_sample_grad_norms(losses, method="ghost")(params, x, y),
                               norms, rtol=0, atol=1e-10)

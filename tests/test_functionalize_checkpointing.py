"""NOTE [modules run after apply returns]: activation checkpointing inside a functionalized
module. The recompute runs during the backward pass, after apply has returned: it failed
inside torch with messages about meta tensors; it now raises one error naming the module
and what to do, and the alternative the error gives is checked against torch.autograd."""

from __future__ import annotations

import pytest
import torch
from torch import nn
from torch.utils.checkpoint import checkpoint

import functorch_pipeline as fp
from functorch_pipeline.nn._unbound import UnboundModuleError


class Checkpointed(nn.Module):
    """A Linear, a checkpointed Linear block on its output, a head."""

    def __init__(self, reentrant: bool = False, block_has_tensors: bool = True) -> None:
        super().__init__()
        self.pre, self.head = nn.Linear(4, 4), nn.Linear(4, 1)
        self.block = nn.Sequential(nn.Linear(4, 4), nn.Tanh()) if block_has_tensors else nn.Tanh()
        self.reentrant = reentrant

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        h = checkpoint(self.block, self.pre(x), use_reentrant=self.reentrant)
        return self.head(h)


def _setup(**kw):
    torch.manual_seed(0)
    module = Checkpointed(**kw).double()
    model = fp.functionalize(module)
    variables = model.init(fp.random.key(0))
    return module, model, variables, torch.randn(5, 4, dtype=torch.float64)


@pytest.mark.parametrize("reentrant", [False, True])
def test_checkpointing_inside_apply_raises_naming_the_module(reentrant):
    module, model, variables, x = _setup(reentrant=reentrant)

    def loss(p):
        return model.apply({"params": p}, x).pow(2).sum()

    p = {k: v.clone().requires_grad_() for k, v in variables["params"].items()}
    with pytest.raises(UnboundModuleError, match=r"module `block.0` ran after apply had returned.*"
                       r"torch\.utils\.checkpoint.*fp\.checkpoint"):
        loss(p).backward()
    if not reentrant:  # reentrant checkpointing under torch.func.grad: torch's own error
        with pytest.raises(UnboundModuleError, match="gradient_checkpointing_disable"):
            fp.grad(loss)(variables["params"])


def test_the_per_sample_engines_still_refuse_it_by_name():
    module, model, variables, x = _setup()

    def losses(p, xb):
        return model.apply({"params": p}, xb).pow(2).sum(1)

    for call in (fp.per_sample_grads(losses, method="hooks"), fp.clipped_grad(losses, 1.0)):
        with pytest.raises(ValueError, match="activation checkpointing"):
            call(variables["params"], x)


def test_a_checkpointed_block_without_tensors_of_its_own_runs():
    """Nothing to bind: the recompute of a parameter-free block is right as it was."""
    module, model, variables, x = _setup(block_has_tensors=False)
    got = fp.grad(lambda p: model.apply({"params": p}, x).pow(2).sum())(variables["params"])
    ref = Checkpointed(block_has_tensors=False).double()
    ref.load_state_dict(variables["params"])
    ref(x).pow(2).sum().backward()
    for k, q in ref.named_parameters():
        torch.testing.assert_close(got[k], q.grad, rtol=1e-12, atol=1e-12)


def test_the_alternative_the_error_gives_matches_torch_autograd():
    """fp.checkpoint over a pure function of the variables recomputes with them bound."""
    torch.manual_seed(0)
    plain = nn.Sequential(nn.Linear(4, 4), nn.Tanh(), nn.Linear(4, 4), nn.Tanh(), nn.Linear(4, 1)).double()
    model = fp.functionalize(plain)
    params = {k: v + 0.25 for k, v in model.init(fp.random.key(0))["params"].items()}
    x = torch.randn(5, 4, dtype=torch.float64)
    remat = fp.checkpoint(lambda v, xb: model.apply(v, xb))
    got = fp.grad(lambda p: remat({"params": p}, x).pow(2).sum())(params)
    ref = nn.Sequential(nn.Linear(4, 4), nn.Tanh(), nn.Linear(4, 4), nn.Tanh(), nn.Linear(4, 1)).double()
    ref.load_state_dict(params)
    ref(x).pow(2).sum().backward()
    for k, q in ref.named_parameters():
        torch.testing.assert_close(got[k], q.grad, rtol=1e-12, atol=1e-12)


def test_apply_leaves_no_binding_behind_after_an_error():
    """An exception inside apply unwinds the binding count, so a later recompute is still
    caught rather than taken as running inside apply."""
    module, model, variables, x = _setup()
    with pytest.raises(RuntimeError):
        model.apply(variables, torch.randn(5, 3, dtype=torch.float64))  # wrong width
    assert model._binding.depth == 0
    p = {k: v.clone().requires_grad_() for k, v in variables["params"].items()}
    with pytest.raises(UnboundModuleError):
        model.apply({"params": p}, x).sum().backward()

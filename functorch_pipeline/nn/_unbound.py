"""A clear error for a template module that runs after ``apply`` has returned.

# NOTE [modules run after apply returns]
``apply`` binds the variables to a private template of the module (its own tensors live on
``meta``, NOTE [meta templates]) only while ``torch.func.functional_call`` runs. Activation
checkpointing (``torch.utils.checkpoint``, Hugging Face's ``gradient_checkpointing_enable``,
timm's ``set_grad_checkpointing``) runs the checkpointed block a second time during the
backward pass, after ``apply`` has returned: that recompute finds the template's ``meta``
tensors and failed inside torch with "Tensor on device meta is not on the expected device
cpu!" or a ``CheckpointError`` about metadata, which say nothing of the cause. (Through
``torch.func.functional_call`` on a module of real tensors, the recompute reads the
module's own tensors instead of the ones passed, and the gradients are silently wrong: the
template's ``meta`` tensors are what turn that into an error here.)

Every template module that holds parameters or buffers of its own gets a forward pre-hook
that raises :class:`UnboundModuleError` when no ``apply`` of its model is running, naming
the module and what to do instead. A checkpointed block that holds no tensors of its own
needs no binding and runs as before. The hook is one Python call per such module per
forward: 14 us per ``apply`` of the 4-layer MNIST CNN at batch 2 (372.7 against 358.6 us,
medians of 200 interleaved, ad hoc), ~3.5 us a module.
"""

from __future__ import annotations

import functools
from typing import Any

from torch import nn

__all__ = ["Binding", "UnboundModuleError", "guard_template"]


class UnboundModuleError(RuntimeError):
    """A functionalized module ran outside ``apply`` (NOTE [modules run after apply returns])."""


class Binding:
    """How many ``apply`` calls of one model are running (nested under transforms)."""

    __slots__ = ("depth",)

    def __init__(self) -> None:
        self.depth = 0


def _guard(binding: Binding, path: str, module: nn.Module, args: Any) -> None:
    if binding.depth == 0:
        raise UnboundModuleError(
            f"FunctionalModel.apply: module `{path or '<root>'}` ran after apply had returned, "
            "when no variables are bound to it. Activation checkpointing "
            "(torch.utils.checkpoint) does this: it runs a checkpointed block again during "
            "the backward pass, after apply has returned, so it cannot run inside apply. "
            "Turn it off on the module before fp.functionalize (Hugging Face: "
            "model.gradient_checkpointing_disable(); timm: model.set_grad_checkpointing(False)),"
            " or checkpoint a pure function of the variables instead: "
            "fp.checkpoint(lambda v, x: model.apply(v, x))(variables, x)")


def guard_template(template: nn.Module, binding: Binding) -> None:
    """Hook every module of ``template`` that holds tensors of its own (see the NOTE)."""
    for path, m in template.named_modules():
        own = any(t is not None for t in (*m._parameters.values(), *m._buffers.values()))
        if own:
            m.register_forward_pre_hook(functools.partial(_guard, binding, path))

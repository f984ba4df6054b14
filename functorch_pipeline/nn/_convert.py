"""``replace_rnns``: swap every ``nn.LSTM`` / ``nn.GRU`` / ``nn.RNN`` in a module for ``fp.nn``'s
twins."""

from __future__ import annotations

import warnings

from torch import nn
from torch.nn.utils import parametrize

from functorch_pipeline.nn._copy import copy_module
from functorch_pipeline.nn.recurrent import GRU
from functorch_pipeline.nn.recurrent import LSTM
from functorch_pipeline.nn.recurrent import RNN

__all__ = ["replace_rnns"]

_SWAPS: dict[type[nn.Module], type[nn.Module]] = {nn.LSTM: LSTM, nn.GRU: GRU, nn.RNN: RNN}


def _swap(rnn: nn.RNNBase, path: str) -> nn.Module:
    where = f"`{path}`" if path else "the module itself"
    kinds = [kind for kind, hooks in (("forward", rnn._forward_hooks),
                                      ("forward pre", rnn._forward_pre_hooks),
                                      ("backward", rnn._backward_hooks),
                                      ("backward pre", rnn._backward_pre_hooks)) if hooks]
    if kinds:
        warnings.warn(f"replace_rnns(module): hooks on {where} are not carried over to the "
                      f"replacement ({', '.join(kinds)} hooks); register them on it again",
                      stacklevel=3)
    kwargs = dict(input_size=rnn.input_size, hidden_size=rnn.hidden_size,
                  num_layers=rnn.num_layers, bias=rnn.bias, batch_first=rnn.batch_first,
                  dropout=rnn.dropout, bidirectional=rnn.bidirectional)
    if isinstance(rnn, nn.LSTM):
        kwargs["proj_size"] = rnn.proj_size
    if isinstance(rnn, nn.RNN):
        kwargs["nonlinearity"] = rnn.nonlinearity
    # NOTE [swap without drawing]: build on the meta device (no memory, no draws from the
    # global generator) and then hand over the copied module's own Parameter objects, so
    # values, dtype, device, requires_grad and any tying inside the copy are all kept.
    with warnings.catch_warnings():
        warnings.simplefilter("ignore")  # nn.LSTM already warned about dropout with 1 layer
        new = _SWAPS[type(rnn)](**kwargs, device="meta")
    if list(new._parameters) != list(rnn._parameters):
        raise RuntimeError(f"replace_rnns(module): parameter names of {where} "
                           f"{list(rnn._parameters)} do not match {list(new._parameters)}")
    for name in rnn._parameters:
        setattr(new, name, rnn._parameters[name])
    new.train(rnn.training)
    return new


def replace_rnns(module: nn.Module) -> nn.Module:
    """A copy of ``module`` with every ``nn.LSTM`` / ``nn.GRU`` / ``nn.RNN`` replaced by
    :class:`fp.nn.LSTM <functorch_pipeline.nn.LSTM>` / :class:`fp.nn.GRU <functorch_pipeline.nn.GRU>`
    / :class:`fp.nn.RNN <functorch_pipeline.nn.RNN>`, which ``vmap`` batches and whose
    weights ``per_sample_grads``'s fast method sees (fused rules for LSTM and GRU).

    The replacements hold the same weights (outputs are identical up to float rounding)
    and keep train/eval mode, ``requires_grad``, dtype and device; an RNN that appears
    several times stays one shared module. ``module`` itself is never modified: it is
    deep-copied first. Only exact ``nn.LSTM`` / ``nn.GRU`` / ``nn.RNN`` instances are swapped:
    other ``nn.RNNBase`` modules (subclasses with their own ``forward``) are left as
    they are, with a warning, since they would still fall back to a slow loop under
    ``vmap``. Hooks registered on a swapped RNN (forward, forward pre, backward and
    backward pre) are not carried over (warning).

    Args:
      module: any ``nn.Module``, possibly an ``nn.LSTM`` / ``nn.GRU`` / ``nn.RNN`` itself.

    Returns:
      The converted copy.

    >>> import torch
    >>> net = torch.nn.Sequential(torch.nn.Embedding(10, 4), torch.nn.LSTM(4, 3, batch_first=True))
    >>> fast = replace_rnns(net)
    >>> type(fast[1]).__module__, type(net[1]).__module__
    ('functorch_pipeline.nn.recurrent', 'torch.nn.modules.rnn')
    >>> tokens = torch.tensor([[1, 2, 3]])
    >>> torch.allclose(fast(tokens)[0], net(tokens)[0], atol=1e-6)
    True
    """
    if not isinstance(module, nn.Module):
        raise TypeError(f"replace_rnns(module): expected an nn.Module, got {type(module).__name__}")
    for path, child in module.named_modules():
        if isinstance(child, tuple(_SWAPS)) and parametrize.is_parametrized(child):
            where = f"`{path}`" if path else "the module itself"
            raise TypeError(f"replace_rnns(module): {where} ({type(child).__name__}) has "
                            f"parametrizations (weight_norm, ...); remove them first "
                            f"(torch.nn.utils.parametrize.remove_parametrizations)")
    module = copy_module(module, fn="replace_rnns(module)")
    if type(module) in _SWAPS:
        return _swap(module, "")
    swapped: dict[int, tuple[nn.Module, nn.Module]] = {}  # id -> (old, new); keeps old alive
    for path, parent in list(module.named_modules()):
        for name, child in list(parent._modules.items()):
            if child is None:
                continue
            child_path = f"{path}.{name}" if path else name
            if type(child) in _SWAPS:
                if id(child) not in swapped:
                    swapped[id(child)] = (child, _swap(child, child_path))
                setattr(parent, name, swapped[id(child)][1])
            elif isinstance(child, nn.RNNBase) and id(child) not in swapped:
                swapped[id(child)] = (child, child)
                warnings.warn(f"replace_rnns(module): left `{child_path}` "
                              f"({type(child).__name__}) unchanged; only exact nn.LSTM, "
                              f"nn.GRU and nn.RNN are replaced", stacklevel=2)
    return module

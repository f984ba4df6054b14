"""Per-sample rules for the built-in recurrent cells: ``nn.LSTMCell``, ``nn.GRUCell`` and
``nn.RNNCell`` (``torch.lstm_cell``, ``gru_cell``, ``rnn_tanh_cell``, ``rnn_relu_cell``).

# NOTE [recurrent cells]
A cell is one time step, called in a Python loop by the user's model (decoders, custom
recurrences, meta-learned RNNs). Its fused kernel is two affine maps followed by the gate
arithmetic, so each rule computes it as exactly that: ``F.linear(x, w_ih, b_ih)`` and
``F.linear(h, w_hh, b_hh)`` on the tracked weights, which the Linear rule records (NOTE
[how the engine works] in ``_engine``; examples on axis 0 of ``x`` and ``h``), then
PyTorch's gate equations on plain tensors. A weight used at every step of the loop gets
one part per step, summed per example as any reused Linear's. The outputs equal the fused
kernel's up to float rounding (float64: ~1e-16), and the parts are the Linear rule's, so
ghost clipping takes the cells too. Unbatched (1-d) inputs have no examples' axis and
are refused by the Linear rule.
"""

from __future__ import annotations

from typing import Any

import torch
import torch.nn.functional as F

from functorch_pipeline.transforms._grad_sample._engine import Engine
from functorch_pipeline.transforms._grad_sample._engine import Unsupported
from functorch_pipeline.transforms._grad_sample._rules import register_rule

__all__ = ["CELLS"]


def _weights(args: tuple[Any, ...], kwargs: dict[str, Any]) -> tuple[Any, Any, Any, Any]:
    if len(args) < 4 or kwargs:  # nn.*Cell passes everything by position
        raise Unsupported("a recurrent cell kernel called with keyword arguments has no "
                          "per-sample gradient rule; call it through nn.LSTMCell/GRUCell/RNNCell")
    w_ih, w_hh = args[2], args[3]
    b_ih = args[4] if len(args) > 4 else None
    b_hh = args[5] if len(args) > 5 else None
    return w_ih, w_hh, b_ih, b_hh


def _lstm_cell(engine: Engine, args: Any, kwargs: dict[str, Any]) -> tuple[torch.Tensor, torch.Tensor]:
    x, (h, c) = args[0], args[1]
    w_ih, w_hh, b_ih, b_hh = _weights(args, kwargs)
    gates = F.linear(x, w_ih, b_ih) + F.linear(h, w_hh, b_hh)
    i, f, g, o = gates.chunk(4, -1)
    c_next = torch.sigmoid(f) * c + torch.sigmoid(i) * torch.tanh(g)
    return torch.sigmoid(o) * torch.tanh(c_next), c_next


def _gru_cell(engine: Engine, args: Any, kwargs: dict[str, Any]) -> torch.Tensor:
    x, h = args[0], args[1]
    w_ih, w_hh, b_ih, b_hh = _weights(args, kwargs)
    i_r, i_z, i_n = F.linear(x, w_ih, b_ih).chunk(3, -1)
    h_r, h_z, h_n = F.linear(h, w_hh, b_hh).chunk(3, -1)
    r, z = torch.sigmoid(i_r + h_r), torch.sigmoid(i_z + h_z)
    n = torch.tanh(i_n + r * h_n)
    return n + z * (h - n)


def _rnn_cell(nonlinearity: Any) -> Any:
    def rule(engine: Engine, args: Any, kwargs: dict[str, Any]) -> torch.Tensor:
        x, h = args[0], args[1]
        w_ih, w_hh, b_ih, b_hh = _weights(args, kwargs)
        return nonlinearity(F.linear(x, w_ih, b_ih) + F.linear(h, w_hh, b_hh))

    return rule


CELLS = {torch.lstm_cell: _lstm_cell, torch.gru_cell: _gru_cell,
         torch.rnn_tanh_cell: _rnn_cell(torch.tanh), torch.rnn_relu_cell: _rnn_cell(torch.relu)}
for _func, _rule in CELLS.items():
    register_rule(_func, _rule)

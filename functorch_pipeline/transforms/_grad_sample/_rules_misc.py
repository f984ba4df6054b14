"""Per-sample rules for ``F.embedding_bag``, ``F.instance_norm`` and ``F.rms_norm``.

Each rule runs the op on the plain parameters and records its output (NOTE [how the
engine works] in ``_engine``); the finishers turn the output gradient into per-example
parameter gradients. Tests: ``tests/test_grad_sample_zoo.py`` (a loop over examples,
float64, 1e-10).

# NOTE [embedding bags are the examples]
Each bag of ``F.embedding_bag`` is one example: a 2-d input ``(B, N)`` holds one bag per
row, a 1-d input with ``offsets`` holds ``B`` bags (``B + 1`` offsets with
``include_last_offset``). Bag ``b``'s gradient scatters its output gradient ``g[b]``
into the rows it read: times ``per_sample_weights`` (mode ``"sum"``), divided by the
number of indices that are not ``padding_idx`` (``"mean"``), or, per feature, into the
row that won the maximum (``"max"``: the indices the op itself reports, so ties resolve
as in PyTorch's backward). Repeated indices in a bag add up; ``padding_idx`` rows get
nothing; empty bags give zeros.
"""

from __future__ import annotations

from typing import Any

import torch
import torch.nn.functional as F

from functorch_pipeline.transforms._grad_sample._engine import Engine
from functorch_pipeline.transforms._grad_sample._engine import Unsupported
from functorch_pipeline.transforms._grad_sample._rules import SPARSE_BY_FREQ
from functorch_pipeline.transforms._grad_sample._rules import _affine_parts
from functorch_pipeline.transforms._grad_sample._rules import _get
from functorch_pipeline.transforms._grad_sample._rules import _no_graph
from functorch_pipeline.transforms._grad_sample._rules import _params
from functorch_pipeline.transforms._grad_sample._rules import register_rule
from functorch_pipeline.transforms._grad_sample._rules import renorm_rows

__all__: list[str] = []

_MODES = {"sum": 0, "mean": 1, "max": 2}


# -- embedding_bag --------------------------------------------------------------------------


def _embedding_bag(engine: Engine, args: Any, kwargs: dict[str, Any]) -> torch.Tensor:
    names = ("input", "weight", "offsets", "max_norm", "norm_type", "scale_grad_by_freq",
             "mode", "sparse", "per_sample_weights", "include_last_offset", "padding_idx")
    defaults = (None, None, None, None, 2, False, "mean", False, None, False, None)
    a = {n: _get(args, kwargs, i, n, d) for i, (n, d) in enumerate(zip(names, defaults, strict=True))}
    idx, w, offsets, psw = a["input"], a["weight"], a["offsets"], a["per_sample_weights"]
    ws = engine.slot(w)
    if ws is None or any(engine.slot(t) is not None for t in (idx, offsets, psw)):
        raise Unsupported(f"{engine.names(args, kwargs)} is used as the indices, offsets or "
                          "per_sample_weights of `F.embedding_bag`")
    if a["mode"] not in _MODES:
        raise ValueError(f"{engine.fn}: F.embedding_bag mode must be one of {list(_MODES)}, "
                         f"got {a['mode']!r}")
    by_freq = bool(a["scale_grad_by_freq"])
    if a["sparse"] and a["mode"] == "max":  # as F.embedding_bag's own forward refuses it
        raise ValueError(f"{engine.fn}: F.embedding_bag does not take sparse=True with "
                         "mode='max'")
    if by_freq and a["sparse"] and torch.is_grad_enabled():
        raise ValueError(SPARSE_BY_FREQ.format(fn=engine.fn, call="F.embedding_bag"))
    # sparse=True is otherwise ignored: NOTE [sparse embedding gradients] in _rules
    if by_freq and a["mode"] == "max":
        raise ValueError(f"{engine.fn}: F.embedding_bag does not take scale_grad_by_freq=True "
                         "with mode='max'")
    if a["max_norm"] is not None:  # NOTE [max_norm renormalises the table] in _rules
        renorm_rows(engine, ws, idx, a["max_norm"], a["norm_type"], "F.embedding_bag")
    wp = engine.bases[ws]
    B = engine.batch_size
    if isinstance(idx, torch.Tensor) and idx.dim() == 2:
        engine.check_input(idx, "F.embedding_bag", [ws], min_dim=2)
        flat = idx.reshape(-1)
        starts = torch.arange(0, idx.numel(), idx.shape[1], device=idx.device)
        psw_flat = None if psw is None else psw.reshape(-1)
    else:
        bags = None if offsets is None else offsets.shape[0] - bool(a["include_last_offset"])
        if not isinstance(idx, torch.Tensor) or idx.dim() != 1 or bags != B:
            raise Unsupported(
                f"{engine.name(ws)} is used by `F.embedding_bag` with {bags} bags; the fast "
                f"method needs one bag per example (B={B}, see NOTE [embedding bags are the "
                "examples])")
        flat, starts, psw_flat = idx, offsets[:B], psw
    padding_idx = a["padding_idx"]
    if padding_idx is not None and padding_idx < 0:
        padding_idx += wp.shape[0]
    # A leaf alias of the weight gives the output a grad_fn (see NOTE [gradient edges, not
    # tensors]); its own gradient is never computed.
    out = F.embedding_bag(idx, wp.detach().requires_grad_(), offsets, None, a["norm_type"], False,
                          a["mode"], False, psw, a["include_last_offset"], padding_idx)
    engine.record(out, _finish_embedding_bag, flat, starts, psw_flat, ws, a["mode"], padding_idx,
                  by_freq)
    return out


def _finish_embedding_bag(engine: Engine, g: torch.Tensor, flat: torch.Tensor,
                          starts: torch.Tensor, psw: torch.Tensor | None, ws: int, mode: str,
                          padding_idx: int | None, by_freq: bool = False) -> None:
    B, D = g.shape
    V = engine.bases[ws].shape[0]
    n = flat.shape[0]
    bag = torch.searchsorted(starts, torch.arange(n, device=flat.device), right=True) - 1
    valid = torch.ones(n, dtype=torch.bool, device=flat.device) if padding_idx is None \
        else flat != padding_idx
    out = g.new_zeros(B, V, D)
    if mode == "max":
        count = torch.zeros(B, dtype=torch.long, device=flat.device).index_add_(0, bag, valid.long())
        _, _, _, winner = torch.embedding_bag(
            engine.bases[ws], flat, starts, False, 2, False, None, False,
            padding_idx)
        filled = (count > 0).unsqueeze(1).to(g.dtype)
        out.scatter_add_(1, winner.unsqueeze(1), (g * filled).unsqueeze(1))
    else:
        scale = valid.to(g.dtype)
        if psw is not None:
            scale = scale * psw
        if mode == "mean":
            count = torch.zeros(B, dtype=g.dtype, device=g.device).index_add_(0, bag, valid.to(g.dtype))
            scale = scale / count.clamp(min=1)[bag]
        if by_freq:  # each id counted within its own bag: NOTE [scale_grad_by_freq per example]
            _, where, freq = torch.unique(bag * V + flat, return_inverse=True, return_counts=True)
            scale = scale / freq[where].to(g.dtype)
        rows = g[bag] * scale.unsqueeze(1)
        out.view(B * V, D).index_add_(0, bag * V + flat, rows)
    engine.add("direct", ws, out)


# -- instance norm --------------------------------------------------------------------------


def _instance_norm(engine: Engine, args: Any, kwargs: dict[str, Any]) -> torch.Tensor:
    names = ("input", "running_mean", "running_var", "weight", "bias", "use_input_stats",
             "momentum", "eps")
    defaults = (None, None, None, None, None, True, 0.1, 1e-5)
    a = {n: _get(args, kwargs, i, n, d) for i, (n, d) in enumerate(zip(names, defaults, strict=True))}
    x, mean, var = a["input"], a["running_mean"], a["running_var"]
    (ws, bs), (wp, bp) = _params(engine, a["weight"], a["bias"])
    if engine.slot(mean) is not None or engine.slot(var) is not None or engine.slot(x) is not None:
        raise Unsupported(f"{engine.names(args, kwargs)} is used as the input or running "
                          "statistics of `F.instance_norm`")
    if engine.input_axis(F.instance_norm, args, kwargs, lambda: engine.check_input(
            x, "F.instance_norm", [s for s in (ws, bs) if s is not None],
            features=x.dim() - 1)) is None:  # a constant input: NOTE [constants or batch data]
        return engine.derive_op(F.instance_norm, args, kwargs)
    xin = x.detach().requires_grad_() if _no_graph(x, wp, bp) else x
    out = F.instance_norm(xin, mean, var, wp, bp, a["use_input_stats"], a["momentum"], a["eps"])
    stats = None if a["use_input_stats"] else (mean.clone(), var.clone())
    engine.record(out, _finish_instance_norm, x, ws, bs, stats, a["eps"])
    return out


def _finish_instance_norm(engine: Engine, g: torch.Tensor, x: torch.Tensor, ws: int | None,
                          bs: int | None, stats: Any, eps: float) -> None:
    with torch.no_grad():
        if stats is None:  # each example's own statistics, per channel
            x_hat = F.instance_norm(x, None, None, None, None, True, 0.0, eps)
        else:  # eval with running statistics
            view = (1, -1) + (1,) * (x.dim() - 2)
            x_hat = (x - stats[0].reshape(view)) * torch.rsqrt(stats[1].reshape(view) + eps)
    _affine_parts(engine, g, x_hat, ws, bs, tuple(range(2, x.dim())))


# -- RMS norm -------------------------------------------------------------------------------


def _rms_norm(engine: Engine, args: Any, kwargs: dict[str, Any]) -> torch.Tensor:
    x, shape = _get(args, kwargs, 0, "input"), tuple(_get(args, kwargs, 1, "normalized_shape"))
    w, eps = _get(args, kwargs, 2, "weight"), _get(args, kwargs, 3, "eps")
    ws = engine.slot(w)
    if ws is None:
        raise Unsupported(f"{engine.names(args, kwargs)} is used as the input of `F.rms_norm`")
    axis = engine.input_axis(F.rms_norm, args, kwargs, lambda: engine.check_input(
        x, "F.rms_norm", [ws], min_dim=len(shape) + 1, features=len(shape), seq_first=True,
        blocks=True))
    if axis is None:  # a constant input: NOTE [constants or batch data] in _engine
        return engine.derive_op(F.rms_norm, args, kwargs)
    wp = engine.bases[ws]
    xin = x.detach().requires_grad_() if _no_graph(x, wp) else x
    out = F.rms_norm(xin, shape, wp, eps)
    engine.record(out, _finish_rms_norm, x, ws, shape, eps, axis)
    return out


def _finish_rms_norm(engine: Engine, g: torch.Tensor, x: torch.Tensor, ws: int,
                     shape: tuple[int, ...], eps: float | None, axis: int = 0) -> None:
    with torch.no_grad():
        x_hat = F.rms_norm(x, shape, None, eps)
    if axis:  # NOTE [sequence-first inputs]
        g, x_hat = g.movedim(axis, 0), x_hat.movedim(axis, 0)
    _affine_parts(engine, g, x_hat, ws, None, tuple(range(1, x.dim() - len(shape))))


register_rule(F.embedding_bag, _embedding_bag)
register_rule(F.instance_norm, _instance_norm)
register_rule(F.rms_norm, _rms_norm)


# -- built-in recurrent kernels -------------------------------------------------------------

_RNN_KERNELS = {torch.lstm: "nn.LSTM", torch.gru: "nn.GRU", torch.rnn_tanh: "nn.RNN",
                torch.rnn_relu: "nn.RNN"}
REPLACE_RNNS_HINT = ("convert the model with fp.nn.replace_rnns(module): the same weights in "
                     "fp.nn.LSTM/GRU/RNN, which vmap batches and the fast method has rules for")


def _builtin_rnn(kernel: Any) -> Any:
    def rule(engine: Engine, args: Any, kwargs: dict[str, Any]) -> Any:
        raise Unsupported(
            f"{engine.names(args, kwargs)} {'is' if len(engine.slots(args, kwargs)) == 1 else 'are'}"
            f" used by `torch.{kernel.__name__}` (the fused kernel of built-in "
            f"{_RNN_KERNELS[kernel]}), which has no per-sample gradient rule; "
            f"{REPLACE_RNNS_HINT}")

    return rule


for _kernel in _RNN_KERNELS:
    register_rule(_kernel, _builtin_rnn(_kernel))

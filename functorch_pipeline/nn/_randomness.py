"""Keyed randomness inside ``apply``: dropout masks drawn from ``fp.random`` keys.

``FunctionalModel.apply(..., train=True, key=k)`` runs the module under
:class:`KeyedRandomness`, a ``torch.overrides.TorchFunctionMode`` that replaces every
random layer function with a version that draws from ``fp.random`` instead of PyTorch's
global generator:

- ``F.dropout``, ``F.dropout1d/2d/3d``, ``F.alpha_dropout``, ``F.feature_alpha_dropout``
  and their ``torch.*`` kernels (``torch.dropout``, ``torch.feature_dropout``, ...);
- ``F.rrelu`` in training (its random slopes);
- ``F.scaled_dot_product_attention`` with ``dropout_p > 0`` (recomputed in plain
  maths with a keyed mask on the attention weights), and ``nn.MultiheadAttention``.

The ``i``-th random call of one ``apply`` draws from its own key derived from ``(key, i)``
(NOTE [per-call keys]), so a forward pass is a pure function of ``(variables, inputs, key)``.

# NOTE [one key or a key batch]
``key`` is either one key of shape ``(2,)``, which draws one mask for the whole input,
or a key batch of shape ``(N, 2)`` where ``N`` is the size of axis 0 of the input of each
random call: example ``n`` then draws its mask from ``key[n]`` alone. With a key batch,
``apply(v, x, key=keys)`` equals ``cat([apply(v, x[n:n+1], key=keys[n:n+1]) ...])``:
this is what makes ``per_sample_grads`` (which hands each example over as a batch of one
with a ``(1, 2)`` key) agree with a Python loop over examples. Under ``vmap`` a batch of
keys gives each mapped call its own mask (``torch.func``'s ``randomness="different"``);
an unmapped key gives all of them the same (``randomness="same"``). Draws never touch
the global generator, so the default ``randomness="error"`` is fine (see NOTE [how keys
map to torch.func's randomness modes] in ``fp.random``).

# NOTE [masks match torch's shapes and constants, not its bits]
Each replacement follows ATen's ``_dropout_impl``: ``p == 0``, eval mode or an empty
input return the input; ``p == 1`` multiplies by zero; plain dropout keeps an element
with probability ``1 - p`` and scales by ``1 / (1 - p)``; feature dropout draws one value
per ``(batch, channel)``; alpha dropout uses SELU's saturation constant. The random bits
differ from PyTorch's Philox/mt19937 streams, so a keyed run is not bit-equal to an
imperative run with ``torch.manual_seed``. ``inplace=True`` is honoured in value but the
result is always a new tensor (in-place writes into inputs would break purity and
``vmap``).

Anything else that draws from the global generator inside ``forward`` (a hand-written
``torch.rand``, ``nn.LSTM``'s fused inter-layer dropout) is not redirected: ``nn.LSTM``,
``nn.GRU`` and ``nn.RNN`` with ``dropout > 0`` and ``num_layers > 1`` in train mode raise
an error (with one layer there is no inter-layer dropout to draw) that points to
``fp.nn.LSTM`` / ``fp.nn.GRU``; other draws fall under ``torch.func``'s ``randomness`` rules inside
``vmap`` and under the global generator outside it.
"""

from __future__ import annotations

import math
import threading
import types
from collections.abc import Callable
from typing import Any

import torch
import torch.nn.functional as F
from torch.overrides import TorchFunctionMode

from functorch_pipeline import random as _random

__all__ = ["KeyedRandomness"]

_SELU_ALPHA = 1.7580993408473766  # -SELU(-inf) = scale * alpha, ATen's constant


def _bind(args: tuple[Any, ...], kwargs: dict[str, Any], names: tuple[str, ...],
          defaults: dict[str, Any]) -> dict[str, Any]:
    out = dict(defaults)
    out.update(zip(names, args, strict=False))
    out.update(kwargs)
    return out


class KeyedRandomness(TorchFunctionMode):
    """Redirects random layer functions to ``fp.random`` draws from ``key``.

    Args:
      key: ``None``, one key ``(2,)`` or a key batch ``(N, 2)`` (NOTE [one key or a key
        batch]). With ``None`` a random call in training raises ``no_key_error()``.
      fn: the public call to name in errors.
      no_key_hint: extra text for the missing-key error (e.g. the dropout layers' paths).
    """

    def __init__(self, key: torch.Tensor | None, fn: str, no_key_hint: str = "") -> None:
        super().__init__()
        self.key = key
        self.fn = fn
        self.no_key_hint = no_key_hint
        self.count = 0
        self._subkeys: dict[int, torch.Tensor] = {}

    def __torch_function__(self, func: Callable[..., Any], types_: Any, args: tuple[Any, ...] = (),
                           kwargs: dict[str, Any] | None = None) -> Any:
        kwargs = kwargs or {}
        try:
            handler = _HANDLERS.get(func)
        except TypeError:  # an unhashable callable: not one of ours
            handler = None
        if handler is None:
            return func(*args, **kwargs)
        return handler(self, args, kwargs)

    def next_key(self, what: str, x: torch.Tensor) -> torch.Tensor:
        """The key for the next random call on input ``x`` (checked against the batch)."""
        if self.key is None:
            raise RuntimeError(
                f"{self.fn}: the model called {what} in train mode, which needs random numbers, "
                "but no `key` was given. Pass `key=fp.random.key(seed)` (one key for the batch) "
                "or a key batch of shape (N, 2) (one key per example), or use train=False."
                + self.no_key_hint
            )
        if self.key.dim() == 2 and (x.dim() == 0 or x.shape[0] != self.key.shape[0]):
            raise ValueError(
                f"{self.fn}: `key` is a batch of {self.key.shape[0]} keys (one per example), but {what} "
                f"got an input of shape {tuple(x.shape)} whose axis 0 is not that batch. Pass one "
                "key of shape (2,) instead, or put the batch on axis 0."
            )
        # NOTE [per-call keys]: call i uses split(fold_in(key, i // 8), 8)[i % 8] (fold_in
        # skipped for the first eight): one vectorised split per eight calls is several
        # times cheaper than a fold_in per call, and it is still a pure function of
        # (key, i).
        chunk, i = divmod(self.count, _CHUNK)
        self.count += 1
        if chunk not in self._subkeys:
            base = self.key if chunk == 0 else _random.fold_in(self.key, chunk)
            self._subkeys[chunk] = _random.split(base.to(x.device), _CHUNK)
        return self._subkeys[chunk][i].to(x.device)


_CHUNK = 8


def _uniform(k: torch.Tensor, shape: tuple[int, ...], dtype: torch.dtype = torch.float32,
             minval: float = 0.0, maxval: float = 1.0) -> torch.Tensor:
    """Draws of ``shape``; a key batch ``(N, 2)`` draws ``shape[1:]`` per key."""
    if k.dim() == 2:
        shape = shape[1:]
    return _random.uniform(k, shape, dtype, minval, maxval)


def _keep_mask(k: torch.Tensor, shape: tuple[int, ...], keep: float) -> torch.Tensor:
    """Booleans that are ``True`` with probability ``keep``; a key batch ``(N, 2)`` draws
    ``shape[1:]`` per key."""
    if k.dim() == 2:
        shape = shape[1:]
    return _random.bernoulli(k, keep, shape)


def _keyed_dropout(mode: KeyedRandomness, x: torch.Tensor, p: float, train: bool, *,
                   feature: bool, alpha: bool, what: str) -> torch.Tensor:
    """ATen's ``_dropout_impl`` with the noise drawn from a key (NOTE [masks match ...])."""
    if p < 0.0 or p > 1.0:
        raise ValueError(f"dropout probability has to be between 0 and 1, but got {p}")
    if p == 0 or not train or x.numel() == 0:
        return x
    if p == 1:
        return x * torch.zeros((), dtype=x.dtype, device=x.device)
    if feature:
        if x.dim() < 2:
            raise RuntimeError(f"{what}: feature dropout needs at least 2 dimensions, got {tuple(x.shape)}")
        shape = (x.shape[0], x.shape[1], *([1] * (x.dim() - 2)))
    else:
        shape = tuple(x.shape)
    k = mode.next_key(f"{what}(p={p})", x)
    noise = _keep_mask(k, shape, 1.0 - p).to(x.dtype)
    if alpha:
        a = 1.0 / math.sqrt((_SELU_ALPHA * _SELU_ALPHA * p + 1) * (1 - p))
        b = (noise - 1) * (_SELU_ALPHA * a) + _SELU_ALPHA * a * p
        return x * (noise * a) + b
    return x * (noise / (1 - p))


_DROPOUT_NAMES = ("input", "p", "training", "inplace")


def _f_dropout(kind: str, *, feature: bool, alpha: bool, train_default: bool) -> Callable[..., torch.Tensor]:
    """A handler for ``F.<kind>`` with its own argument defaults and unbatched-input rule."""
    defaults = {"p": 0.5, "training": train_default, "inplace": False}

    def handler(mode: KeyedRandomness, args: tuple[Any, ...], kwargs: dict[str, Any]) -> torch.Tensor:
        a = _bind(args, kwargs, _DROPOUT_NAMES, defaults)
        x = a["input"]
        # F.dropout1d takes (C, L) or (N, C, L); F.dropout3d treats all but 5-D input as one
        # example; F.dropout2d and the others use axes 0 and 1 of whatever they get.
        if kind == "dropout1d" and x.dim() not in (2, 3):
            raise RuntimeError(f"dropout1d: Expected 2D or 3D input, but received a {x.dim()}D input.")
        unbatched = (kind == "dropout1d" and x.dim() == 2) or (kind == "dropout3d" and x.dim() != 5)
        if unbatched:
            x = x.unsqueeze(0)
        out = _keyed_dropout(mode, x, a["p"], a["training"], feature=feature, alpha=alpha, what=f"F.{kind}")
        return out.squeeze(0) if unbatched else out

    return handler


def _torch_dropout(kind: str, *, feature: bool, alpha: bool) -> Callable[..., torch.Tensor]:
    """A handler for the kernel ``torch.<kind>(input, p, train)``."""

    def handler(mode: KeyedRandomness, args: tuple[Any, ...], kwargs: dict[str, Any]) -> torch.Tensor:
        a = _bind(args, kwargs, ("input", "p", "train"), {})
        return _keyed_dropout(mode, a["input"], a["p"], a["train"], feature=feature, alpha=alpha,
                              what=f"torch.{kind}")

    return handler


def _rrelu(mode: KeyedRandomness, args: tuple[Any, ...], kwargs: dict[str, Any]) -> torch.Tensor:
    a = _bind(args, kwargs, ("input", "lower", "upper", "training", "inplace"),
              {"lower": 1.0 / 8, "upper": 1.0 / 3, "training": False, "inplace": False})
    x, lower, upper = a["input"], a["lower"], a["upper"]
    if not a["training"]:
        return F.leaky_relu(x, (lower + upper) / 2)
    k = mode.next_key("F.rrelu", x)
    slope = _uniform(k, tuple(x.shape), torch.float64 if x.dtype == torch.float64 else torch.float32,
                     lower, upper).to(x.dtype)
    # ATen's rrelu_with_noise: x <= 0 takes the random slope, so the gradient at an exact
    # zero is that slope (a NaN keeps slope 1, as there)
    return torch.where(x <= 0, x * slope, x)


_SDPA_NAMES = ("query", "key", "value", "attn_mask", "dropout_p", "is_causal", "scale", "enable_gqa")
_SDPA_DEFAULTS = {"attn_mask": None, "dropout_p": 0.0, "is_causal": False, "scale": None,
                  "enable_gqa": False}


def _sdpa(mode: KeyedRandomness, args: tuple[Any, ...], kwargs: dict[str, Any]) -> torch.Tensor:
    a = _bind(args, kwargs, _SDPA_NAMES, _SDPA_DEFAULTS)
    if a["dropout_p"] == 0.0:
        return F.scaled_dot_product_attention(*args, **kwargs)
    # PyTorch's documented reference maths, with the dropout on the weights keyed.
    q, k, v, mask = a["query"], a["key"], a["value"], a["attn_mask"]
    length, source = q.size(-2), k.size(-2)
    scale = 1 / math.sqrt(q.size(-1)) if a["scale"] is None else a["scale"]
    bias = torch.zeros(length, source, dtype=q.dtype, device=q.device)
    if a["is_causal"]:
        causal = torch.ones(length, source, dtype=torch.bool, device=q.device).tril(diagonal=0)
        bias = bias.masked_fill(causal.logical_not(), float("-inf"))
    if mask is not None:
        bias = bias.masked_fill(mask.logical_not(), float("-inf")) if mask.dtype == torch.bool else mask + bias
    if a["enable_gqa"]:
        k = k.repeat_interleave(q.size(-3) // k.size(-3), -3)
        v = v.repeat_interleave(q.size(-3) // v.size(-3), -3)
    scores = q @ k.transpose(-2, -1) * scale + bias
    # torch's convention (its math backend's _safe_softmax): a query row whose keys are all
    # masked (every score -inf) attends to nothing and gives 0, not softmax's NaN. The row's
    # scores are zeroed before the softmax too, so no NaN reaches the backward either.
    empty = scores.isneginf().all(dim=-1, keepdim=True)
    weights = torch.softmax(scores.masked_fill(empty, 0.0), dim=-1).masked_fill(empty, 0.0)
    weights = _keyed_dropout(mode, weights, a["dropout_p"], True, feature=False, alpha=False,
                             what="F.scaled_dot_product_attention")
    return weights @ v


# NOTE [multi_head_attention_forward]
# A TorchFunctionMode sees F.multi_head_attention_forward as one call and runs it with the
# mode switched off, so the dropout and attention inside it would escape. We run a copy of
# the function whose globals resolve `dropout` and `scaled_dot_product_attention` to
# keyed versions bound to the active mode; torch itself is never patched.
_MHA_MODE = threading.local()


def _mha_mode() -> KeyedRandomness:
    return _MHA_MODE.stack[-1]


def _mha_dropout(input: torch.Tensor, p: float = 0.5, training: bool = True,
                 inplace: bool = False) -> torch.Tensor:
    return _keyed_dropout(_mha_mode(), input, p, training, feature=False, alpha=False,
                          what="F.multi_head_attention_forward's dropout")


def _mha_sdpa(*args: Any, **kwargs: Any) -> torch.Tensor:
    return _sdpa(_mha_mode(), args, kwargs)


_mha_globals = dict(F.multi_head_attention_forward.__globals__)
_mha_globals.update(dropout=_mha_dropout, scaled_dot_product_attention=_mha_sdpa)
_mha_keyed = types.FunctionType(
    F.multi_head_attention_forward.__code__, _mha_globals, "multi_head_attention_forward",
    F.multi_head_attention_forward.__defaults__, F.multi_head_attention_forward.__closure__,
)
_mha_keyed.__kwdefaults__ = F.multi_head_attention_forward.__kwdefaults__


def _mha(mode: KeyedRandomness, args: tuple[Any, ...], kwargs: dict[str, Any]) -> Any:
    stack = _MHA_MODE.__dict__.setdefault("stack", [])
    stack.append(mode)
    try:
        return _mha_keyed(*args, **kwargs)
    finally:
        stack.pop()


_RNN_ADVICE = {
    "LSTM": "Use fp.nn.LSTM (same arguments and weights), or dropout=0.",
    "GRU": "Use fp.nn.GRU (same arguments and weights), or dropout=0.",
    "RNN": "Use dropout=0 and an nn.Dropout between single-layer RNNs.",
}


def _fused_rnn(name: str, kernel: Callable[..., Any]) -> Callable[..., Any]:
    def handler(mode: KeyedRandomness, args: tuple[Any, ...], kwargs: dict[str, Any]) -> Any:
        # Unpacked: (input, hx, params, has_biases, num_layers, dropout, train, bidirectional,
        # batch_first); packed: (data, batch_sizes, hx, params, has_biases, num_layers,
        # dropout, train, bidirectional). hx is a Tensor for GRU/RNN and a tuple for LSTM, so
        # args[1] cannot tell the forms apart: the packed form has the weight list at
        # args[3] (a bool `has_biases` in the unpacked form).
        packed = "batch_sizes" in kwargs or (len(args) > 3 and isinstance(args[3], (list, tuple)))
        names = (("data", "batch_sizes", "hx", "params", "has_biases", "num_layers", "dropout",
                  "train", "bidirectional") if packed else
                 ("input", "hx", "params", "has_biases", "num_layers", "dropout", "train",
                  "bidirectional", "batch_first"))
        bound = _bind(args, kwargs, names, {"dropout": 0.0, "train": False, "num_layers": 1})
        dropout, train = bound["dropout"], bound["train"]
        if train and dropout > 0 and bound["num_layers"] > 1:  # one layer draws nothing
            raise RuntimeError(
                f"{mode.fn}: an nn.{name} with dropout={dropout} ran in train mode; its fused "
                "kernel draws the inter-layer dropout from PyTorch's global generator, which a "
                f"`key` cannot drive. {_RNN_ADVICE[name]}"
            )
        return kernel(*args, **kwargs)

    return handler


_HANDLERS: dict[Any, Callable[..., Any]] = {
    F.dropout: _f_dropout("dropout", feature=False, alpha=False, train_default=True),
    F.dropout1d: _f_dropout("dropout1d", feature=True, alpha=False, train_default=True),
    F.dropout2d: _f_dropout("dropout2d", feature=True, alpha=False, train_default=True),
    F.dropout3d: _f_dropout("dropout3d", feature=True, alpha=False, train_default=True),
    F.alpha_dropout: _f_dropout("alpha_dropout", feature=False, alpha=True, train_default=False),
    F.feature_alpha_dropout: _f_dropout("feature_alpha_dropout", feature=True, alpha=True,
                                        train_default=False),
    torch.dropout: _torch_dropout("dropout", feature=False, alpha=False),
    torch.feature_dropout: _torch_dropout("feature_dropout", feature=True, alpha=False),
    torch.alpha_dropout: _torch_dropout("alpha_dropout", feature=False, alpha=True),
    torch.feature_alpha_dropout: _torch_dropout("feature_alpha_dropout", feature=True, alpha=True),
    F.rrelu: _rrelu,
    F.scaled_dot_product_attention: _sdpa,
    F.multi_head_attention_forward: _mha,
    torch.lstm: _fused_rnn("LSTM", torch.lstm),
    torch.gru: _fused_rnn("GRU", torch.gru),
    torch.rnn_tanh: _fused_rnn("RNN", torch.rnn_tanh),
    torch.rnn_relu: _fused_rnn("RNN", torch.rnn_relu),
}

"""``fp.nn.LSTM`` and ``fp.nn.GRU``: drop-in ``nn.LSTM`` / ``nn.GRU`` that ``vmap`` can batch.

``nn.LSTM``'s fused CPU/CUDA kernels (``aten::mkldnn_rnn_layer``, cuDNN) have no
``torch.func`` batching rules, so ``vmap(grad(...))`` over them falls back to a slow loop
over examples. These layers compute the same function from ops that all batch:

* the input projection of every time step at once, ``F.linear(x, W_ih, b_ih)``;
* a Python loop over time of ``F.linear(h, W_hh, b_hh)`` plus elementwise gates.

Constructor arguments, forward signature, return values, parameter names (so
``state_dict`` converts both ways) and default initialisation are those of ``nn.LSTM`` /
``nn.GRU``. ``PackedSequence`` inputs are not supported. Inter-layer dropout in training
mode draws its masks on a batch-major tensor (NOTE [fused fast path]), so under the same
``torch.manual_seed`` its masks (and outputs) differ from ``nn.LSTM``'s, which draws them
time-major; the distribution is the same, and without dropout the outputs match.

# NOTE [every weight through F.linear]
Every use of a weight is one ``F.linear(input, weight, bias)`` call on the *whole*
parameter: no ``x @ W.t()``, no ``addmm``, no slicing or concatenating weights first.
Per-sample-gradient engines rely on this: they only need to see (input, grad_output)
pairs of ``F.linear`` calls to rebuild every example's weight gradient. ``F.linear`` and
``F.dropout`` are looked up on ``torch.nn.functional`` at call time, so code that wraps
them (keyed dropout during ``apply``) sees these calls too.

# NOTE [per-step overhead]
With small hidden sizes the loop over time is bound by eager dispatch, not arithmetic,
so the step is written for the fewest ops: the input projections are split into per-step
views with one ``unbind``; the gates are ``chunk`` views of one ``linear + x_t`` (one
``sigmoid`` over all blocks plus a ``tanh`` on a narrowed view measured ~5% slower in
fwd+bwd: the unused chunk costs a zero-filled gradient); ``c`` is one ``addcmul``; the GRU
update is one ``lerp``; outputs are gathered in a list and stacked once; the reverse
direction walks the same list backwards instead of flipping tensors. A custom
``autograd.Function`` fusing the LSTM cell's pointwise maths (hand-written backward) was
measured ~35% *slower* per fwd+bwd (Python Function overhead per step) and would need a
``jvp`` rule for forward-mode AD, so plain ops are used.

# NOTE [fused fast path]
When nothing needs to see the individual ops, the layers call PyTorch's fused kernels
(``_VF.lstm`` / ``_VF.gru`` / ``_VF.rnn_tanh`` / ``_VF.rnn_relu``, as ``nn.LSTM`` does) one
layer at a time, so plain batch training runs at ``nn.LSTM`` speed. "Nothing needs to see
them" means: no ``vmap``/``jvp`` level and at most one ``grad`` level is active (a nested
``grad`` needs a double backward, which the CPU kernel lacks); no
``torch.autograd.forward_ad`` dual level (no forward derivative); not under ``torch.compile``;
no tensor (input, states, weights) has a ``__torch_function__`` override (the hooks
engine's tracked parameters do, so ``per_sample_grads(method="hooks")`` still sees every
``F.linear``); any active ``TorchFunctionMode`` is ``fp.nn``'s keyed randomness, which
only replaces ``F.dropout`` (``has_torch_function`` counts any active mode, so under it
the tensors' types are checked instead: ``apply(train=True, key=k)`` runs fused);
float32/float64 on CPU, or CUDA. Inter-layer dropout stays a Python ``F.dropout`` on the
same batch-major contiguous tensor as the loop path, so seeded (and keyed) runs give the
same masks. Set ``fused = False`` on a layer (or the
class) to always take the loop, e.g. for a double backward through plain
``torch.autograd.grad(create_graph=True)``.
"""

from __future__ import annotations

import math
import numbers
import warnings
from typing import Any

import torch
import torch.nn.functional as F
from torch import _VF
from torch import Tensor
from torch import nn
from torch._functorch.pyfunctorch import retrieve_all_functorch_interpreters
from torch.autograd import forward_ad as _forward_ad
from torch.overrides import _get_current_function_mode_stack
from torch.overrides import has_torch_function

from functorch_pipeline.nn._randomness import KeyedRandomness
from functorch_pipeline.transforms import _grad_sample

__all__ = ["GRU", "LSTM", "RNN"]


# NOTE [fused per-sample rule]
# Under per_sample_grads(method="hooks") a whole LSTM direction is one call of the
# engine's fused rule (8 ops per step forward, W_hh's per-example gradient from one
# batched matmul over all steps), instead of per-step F.linear rules; elsewhere the
# decorator costs one cheap check per call.
@_grad_sample.overridable
def _lstm_direction(
    steps: list[Tensor], h: Tensor, c: Tensor, w_hh: Tensor, b_hh: Tensor | None,
    w_hr: Tensor | None, reverse: bool,
) -> tuple[list[Tensor], Tensor, Tensor]:
    """Run one LSTM direction over precomputed input projections (see NOTE [per-step overhead])."""
    linear, sigmoid, tanh, addcmul = F.linear, torch.sigmoid, torch.tanh, torch.addcmul
    outs: list[Tensor] = []
    for xt in reversed(steps) if reverse else steps:
        i, f, g, o = (linear(h, w_hh, b_hh) + xt).chunk(4, -1)
        c = addcmul(sigmoid(f) * c, sigmoid(i), tanh(g))
        h = sigmoid(o) * tanh(c)
        if w_hr is not None:
            h = linear(h, w_hr)
        outs.append(h)
    if reverse:
        outs.reverse()
    return outs, h, c


_grad_sample.register_rule(_lstm_direction, _grad_sample.lstm_direction_rule)


@_grad_sample.overridable
def _gru_direction(
    proj: Tensor, h: Tensor, w_hh: Tensor, b_hh: Tensor | None, reverse: bool,
) -> tuple[list[Tensor], Tensor]:
    """Run one GRU direction over the input projections ``proj`` ``(B, T, 3H)``."""
    hidden = h.shape[-1]
    gi_rz, gi_n = proj.split([2 * hidden, hidden], -1)
    steps = list(zip(gi_rz.unbind(1), gi_n.unbind(1), strict=True))
    linear, sigmoid, tanh, addcmul, lerp = F.linear, torch.sigmoid, torch.tanh, torch.addcmul, torch.lerp
    outs: list[Tensor] = []
    for x_rz, x_n in reversed(steps) if reverse else steps:
        gh_rz, gh_n = linear(h, w_hh, b_hh).split([2 * hidden, hidden], -1)
        r, z = sigmoid(x_rz + gh_rz).chunk(2, -1)
        n = tanh(addcmul(x_n, r, gh_n))  # b_hn sits inside the reset product, as in PyTorch
        # (1 - z) * n + z * h; mixed dtypes (autocast) are cast first, see gru_update
        h = lerp(n, h, z) if n.dtype == h.dtype == z.dtype else _grad_sample.gru_update(n, h, z)
        outs.append(h)
    if reverse:
        outs.reverse()
    return outs, h


_grad_sample.register_rule(_gru_direction, _grad_sample.gru_direction_rule)


def _rnn_direction(
    proj: Tensor, h: Tensor, w_hh: Tensor, b_hh: Tensor | None, reverse: bool, relu: bool,
) -> tuple[list[Tensor], Tensor]:
    """Run one Elman RNN direction: ``h' = act(proj_t + F.linear(h, w_hh, b_hh))``."""
    linear, act = F.linear, (torch.relu if relu else torch.tanh)
    steps = proj.unbind(1)
    outs: list[Tensor] = []
    for xt in reversed(steps) if reverse else steps:
        h = act(linear(h, w_hh, b_hh) + xt)
        outs.append(h)
    if reverse:
        outs.reverse()
    return outs, h


def _fused_context_ok() -> bool:
    """Whether the ambient transforms and modes allow NOTE [fused fast path]."""
    if torch.compiler.is_compiling() or _forward_ad._current_level >= 0:
        return False  # compiled, or inside torch.autograd.forward_ad.dual_level()
    if torch._C._functorch.peek_interpreter_stack() is not None:
        levels = retrieve_all_functorch_interpreters()
        if len(levels) > 1 or levels[0].key() != torch._C._functorch.TransformType.Grad:
            return False
    if torch._C._is_torch_function_mode_enabled():
        return all(isinstance(m, KeyedRandomness) for m in _get_current_function_mode_stack())
    return True


def _overrides(t: Tensor) -> bool:
    """Whether ``t``'s type overrides ``__torch_function__`` (``has_torch_function`` for one
    tensor, ignoring modes): plain tensors and parameters do not, the per-sample engine's
    tracked parameters do."""
    cls = type(t)
    return (cls is not Tensor and cls is not nn.Parameter
            and cls.__torch_function__ is not torch._C._disabled_torch_function_impl)


# (kernel, device type, autocast dtype) -> the dtype torch's fused kernel returns
_AUTOCAST_OUT: dict[tuple[Any, str, torch.dtype], torch.dtype] = {}


@torch.compiler.disable
def _autocast_probe(kernel: Any, gates: int, device: torch.device) -> torch.dtype:
    """The output dtype of ``kernel`` on float32 tensors under the active autocast."""
    with torch.no_grad(), torch._C.DisableTorchFunction():
        zeros = [torch.zeros(shape, device=device) for shape in ((1, 1, 1), (gates, 1), (gates, 1))]
        h = torch.zeros(1, 1, 1, device=device)
        hx = (h, h) if kernel is _VF.lstm else h
        return kernel(zeros[0], hx, zeros[1:], False, 1, 0.0, False, False, False)[0].dtype


def _autocast_dtype(layer: _RNNBase, x: Tensor) -> torch.dtype | None:
    """The dtype autocast gives the fused kernel's outputs for float32 ``x``, or ``None``
    when that is float32 (or autocast is off).

    # NOTE [states under autocast]
    Autocast has its own rule per kernel and device: ``nn.LSTM`` runs in the lower
    precision on CPU (oneDNN) and CUDA (cuDNN), casting ``h_0`` and ``c_0`` too, so its
    output and final states come back in ``bfloat16`` / ``float16``; ``nn.GRU`` on CPU
    stays in float32; ``nn.RNN`` on CPU comes back in the lower precision. Rather than
    copy autocast's tables, the loop path asks the kernel: one call on 1-element tensors
    per (kernel, device type, autocast dtype), cached. When that dtype is not float32, the
    loop casts its float32 states to it first (a float32 ``c`` would otherwise promote the
    LSTM's ``addcmul``, and then ``h``, back to float32), and its output and final states
    at the end (``per_sample_grads(method="hooks")``'s fused LSTM rule computes in
    float32): they have the fused kernel's dtype, and its values up to the lower
    precision's rounding.

    Limitation: not under ``vmap`` (so not under ``per_sample_grads(method="vmap")``).
    There autocast does not reach every op (a batched ``F.linear`` with a bias runs in
    float32, as ``nn.Linear`` does under ``vmap``), a bfloat16 state meeting it fails in
    the backward ("expected scalar type BFloat16 but found Float"), and a lower-precision
    output breaks ``LayerNorm``'s backward under ``vmap`` after it; so the loop keeps
    float32 states there and its output stays float32 where ``nn.LSTM``'s would not.
    """
    device = x.device.type
    if x.dtype != torch.float32 or not torch.is_autocast_enabled(device):
        return None
    if torch._C._functorch.peek_interpreter_stack() is not None and any(
            level.key() == torch._C._functorch.TransformType.Vmap
            for level in retrieve_all_functorch_interpreters()):
        return None  # see the NOTE: under vmap the loop keeps float32 states
    kernel = layer._kernel()
    key = (kernel, device, torch.get_autocast_dtype(device))
    dtype = _AUTOCAST_OUT.get(key)
    if dtype is None:
        dtype = _AUTOCAST_OUT[key] = _autocast_probe(kernel, layer._gates, x.device)
    return None if dtype == torch.float32 else dtype


class _RNNBase(nn.Module):
    """Shared constructor, parameters, checks and layer loop of :class:`LSTM` and :class:`GRU`."""

    mode: str = ""
    _gates: int = 0
    #: Take PyTorch's fused kernel when nothing needs the per-op path (NOTE [fused fast path]).
    fused: bool = True

    def __init__(
        self, input_size: int, hidden_size: int, num_layers: int = 1, bias: bool = True,
        batch_first: bool = False, dropout: float = 0.0, bidirectional: bool = False,
        proj_size: int = 0, device: Any = None, dtype: Any = None,
    ) -> None:
        super().__init__()
        name = self.mode
        if (not isinstance(dropout, numbers.Number) or isinstance(dropout, bool)
                or not 0 <= dropout <= 1):
            raise ValueError(f"{name}: dropout should be a number in range [0, 1] representing "
                             f"the probability of an element being zeroed, got {dropout!r}")
        for arg, value in (("input_size", input_size), ("hidden_size", hidden_size),
                           ("num_layers", num_layers), ("proj_size", proj_size)):
            if not isinstance(value, int) or isinstance(value, bool):
                raise TypeError(f"{name}: {arg} should be of type int, got {type(value).__name__}")
        if input_size < 0:
            raise ValueError(f"{name}: input_size must be non-negative, got {input_size}")
        if input_size == 0:  # as nn.LSTM / nn.GRU / nn.RNN
            raise ValueError(f"{name}: input_size must be greater than zero, got {input_size}")
        if hidden_size <= 0:
            raise ValueError(f"{name}: hidden_size must be greater than zero, got {hidden_size}")
        if num_layers <= 0:
            raise ValueError(f"{name}: num_layers must be greater than zero, got {num_layers}")
        if proj_size < 0:
            raise ValueError(f"{name}: proj_size should be a positive integer or zero to "
                             f"disable projections, got {proj_size}")
        if proj_size >= hidden_size:
            raise ValueError(f"{name}: proj_size has to be smaller than hidden_size, "
                             f"got proj_size={proj_size} and hidden_size={hidden_size}")
        if dropout > 0 and num_layers == 1:
            warnings.warn(
                f"{name}: dropout option adds dropout after all but last recurrent layer, so "
                f"non-zero dropout expects num_layers greater than 1, but got "
                f"dropout={dropout} and num_layers={num_layers}", stacklevel=3)
        self.input_size = input_size
        self.hidden_size = hidden_size
        self.num_layers = num_layers
        self.bias = bias
        self.batch_first = batch_first
        self.dropout = float(dropout)
        self.bidirectional = bidirectional
        self.proj_size = proj_size

        # Parameters are registered in nn.LSTM's order (_flat_weights_names), so the
        # state_dict keys match and reset_parameters draws the same numbers from a seed.
        factory: dict[str, Any] = {"device": device, "dtype": dtype}
        directions = 2 if bidirectional else 1
        real_hidden = proj_size if proj_size > 0 else hidden_size
        gate_size = self._gates * hidden_size
        self._weight_names: list[list[tuple[str | None, ...]]] = []
        for layer in range(num_layers):
            per_direction = []
            for direction in range(directions):
                layer_input = input_size if layer == 0 else real_hidden * directions
                suffix = f"_l{layer}" + ("_reverse" if direction == 1 else "")
                shapes = {"weight_ih": (gate_size, layer_input), "weight_hh": (gate_size, real_hidden)}
                if bias:
                    shapes.update(bias_ih=(gate_size,), bias_hh=(gate_size,))
                if proj_size > 0:
                    shapes["weight_hr"] = (proj_size, hidden_size)
                for kind, shape in shapes.items():
                    self.register_parameter(kind + suffix, nn.Parameter(torch.empty(shape, **factory)))
                per_direction.append(tuple(
                    kind + suffix if kind in shapes else None
                    for kind in ("weight_ih", "weight_hh", "bias_ih", "bias_hh", "weight_hr")))
            self._weight_names.append(per_direction)
        self.reset_parameters()

    def reset_parameters(self) -> None:
        """Re-draw every parameter from ``uniform(-1/sqrt(hidden_size), 1/sqrt(hidden_size))``,
        in ``nn.LSTM``'s order (same seed, same numbers)."""
        stdv = 1.0 / math.sqrt(self.hidden_size)
        for weight in self.parameters():
            nn.init.uniform_(weight, -stdv, stdv)

    def flatten_parameters(self) -> None:
        """A no-op, for code written for ``nn.LSTM`` (there is no fused weight buffer here)."""

    @property
    def all_weights(self) -> list[list[Tensor]]:
        """The parameters per layer and direction, as in ``nn.LSTM.all_weights``."""
        return [[getattr(self, n) for n in names if n is not None]
                for per_direction in self._weight_names for names in per_direction]

    def extra_repr(self) -> str:
        s = f"{self.input_size}, {self.hidden_size}"
        if self.proj_size != 0:
            s += f", proj_size={self.proj_size}"
        for arg, default in (("num_layers", 1), ("bias", True), ("batch_first", False),
                             ("dropout", 0.0), ("bidirectional", False)):
            if getattr(self, arg) != default:
                s += f", {arg}={getattr(self, arg)}"
        return s

    # -- input checks ---------------------------------------------------------------------

    def _check_input(self, input: Tensor) -> bool:
        """Validate ``input`` and return whether it is batched (3-D)."""
        name = self.mode
        if isinstance(input, nn.utils.rnn.PackedSequence) and self.bidirectional:
            # the padded form's advice holds for one direction only: the reverse direction
            # of a padded sequence starts in its padding (0.11 from packed nn.LSTM)
            raise NotImplementedError(
                f"{name}: PackedSequence input is not supported, and a bidirectional layer on "
                "the padded tensor differs from packed input: its reverse direction starts in "
                "the padding. Run two unidirectional layers instead, the second on each "
                "sequence reversed within its length (x.gather(1, index) with index[b, t] = "
                "lengths[b] - 1 - t, clamped at 0, batch_first), reading both at each "
                "sequence's own steps: per_sample_grads and clipped_grad handle that with "
                "their fast methods")
        if isinstance(input, nn.utils.rnn.PackedSequence):
            raise NotImplementedError(
                f"{name}: PackedSequence input is not supported; pass the padded tensor and "
                "read each sequence's last valid step, out[torch.arange(B), lengths - 1] "
                "(batch_first), or mask the padded steps in the loss: per_sample_grads and "
                "clipped_grad handle that with their fast methods, where torch.func.vmap "
                f"cannot batch a PackedSequence at all (nn.{name} runs one outside vmap)")
        if not isinstance(input, Tensor):
            raise TypeError(f"{name}: input must be a Tensor, got {type(input).__name__}")
        if input.dim() not in (2, 3):
            raise ValueError(f"{name}: Expected input to be 2D or 3D, got {input.dim()}D instead")
        if input.shape[-1] != self.input_size:
            raise RuntimeError(f"{name}: input.size(-1) must be equal to input_size. "
                               f"Expected {self.input_size}, got {input.shape[-1]}")
        weight = self.weight_ih_l0
        if input.dtype != weight.dtype:
            raise ValueError(
                f"{name}: input dtype ({input.dtype}) does not match weight dtype ({weight.dtype}). "
                f"Convert input: input.to({weight.dtype}), or convert model: model.to({input.dtype})")
        time = input.shape[0 if input.dim() == 2 or not self.batch_first else 1]
        if time == 0:
            raise RuntimeError(f"{name}: input has sequence length 0; expected at least one time step")
        return input.dim() == 3

    def _check_state(self, state: Any, what: str, expected: tuple[int, ...], batched: bool,
                     input: Tensor) -> Tensor:
        name = self.mode
        if not isinstance(state, Tensor):
            raise TypeError(f"{name}: {what} must be a Tensor, got {type(state).__name__}")
        want = expected if batched else (expected[0], expected[2])
        if state.dim() != len(want):
            kind = "batched 3-D" if batched else "unbatched 2-D"
            raise RuntimeError(f"{name}: For {kind} input, {what} should also be {len(want)}-D "
                               f"but got a {state.dim()}-D tensor")
        if tuple(state.shape) != want:
            raise RuntimeError(f"{name}: Expected {what} size {want}, got {list(state.shape)}")
        if state.dtype != input.dtype:
            raise ValueError(f"{name}: {what} dtype ({state.dtype}) does not match input dtype "
                             f"({input.dtype})")
        return state

    # -- the layer loop -------------------------------------------------------------------

    def _layers(self, x: Tensor, states: list[list[Tensor]], time_major_out: bool
                ) -> tuple[Tensor, list[list[Tensor]]]:
        """Run all layers on batch-major ``x`` (NOTE [batch on axis 0]); ``states[k][j]`` is
        state ``k`` (h, c) of layer-direction ``j``. The last layer's output is stacked
        time-major when ``time_major_out``."""
        finals: list[list[Tensor]] = [[] for _ in states]
        directions = 2 if self.bidirectional else 1
        for layer, per_direction in enumerate(self._weight_names):
            last_layer = layer == self.num_layers - 1
            stack_dim = 0 if (time_major_out and last_layer) else 1
            outputs = []
            for direction, names in enumerate(per_direction):
                w_ih, w_hh, b_ih, b_hh, w_hr = (None if n is None else getattr(self, n) for n in names)
                index = layer * directions + direction
                proj = F.linear(x, w_ih, b_ih)  # every time step at once
                outs, *last = self._direction(
                    proj, [s[index] for s in states], w_hh, b_hh, w_hr, direction == 1)
                outputs.append(torch.stack(outs, stack_dim))
                for k, s in enumerate(last):
                    finals[k].append(s)
            x = outputs[0] if directions == 1 else torch.cat(outputs, -1)
            if self.dropout > 0 and self.training and not last_layer:
                x = F.dropout(x, self.dropout, training=True)
        return x, finals

    def _direction(self, proj: Tensor, state: list[Tensor], w_hh: Tensor, b_hh: Tensor | None,
                   w_hr: Tensor | None, reverse: bool) -> tuple[Any, ...]:
        raise NotImplementedError

    def _kernel(self) -> Any:
        raise NotImplementedError

    def _layer_weights(self) -> list[list[Tensor]]:
        """Per layer, the weights of all its directions in ``_VF``'s flat order."""
        return [[getattr(self, n) for names in per_direction for n in names if n is not None]
                for per_direction in self._weight_names]

    def _use_fused(self, input: Tensor, states: list[Tensor], weights: list[list[Tensor]]) -> bool:
        if not self.fused or not _fused_context_ok():
            return False
        if input.device.type != "cuda" and (input.device.type != "cpu"
                                            or input.dtype not in (torch.float32, torch.float64)):
            return False
        tensors = (input, *states, *(w for ws in weights for w in ws))
        if torch._C._is_torch_function_mode_enabled():
            # only fp.nn's keyed randomness is active (_fused_context_ok), which
            # has_torch_function would count; look for overriding tensor types alone
            return not any(_overrides(t) for t in tensors)
        return not has_torch_function(tensors)

    def _layers_fused(self, x: Tensor, full: list[Tensor], weights: list[list[Tensor]],
                      time_major_out: bool) -> tuple[Tensor, list[Tensor]]:
        """NOTE [fused fast path]: ``_layers`` with one fused kernel call per layer; ``full[k]``
        is state ``k`` of all layer-directions, ``(layers * directions, batch, size)``."""
        directions = 2 if self.bidirectional else 1
        kernel = self._kernel()
        finals: list[list[Tensor]] = [[] for _ in full]
        for layer, flat in enumerate(weights):
            last_layer = layer == self.num_layers - 1
            time_major = time_major_out and last_layer
            hx = [f[layer * directions:(layer + 1) * directions] for f in full]
            args = (x.transpose(0, 1) if time_major else x, tuple(hx) if len(hx) == 2 else hx[0],
                    flat, self.bias, 1, 0.0, self.training, self.bidirectional, not time_major)
            if self.proj_size and x.device.type == "cpu":
                with warnings.catch_warnings():  # oneDNN's "projections not supported" notice
                    warnings.simplefilter("ignore", UserWarning)
                    out, *last = kernel(*args)
            else:
                out, *last = kernel(*args)
            for k, s in enumerate(last):
                finals[k].append(s)
            x = out
            if self.dropout > 0 and self.training and not last_layer:
                # the loop path's layout, so the global generator draws the same mask
                x = F.dropout(x.contiguous(), self.dropout, training=True)
        return x, [torch.cat(f, 0) if len(f) > 1 else f[0] for f in finals]

    def _run(self, input: Tensor, hx: tuple[Any, ...] | None, what: tuple[str, ...]
             ) -> tuple[Tensor, list[Tensor]]:
        # NOTE [batch on axis 0]
        # Inside, activations are always (batch, seq, feature): a time-major input is
        # transposed (a view) and an unbatched one gets a batch of one in front. Every
        # F.linear and F.dropout thus sees the batch on axis 0, which fp.nn's keyed dropout
        # (one key per example along axis 0) and the per-sample-gradient engine (it reads
        # the batch from axis 0 of each F.linear input) rely on. Only the last layer stacks
        # its steps time-major when the caller wants (seq, batch, feature) back.
        batched = self._check_input(input)
        directions = 2 if self.bidirectional else 1
        time_major = batched and not self.batch_first
        x = input.transpose(0, 1) if time_major else (input if batched else input.unsqueeze(0))
        batch = x.shape[0]
        sizes = [self.proj_size or self.hidden_size, self.hidden_size][: len(what)]
        full: list[Tensor] = []
        for state, label, size in zip(hx or (), what, sizes, strict=False):
            expected = (self.num_layers * directions, batch, size)
            state = self._check_state(state, label, expected, batched, input)
            full.append(state if batched else state.unsqueeze(1))
        weights = self._layer_weights()
        if self._use_fused(input, full, weights):
            if hx is None:
                full = [x.new_zeros(self.num_layers * directions, batch, size) for size in sizes]
            output, final = self._layers_fused(x, full, weights, time_major)
        else:
            if hx is None:
                zeros = [x.new_zeros(batch, size) for size in sizes]
                states = [[z] * (self.num_layers * directions) for z in zeros]
            else:
                states = [list(f.unbind(0)) for f in full]
            cast = _autocast_dtype(self, x)
            if cast is not None:  # NOTE [states under autocast]
                states = [[s.to(cast) for s in per_state] for per_state in states]
            output, finals = self._layers(x, states, time_major)
            final = [torch.stack(f, 0) for f in finals]
            if cast is not None:  # per_sample_grads' fused LSTM rule computes in float32
                output, final = output.to(cast), [f.to(cast) for f in final]
        if not batched:
            output = output.squeeze(0)
            final = [f.squeeze(1) for f in final]
        return output, final


class LSTM(_RNNBase):
    r"""A multi-layer LSTM with ``nn.LSTM``'s interface, built from vmappable ops.

    Same arguments, parameters, initialisation, forward signature and results as
    :class:`torch.nn.LSTM` (gate order i, f, g, o; projections with ``proj_size``), but
    computed with ``F.linear`` and elementwise ops, so ``torch.func.vmap`` (and
    ``fp.per_sample_grads``) batch it without a per-example fallback. See
    NOTE [every weight through F.linear] in this module. Where no transform or engine
    needs the individual ops (plain batch training), it runs PyTorch's fused kernel
    instead, with the same numbers (NOTE [fused fast path]; ``fused = False`` opts out).

    Args:
      input_size: features of the input ``x``.
      hidden_size: features of the hidden state ``h``.
      num_layers: stacked recurrent layers.
      bias: whether the layers have ``b_ih`` and ``b_hh``.
      batch_first: inputs/outputs are ``(batch, seq, feature)`` (initial and final states
        stay ``(layers * directions, batch, hidden)``; no effect on unbatched input).
      dropout: probability of ``F.dropout`` on each layer's output but the last, in training.
      bidirectional: run a second, reversed direction and concatenate both outputs.
      proj_size: if > 0, project ``h`` to this size with ``weight_hr_l{k}``.
      device, dtype: factory arguments for the parameters.

    Forward ``(input, hx=None)``: ``input`` is ``(seq, batch, input_size)`` (or
    ``(batch, seq, input_size)`` with ``batch_first``, or unbatched ``(seq, input_size)``);
    ``hx`` is ``(h_0, c_0)`` or ``None`` for zeros.

    Returns:
      ``(output, (h_n, c_n))`` exactly as ``nn.LSTM``.

    >>> import torch
    >>> torch.manual_seed(0); ref = torch.nn.LSTM(3, 4, num_layers=2, bidirectional=True)
    <...>
    >>> lstm = LSTM(3, 4, num_layers=2, bidirectional=True)
    >>> lstm.load_state_dict(ref.state_dict())
    <All keys matched successfully>
    >>> x = torch.randn(5, 2, 3)
    >>> out, (h, c) = lstm(x)
    >>> out.shape, h.shape, c.shape
    (torch.Size([5, 2, 8]), torch.Size([4, 2, 4]), torch.Size([4, 2, 4]))
    >>> torch.allclose(out, ref(x)[0], atol=1e-6)
    True

    Notes:
      NOTE [every weight through F.linear]: every use of a weight is one ``F.linear`` call on the
        whole parameter (no ``@``, ``addmm`` or slicing), so per-sample-gradient engines see every
        weight use as an (input, grad_output) pair.
      NOTE [fused fast path]: when no transform or engine needs the individual ops (no
        ``vmap``/``jvp``, at most one ``grad`` level, no ``torch.compile``, no
        ``__torch_function__`` override), layers call PyTorch's fused kernel
        (as ``nn.LSTM`` does) with the same numbers; ``fused = False`` opts out.
    """

    mode = "LSTM"
    _gates = 4

    def __init__(
        self, input_size: int, hidden_size: int, num_layers: int = 1, bias: bool = True,
        batch_first: bool = False, dropout: float = 0.0, bidirectional: bool = False,
        proj_size: int = 0, device: Any = None, dtype: Any = None,
    ) -> None:
        super().__init__(input_size, hidden_size, num_layers, bias, batch_first, dropout,
                         bidirectional, proj_size, device, dtype)

    def _direction(self, proj, state, w_hh, b_hh, w_hr, reverse):  # type: ignore[override]
        h, c = state
        return _lstm_direction(list(proj.unbind(1)), h, c, w_hh, b_hh, w_hr, reverse)

    def _kernel(self) -> Any:
        return _VF.lstm

    def forward(self, input: Tensor, hx: tuple[Tensor, Tensor] | None = None
                ) -> tuple[Tensor, tuple[Tensor, Tensor]]:
        """``(output, (h_n, c_n))`` for ``input`` and optional ``hx = (h_0, c_0)``."""
        if hx is not None and (not isinstance(hx, (tuple, list)) or len(hx) != 2):
            raise TypeError(f"LSTM: hx must be a tuple (h_0, c_0) of two tensors, got "
                            f"{type(hx).__name__}")
        output, (h_n, c_n) = self._run(input, hx, ("hx", "cx"))
        return output, (h_n, c_n)


class GRU(_RNNBase):
    r"""A multi-layer GRU with ``nn.GRU``'s interface, built from vmappable ops.

    Same arguments, parameters, initialisation, forward signature and results as
    :class:`torch.nn.GRU` (gate order r, z, n; ``b_hn`` inside the reset product), computed
    with ``F.linear`` and elementwise ops so ``torch.func.vmap`` batches it. See
    NOTE [every weight through F.linear] in this module.

    Args:
      input_size, hidden_size, num_layers, bias, batch_first, dropout, bidirectional,
      device, dtype: as :class:`LSTM` (there is no ``proj_size``).

    Forward ``(input, hx=None)``: ``input`` as :class:`LSTM`; ``hx`` is ``h_0`` or ``None``.

    Returns:
      ``(output, h_n)`` exactly as ``nn.GRU``.

    >>> import torch
    >>> torch.manual_seed(0); ref = torch.nn.GRU(3, 4, batch_first=True)
    <...>
    >>> gru = GRU(3, 4, batch_first=True)
    >>> gru.load_state_dict(ref.state_dict())
    <All keys matched successfully>
    >>> x = torch.randn(2, 5, 3)
    >>> out, h = gru(x)
    >>> out.shape, h.shape
    (torch.Size([2, 5, 4]), torch.Size([1, 2, 4]))
    >>> torch.allclose(out, ref(x)[0], atol=1e-6)
    True

    Notes:
      NOTE [every weight through F.linear]: every use of a weight is one ``F.linear`` call on the
        whole parameter (no ``@``, ``addmm`` or slicing), so per-sample-gradient engines see every
        weight use as an (input, grad_output) pair.
    """

    mode = "GRU"
    _gates = 3

    def __init__(
        self, input_size: int, hidden_size: int, num_layers: int = 1, bias: bool = True,
        batch_first: bool = False, dropout: float = 0.0, bidirectional: bool = False,
        device: Any = None, dtype: Any = None,
    ) -> None:
        super().__init__(input_size, hidden_size, num_layers, bias, batch_first, dropout,
                         bidirectional, 0, device, dtype)

    def _direction(self, proj, state, w_hh, b_hh, w_hr, reverse):  # type: ignore[override]
        (h,) = state
        return _gru_direction(proj, h, w_hh, b_hh, reverse)

    def _kernel(self) -> Any:
        return _VF.gru

    def forward(self, input: Tensor, hx: Tensor | None = None) -> tuple[Tensor, Tensor]:
        """``(output, h_n)`` for ``input`` and optional initial state ``hx = h_0``."""
        if hx is not None and not isinstance(hx, Tensor):
            raise TypeError(f"GRU: hx must be a Tensor h_0, got {type(hx).__name__}")
        output, (h_n,) = self._run(input, None if hx is None else (hx,), ("hx",))
        return output, h_n


class RNN(_RNNBase):
    r"""A multi-layer Elman RNN (tanh or ReLU) with ``nn.RNN``'s interface, from vmappable ops.

    Same arguments (``nonlinearity`` is the fourth positional one, as in ``nn.RNN``),
    parameters, initialisation, forward signature and results as :class:`torch.nn.RNN`:
    ``h_t = act(x_t W_ih^T + b_ih + h_{t-1} W_hh^T + b_hh)``, computed with ``F.linear``
    and elementwise ops so ``torch.func.vmap`` batches it and ``per_sample_grads``'s hooks
    method sees every weight use (NOTE [every weight through F.linear]).

    Args:
      input_size, hidden_size, num_layers: as :class:`LSTM`.
      nonlinearity: ``"tanh"`` (default) or ``"relu"``.
      bias, batch_first, dropout, bidirectional, device, dtype: as :class:`LSTM` (there is
        no ``proj_size``).

    Forward ``(input, hx=None)``: ``input`` as :class:`LSTM`; ``hx`` is ``h_0`` or ``None``.

    Returns:
      ``(output, h_n)`` exactly as ``nn.RNN``.

    Notes:
      NOTE [every weight through F.linear]: every use of a weight is one ``F.linear`` call on the
        whole parameter (no ``@``, ``addmm`` or slicing), so per-sample-gradient engines see every
        weight use as an (input, grad_output) pair.

    Example:
    >>> import torch
    >>> torch.manual_seed(0); ref = torch.nn.RNN(3, 4, 2, "relu", batch_first=True)
    <...>
    >>> rnn = RNN(3, 4, 2, "relu", batch_first=True)
    >>> rnn.load_state_dict(ref.state_dict())
    <All keys matched successfully>
    >>> x = torch.randn(2, 5, 3)
    >>> out, h = rnn(x)
    >>> out.shape, h.shape
    (torch.Size([2, 5, 4]), torch.Size([2, 2, 4]))
    >>> torch.allclose(out, ref(x)[0], atol=1e-6)
    True
    """

    mode = "RNN"
    _gates = 1

    def __init__(
        self, input_size: int, hidden_size: int, num_layers: int = 1,
        nonlinearity: str = "tanh", bias: bool = True, batch_first: bool = False,
        dropout: float = 0.0, bidirectional: bool = False, device: Any = None, dtype: Any = None,
    ) -> None:
        if nonlinearity not in ("tanh", "relu"):
            raise ValueError(f"RNN: Unknown nonlinearity '{nonlinearity}'. Select from 'tanh' "
                             "or 'relu'.")
        super().__init__(input_size, hidden_size, num_layers, bias, batch_first, dropout,
                         bidirectional, 0, device, dtype)
        self.nonlinearity = nonlinearity

    def extra_repr(self) -> str:
        s = super().extra_repr()
        return s if self.nonlinearity == "tanh" else s + f", nonlinearity={self.nonlinearity}"

    def _direction(self, proj, state, w_hh, b_hh, w_hr, reverse):  # type: ignore[override]
        (h,) = state
        return _rnn_direction(proj, h, w_hh, b_hh, reverse, self.nonlinearity == "relu")

    def _kernel(self) -> Any:
        return _VF.rnn_relu if self.nonlinearity == "relu" else _VF.rnn_tanh

    def forward(self, input: Tensor, hx: Tensor | None = None) -> tuple[Tensor, Tensor]:
        """``(output, h_n)`` for ``input`` and optional initial state ``hx = h_0``."""
        if hx is not None and not isinstance(hx, Tensor):
            raise TypeError(f"RNN: hx must be a Tensor h_0, got {type(hx).__name__}")
        output, (h_n,) = self._run(input, None if hx is None else (hx,), ("hx",))
        return output, h_n

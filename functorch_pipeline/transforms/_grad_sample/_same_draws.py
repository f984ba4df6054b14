"""Random draws in a padded run: the padding examples draw what the first example draws.

# NOTE [random draws in a padded run]
A padded run (NOTE [padding an ambiguous batch] in ``_padding``) proves a layout by values:
rows that belong to the padding examples, copies of the first example, must repeat the
first example's rows (``Engine.padding_rows_repeat``: ``m`` rows per example merged into
axis 0, the output gradients of a class token expanded over the batch). In training mode
a model draws random numbers per example (dropout masks, stochastic depth's per-example
``bernoulli_``), so a padding example's rows differ from the first example's after the
first draw, the proof fails and the default method falls back to ``vmap``, which refuses
PyTorch's global RNG (``randomness="error"``). torchvision's Swin in training mode
(stochastic depth 0.2, its windows merged into axis 0) failed that way in 3 of 8 calls
at a batch of 3.

So while a padded run's forward and backward run, this mode gives the padding examples the
first example's draws: a random tensor whose axis 0 has ``m * P`` rows for the padded batch
size ``P`` has its rows from ``m * B`` on (``B`` the real examples) overwritten with
copies of its first ``m`` rows (the first example's, when the rows are ``m`` consecutive
per example). Only freshly drawn random tensors are changed, never data: a tensor made from
data in another layout (the examples last) does not come to repeat its first rows by this,
so the proofs still refuse it. The dropout functions (``F.dropout``, ``dropout1d/2d/3d``)
are run as their input times a drawn mask (scaled by ``1 / (1 - p)``), so that the mask is
such a tensor; the rest are PyTorch's sampling functions and in-place samplers
(``bernoulli_``, ``rand_like``, ``uniform_``, ...). The real examples' rows keep their own
draws, and the padding rows are dropped from every result, so what the caller gets is a
draw of the model's randomness as before. A random tensor whose axis 0 is a multiple of
``P`` but not examples (noise of shape ``(2 P, D)`` made in ``loss_fn``) gets correlated
rows in a padded run; attention dropout inside ``F.scaled_dot_product_attention``
(``dropout_p > 0``) draws inside the kernel and is not reached (eager attention is).
"""

from __future__ import annotations

from typing import Any

import torch
import torch.nn.functional as F
from torch.overrides import TorchFunctionMode

from functorch_pipeline.transforms._grad_sample._rules import _get

__all__ = ["SameDraws"]

_T = torch.Tensor
_SAMPLERS = frozenset({
    torch.bernoulli, _T.bernoulli, _T.bernoulli_, torch.rand, torch.rand_like, torch.randn,
    torch.randn_like, torch.randint, torch.randint_like, torch.normal, _T.normal_,
    _T.uniform_, _T.random_, _T.exponential_, _T.geometric_, _T.cauchy_, _T.log_normal_,
    torch.multinomial, _T.multinomial, torch.poisson,
})
_DROPOUT = {F.dropout: 0, F.dropout1d: 1, F.dropout2d: 2, F.dropout3d: 3}  # trailing axes shared


class SameDraws(TorchFunctionMode):
    """NOTE [random draws in a padded run] for a batch of ``real`` examples padded to
    ``padded``."""

    def __init__(self, real: int, padded: int) -> None:
        super().__init__()
        self.real, self.padded = real, padded
        self.drew = False  # whether anything was drawn under this mode

    def __torch_function__(self, func: Any, types: Any, args: Any = (), kwargs: Any = None) -> Any:
        kwargs = kwargs or {}
        if func in _DROPOUT:
            return self._dropout(func, args, kwargs)
        out = func(*args, **kwargs)
        if func in _SAMPLERS:
            self.drew = True
            self._repeat(out)
        return out

    def _repeat(self, t: Any) -> None:
        """Rows past the real examples' copy the first example's (``m`` rows each)."""
        if not isinstance(t, torch.Tensor) or t.dim() == 0 or t.requires_grad:
            return
        n = t.shape[0]
        if n == 0 or n % self.padded:
            return
        m = n // self.padded
        with torch.no_grad():
            t[self.real * m:] = t[:m].repeat(self.padded - self.real, *([1] * (t.dim() - 1)))

    def _dropout(self, func: Any, args: Any, kwargs: dict[str, Any]) -> Any:
        x, p = _get(args, kwargs, 0, "input"), _get(args, kwargs, 1, "p", 0.5)
        training, inplace = _get(args, kwargs, 2, "training", True), _get(args, kwargs, 3, "inplace", False)
        if not training or not isinstance(p, (int, float)) or not 0 < p < 1:
            return func(*args, **kwargs)  # nothing drawn, or all dropped: torch's own
        self.drew = True
        shared = _DROPOUT[func]
        shape = (*x.shape[:x.dim() - shared], *[1] * shared)  # a channel's mask is shared
        keep = torch.empty(shape, dtype=x.dtype, device=x.device).bernoulli_(1 - p)
        self._repeat(keep)
        keep = keep.div_(1 - p)
        return x.mul_(keep) if inplace else x * keep

"""A fused rule for one LSTM direction: the whole time loop in one autograd node.

# NOTE [fused LSTM direction]
With the per-step ``F.linear`` rule, a recurrent layer costs what its eager autograd
graph costs: ~10 recorded ops per step forward and ~15 autograd nodes backward, each a
few microseconds of dispatch on tiny tensors (batch 32, hidden 64), 200 steps for a
2-layer bidirectional LSTM over 50 steps. This rule replaces one direction by one
``autograd.Function``:

* forward: the loop under no-grad, writing gates, cell states and hidden states into
  preallocated ``(T, B, ...)`` buffers with ``out=`` ops (no graph, no allocations);
* backward: hand-written backpropagation through time, ~7 ops per step; the gate
  derivatives of every step are precomputed in a few whole-sequence ops first;
* per-example gradients: the pre-activation gate gradients ``dG (T, B, 4H)`` are exactly
  the gradient at the input projection (which flows on to ``W_ih``'s ``F.linear`` rule)
  and at ``F.linear(h, W_hh, b_hh)``, so ``W_hh``'s per-example gradient is one batched
  matmul of ``dG`` with the stacked previous hidden states, and ``b_hh``'s is ``dG``
  summed over time.

The maths is ``nn.LSTM``'s (gate order i, f, g, o; ``c' = f c + i g``, ``h' = o tanh(c')``).
A direction with a projection (``w_hr``) falls back to a plain loop of ``F.linear``
calls, which the per-step rules handle.
"""

from __future__ import annotations

from typing import Any

import torch
import torch.nn.functional as F

from functorch_pipeline.transforms._grad_sample._engine import Engine
from functorch_pipeline.transforms._grad_sample._engine import autocast_on

__all__ = ["gru_direction_rule", "lstm_direction_rule"]


class _LSTMDirection(torch.autograd.Function):
    """``(Y, h_T, c_T)`` of one LSTM direction over gate inputs ``xp`` (T, B, 4H), which
    already include both biases. Time order throughout; ``reverse`` walks T-1 .. 0."""

    @staticmethod
    def forward(ctx: Any, xp: torch.Tensor, h0: torch.Tensor, c0: torch.Tensor,
                anchor: torch.Tensor, w_hh: torch.Tensor, reverse: bool,
                sink: Any) -> tuple[torch.Tensor, torch.Tensor, torch.Tensor]:
        with torch._C.DisableTorchFunction():  # plain tensors only: skip any mode's dispatch
            return _forward(ctx, xp, h0, c0, w_hh, reverse, sink)

    @staticmethod
    def backward(ctx: Any, dy: torch.Tensor, dh_last: torch.Tensor, dc_last: torch.Tensor
                 ) -> tuple[Any, ...]:
        with torch._C.DisableTorchFunction():
            return _backward(ctx, dy, dh_last, dc_last)


def _forward(ctx: Any, xp: torch.Tensor, h0: torch.Tensor, c0: torch.Tensor, w_hh: torch.Tensor,
             reverse: bool, sink: Any) -> tuple[torch.Tensor, torch.Tensor, torch.Tensor]:
    T, B, G = xp.shape
    H = G // 4
    # NOTE [one sigmoid for all four gates]: tanh(x) = 2 sigmoid(2x) - 1. With the g rows
    # of the gate inputs and of W_hh doubled, one in-place sigmoid gives i, f, o and s_g,
    # where g = 2 s_g - 1, so c = f c + i g = f c + 2 i s_g - i.
    scale = xp.new_ones(G)
    scale[2 * H:3 * H] = 2
    xs, wt = xp * scale, (w_hh * scale[:, None]).t()
    # Hidden and cell states with one padding slot: the state *before* time t is
    # hs[t + shift], the state *at* t is hs[t + 1 - shift] (shift = 1 walking backwards).
    hs, cs = xp.new_empty(T + 1, B, H), xp.new_empty(T + 1, B, H)
    acts, tanh_c = xp.new_empty(T, B, G), xp.new_empty(T, B, H)
    shift = 1 if reverse else 0
    hs[T if reverse else 0] = h0
    cs[T if reverse else 0] = c0
    h_l, c_l, x_l, a_l, tc_l = hs.unbind(0), cs.unbind(0), xs.unbind(0), acts.unbind(0), tanh_c.unbind(0)
    for t in (range(T - 1, -1, -1) if reverse else range(T)):
        i, f, s_g, o = torch.addmm(x_l[t], h_l[t + shift], wt, out=a_l[t]).sigmoid_().chunk(4, 1)
        c = torch.mul(f, c_l[t + shift], out=c_l[t + 1 - shift]).addcmul_(i, s_g, value=2).sub_(i)
        torch.mul(o, torch.tanh(c, out=tc_l[t]), out=h_l[t + 1 - shift])
    acts.narrow(2, 2 * H, H).mul_(2).sub_(1)  # s_g -> g for every step at once
    ctx.save_for_backward(w_hh, hs, cs, acts, tanh_c)
    ctx.reverse, ctx.sink = reverse, sink
    last = 0 if reverse else T
    return (hs[:T] if reverse else hs[1:]), hs[last].clone(), cs[last].clone()


def _backward(ctx: Any, dy: torch.Tensor, dh_last: torch.Tensor, dc_last: torch.Tensor
              ) -> tuple[Any, ...]:
    w_hh, hs, cs, acts, tanh_c = ctx.saved_tensors
    reverse = ctx.reverse
    T, B, G = acts.shape
    H = G // 4
    shift = 1 if reverse else 0
    c_prev, h_prev = cs[shift:T + shift], hs[shift:T + shift]
    a_i, a_f, a_g, a_o = acts.chunk(4, 2)
    # Whole-sequence precomputation, so the loop is 5 ops per step: with dG the gradient
    # at the gate pre-activations and sigma' = s (1 - s),
    #   dG_(i,f,g) = dc * [g sigma'(i), c_prev sigma'(f), i (1 - g^2)]  (by_dc)
    #   dG_o       = dh * tanh(c) sigma'(o)                            (by_dh)
    #   dc         = dc_next f_next + dh o (1 - tanh(c)^2)             (o_dtanh)
    #   dh         = dy + dG_next @ W_hh
    sig = acts * (1 - acts)
    by_dc = torch.stack([a_g, c_prev, a_i], 2)
    by_dc.mul_(torch.stack([sig[..., :H], sig[..., H:2 * H], 1 - a_g * a_g], 2))
    by_dh = tanh_c * sig[..., 3 * H:]
    o_dtanh = a_o * (1 - tanh_c * tanh_c)
    dgates = acts.new_empty(T, B, G)
    dg_l, dg3_l = dgates.unbind(0), dgates[..., :3 * H].unflatten(2, (3, H)).unbind(0)
    dgo_l = dgates[..., 3 * H:].unbind(0)
    dy_l, od_l, f_l, m_l, mo_l = dy.unbind(0), o_dtanh.unbind(0), a_f.unbind(0), by_dc.unbind(0), by_dh.unbind(0)
    order = list(range(T)) if reverse else list(range(T - 1, -1, -1))
    dh, dc = dh_last + dy_l[order[0]], dc_last
    for n, t in enumerate(order):
        dc = torch.addcmul(dc, dh, od_l[t])
        torch.mul(dc.unsqueeze(1), m_l[t], out=dg3_l[t])
        torch.mul(dh, mo_l[t], out=dgo_l[t])
        dh = torch.addmm(dy_l[order[n + 1]], dg_l[t], w_hh) if n + 1 < T else torch.mm(dg_l[t], w_hh)
        dc = dc * f_l[t]
    engine, w_slot, b_slot = ctx.sink
    by_batch = dgates.transpose(0, 1)  # (B, T, 4H) view
    if w_slot is not None:
        engine.add("outer", w_slot, h_prev.transpose(0, 1).unsqueeze(1), by_batch.unsqueeze(1))
    if b_slot is not None:
        engine.add("sum", b_slot, by_batch)
    return dgates, dh, dc, None, None, None, None


def _lstm_loop(steps: list[torch.Tensor], h: torch.Tensor, c: torch.Tensor, w_hh: Any,
               b_hh: Any, w_hr: Any, reverse: bool) -> tuple[list[torch.Tensor], torch.Tensor, torch.Tensor]:
    """The unfused direction: per-step ``F.linear`` calls, each seen by the linear rule."""
    outs = []
    for xt in reversed(steps) if reverse else steps:
        i, f, g, o = (F.linear(h, w_hh, b_hh) + xt).chunk(4, -1)
        c = torch.addcmul(torch.sigmoid(f) * c, torch.sigmoid(i), torch.tanh(g))
        h = torch.sigmoid(o) * torch.tanh(c)
        if w_hr is not None:
            h = F.linear(h, w_hr)
        outs.append(h)
    if reverse:
        outs.reverse()
    return outs, h, c


def lstm_direction_rule(engine: Engine, args: Any, kwargs: dict[str, Any]) -> Any:
    """Rule for ``fp.nn``'s ``_lstm_direction(steps, h, c, w_hh, b_hh, w_hr, reverse)``:
    ``steps`` are the per-step input projections ``(B, 4H)`` (batch first), ``h``/``c``
    the initial states ``(B, H)``; returns ``(outputs per step, h_T, c_T)``."""
    names = ("steps", "h", "c", "w_hh", "b_hh", "w_hr", "reverse")
    bound = dict(zip(names, args, strict=False))
    bound.update(kwargs)
    steps, h, c, w_hh, b_hh = (bound[n] for n in names[:5])
    w_hr, reverse = bound.get("w_hr"), bound.get("reverse", False)
    ws, bs = engine.slot(w_hh), engine.slot(b_hh)
    if engine.slot(h) is not None or engine.slot(c) is not None or any(engine.slot(s) is not None for s in steps):
        return _lstm_loop(steps, h, c, w_hh, b_hh, w_hr, reverse)  # the per-step rules will complain
    if w_hr is not None or not steps or not torch.is_grad_enabled():
        return _lstm_loop(steps, h, c, w_hh, b_hh, w_hr, reverse)
    engine.check_input(h, "_lstm_direction", [s for s in (ws, bs) if s is not None], features=1,
                       paired=True)  # the state's rows go with the steps' rows
    xp = torch.stack(steps, 0)
    if b_hh is not None:
        xp = xp + engine.base(b_hh)  # out of place: xp carries the steps' graph
    anchor = engine.anchor(xp)
    ys, h_last, c_last = _LSTMDirection.apply(xp, h, c, anchor, engine.base(w_hh), reverse, (engine, ws, bs))
    return list(ys.unbind(0)), h_last, c_last


# -- GRU ------------------------------------------------------------------------------------

# NOTE [fused GRU direction]
# The same idea as NOTE [fused LSTM direction], for nn.GRU's maths (gate order r, z, n;
# b_hn inside the reset product): with gi the input projection (incl. b_ih) and
# gh = h W_hh^T + b_hh,
#   r, z = sigmoid(gi_rz + gh_rz),  n = tanh(gi_n + r gh_n),  h' = n + z (h - n).
# Backward, with dh the gradient at h' and everything but dh precomputed for the whole
# sequence (A = (1 - z)(1 - n^2), Z = (h - n) z (1 - z), C = gh_n r (1 - r)):
#   dgi_n = dh A,  dgh_z = dgi_z = dh Z,  dgh_r = dgi_r = dgi_n C,  dgh_n = dgi_n r,
#   dh_prev = dh z + dgh @ W_hh.
# dgh (T, B, 3H) is the gradient at F.linear(h, W_hh, b_hh)'s output, so W_hh's
# per-example gradient is one batched matmul with the previous hidden states and b_hh's
# is dgh summed over time; dgi flows on to W_ih's F.linear rule.


class _GRUDirection(torch.autograd.Function):
    """``(Y, h_T)`` of one GRU direction over gate inputs ``xp`` (T, B, 3H) (with b_ih)."""

    @staticmethod
    def forward(ctx: Any, xp: torch.Tensor, h0: torch.Tensor, anchor: torch.Tensor,
                w_hh: torch.Tensor, b_hh: torch.Tensor | None, reverse: bool,
                sink: Any) -> tuple[torch.Tensor, torch.Tensor]:
        with torch._C.DisableTorchFunction():
            return _gru_forward(ctx, xp, h0, w_hh, b_hh, reverse, sink)

    @staticmethod
    def backward(ctx: Any, dy: torch.Tensor, dh_last: torch.Tensor) -> tuple[Any, ...]:
        with torch._C.DisableTorchFunction():
            return _gru_backward(ctx, dy, dh_last)


def _gru_forward(ctx: Any, xp: torch.Tensor, h0: torch.Tensor, w_hh: torch.Tensor,
                 b_hh: torch.Tensor | None, reverse: bool, sink: Any
                 ) -> tuple[torch.Tensor, torch.Tensor]:
    T, B, G = xp.shape
    H = G // 3
    wt = w_hh.t()
    hs = xp.new_empty(T + 1, B, H)  # the state before t is hs[t + shift] (see the LSTM)
    gh, rz, n = xp.new_empty(T, B, G), xp.new_empty(T, B, 2 * H), xp.new_empty(T, B, H)
    shift = 1 if reverse else 0
    hs[T if reverse else 0] = h0
    h_l, x_l, gh_l, rz_l, n_l = hs.unbind(0), xp.unbind(0), gh.unbind(0), rz.unbind(0), n.unbind(0)
    for t in (range(T - 1, -1, -1) if reverse else range(T)):
        h = h_l[t + shift]
        g = torch.mm(h, wt, out=gh_l[t]) if b_hh is None else torch.addmm(b_hh, h, wt, out=gh_l[t])
        r, z = torch.add(x_l[t][:, :2 * H], g[:, :2 * H], out=rz_l[t]).sigmoid_().chunk(2, 1)
        nt = torch.addcmul(x_l[t][:, 2 * H:], r, g[:, 2 * H:], out=n_l[t]).tanh_()
        torch.lerp(nt, h, z, out=h_l[t + 1 - shift])
    ctx.save_for_backward(w_hh, hs, gh, rz, n)
    ctx.reverse, ctx.sink = reverse, sink
    last = 0 if reverse else T
    return (hs[:T] if reverse else hs[1:]), hs[last].clone()


def _gru_backward(ctx: Any, dy: torch.Tensor, dh_last: torch.Tensor) -> tuple[Any, ...]:
    w_hh, hs, gh, rz, n = ctx.saved_tensors
    reverse = ctx.reverse
    T, B, G = gh.shape
    H = G // 3
    shift = 1 if reverse else 0
    h_prev = hs[shift:T + shift]
    r, z = rz[..., :H], rz[..., H:]
    # NOTE [fused GRU direction]: everything but dh, for the whole sequence at once.
    a_n = (1 - z) * (1 - n * n)
    a_z = (h_prev - n) * z * (1 - z)
    a_r = gh[..., 2 * H:] * r * (1 - r)
    dgh, dgi_n = gh.new_empty(T, B, G), gh.new_empty(T, B, H)
    dgh_l, dn_l = dgh.unbind(0), dgi_n.unbind(0)
    an_l, az_l, ar_l, r_l, z_l, dy_l = (t.unbind(0) for t in (a_n, a_z, a_r, r, z, dy))
    order = list(range(T)) if reverse else list(range(T - 1, -1, -1))
    dh = dh_last + dy_l[order[0]]
    for k, t in enumerate(order):
        d = dgh_l[t]
        dn = torch.mul(dh, an_l[t], out=dn_l[t])
        torch.mul(dh, az_l[t], out=d[:, H:2 * H])
        torch.mul(dn, ar_l[t], out=d[:, :H])
        torch.mul(dn, r_l[t], out=d[:, 2 * H:])
        nxt = torch.addcmul(dy_l[order[k + 1]], dh, z_l[t]) if k + 1 < T else dh * z_l[t]
        dh = torch.addmm(nxt, d, w_hh)
    engine, w_slot, b_slot = ctx.sink
    by_batch = dgh.transpose(0, 1)  # (B, T, 3H) view
    if w_slot is not None:
        engine.add("outer", w_slot, h_prev.transpose(0, 1).unsqueeze(1), by_batch.unsqueeze(1))
    if b_slot is not None:
        engine.add("sum", b_slot, by_batch)
    dgi = torch.cat([dgh[..., :2 * H], dgi_n], 2)
    return dgi, dh, None, None, None, None, None


def gru_update(n: torch.Tensor, h: torch.Tensor, z: torch.Tensor) -> torch.Tensor:
    """A GRU step's new state ``(1 - z) * n + z * h`` (one ``lerp``). Under autocast ``n``
    and ``z`` come out of bfloat16 linear layers while ``h`` may be float32, and ``lerp``
    refuses mixed dtypes (it raised in the engine's per-step loop and under vmap), so
    they are cast to the promoted dtype first. Without autocast nothing is cast."""
    if n.dtype != h.dtype or z.dtype != h.dtype:
        dtype = torch.promote_types(torch.promote_types(n.dtype, h.dtype), z.dtype)
        n, h, z = n.to(dtype), h.to(dtype), z.to(dtype)
    return torch.lerp(n, h, z)


def _gru_loop(proj: torch.Tensor, h: torch.Tensor, w_hh: Any, b_hh: Any, reverse: bool
              ) -> tuple[list[torch.Tensor], torch.Tensor]:
    """The unfused direction: per-step ``F.linear`` calls, each seen by the linear rule."""
    H = h.shape[-1]
    gi_rz, gi_n = proj.split([2 * H, H], -1)
    steps = list(zip(gi_rz.unbind(1), gi_n.unbind(1), strict=True))
    outs = []
    for x_rz, x_n in reversed(steps) if reverse else steps:
        gh_rz, gh_n = F.linear(h, w_hh, b_hh).split([2 * H, H], -1)
        r, z = torch.sigmoid(x_rz + gh_rz).chunk(2, -1)
        h = gru_update(torch.tanh(torch.addcmul(x_n, r, gh_n)), h, z)
        outs.append(h)
    if reverse:
        outs.reverse()
    return outs, h


def gru_direction_rule(engine: Engine, args: Any, kwargs: dict[str, Any]) -> Any:
    """Rule for ``fp.nn``'s ``_gru_direction(proj, h, w_hh, b_hh, reverse)``: ``proj`` are
    the input projections ``(B, T, 3H)`` (batch first), ``h`` the initial state ``(B, H)``;
    returns ``(outputs per step, h_T)``. See NOTE [fused GRU direction]."""
    names = ("proj", "h", "w_hh", "b_hh", "reverse")
    bound = dict(zip(names, args, strict=False))
    bound.update(kwargs)
    proj, h, w_hh, b_hh = (bound[n] for n in names[:4])
    reverse = bound.get("reverse", False)
    ws, bs = engine.slot(w_hh), engine.slot(b_hh)
    if engine.slot(h) is not None or engine.slot(proj) is not None or ws is None \
            or not torch.is_grad_enabled() or autocast_on(proj.device.type):
        # the per-step rules handle (or refuse) it; under autocast the fused kernel's
        # buffers would mix dtypes, while the per-step F.linear rules follow autocast
        return _gru_loop(proj, h, w_hh, b_hh, reverse)
    engine.check_input(h, "_gru_direction", [s for s in (ws, bs) if s is not None], features=1,
                       paired=True)  # the state's rows go with the steps' rows
    xp = proj.transpose(0, 1)
    anchor = engine.anchor(xp)
    ys, h_last = _GRUDirection.apply(xp, h, anchor, engine.base(w_hh), engine.base(b_hh), reverse,
                                     (engine, ws, bs))
    return list(ys.unbind(0)), h_last

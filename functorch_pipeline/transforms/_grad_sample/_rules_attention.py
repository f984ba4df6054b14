"""A per-sample rule for ``F.multi_head_attention_forward`` (``nn.MultiheadAttention``).

# NOTE [attention through the linear rule]
``F.multi_head_attention_forward`` takes its inputs sequence-first ``(L, N, E)`` (the
module transposes ``batch_first`` inputs before calling it) and uses ``in_proj_weight``
through slices (``w.split``) and ``bias_k``/``bias_v`` through ``repeat``. The rule
re-computes the same function batch-first, so that every use of a weight is an
``F.linear`` on an input with the examples on axis 0, which the linear rule handles:

* the packed input projection is one ``F.linear`` with the *whole* ``in_proj_weight``
  (self-attention: split into q, k, v afterwards; cross-attention: each of query, key,
  value is projected with the whole weight and the unused blocks are dropped, whose
  gradient is zero);
* a parameter used by broadcasting over the batch (``in_proj_bias`` with separate
  projection weights, ``bias_k``, ``bias_v``) is expanded to one copy per example, and the
  gradient at that expanded tensor is each example's gradient (``_per_example``);
* the attention itself (masks, softmax, dropout, ``scaled_dot_product_attention``) uses no
  parameter and runs as PyTorch's code does, from the same mask helpers.

The result equals PyTorch's to rounding (the matmuls are split differently). A batch
axis of ``m * B`` rows (augmentations or crops of each example merged into it) is taken
once the engine's check has shown ``m`` consecutive rows per example (NOTE [examples
merged into axis 0] in ``_engine``); the expanded copies then have one row per query row,
and the engine sums each example's. ``static_k``/``static_v`` are not supported
(``Unsupported``: the caller falls back).
"""

from __future__ import annotations

import inspect
import math
from typing import Any

import torch
import torch.nn.functional as F

from functorch_pipeline.transforms._grad_sample._engine import Engine
from functorch_pipeline.transforms._grad_sample._engine import Unsupported
from functorch_pipeline.transforms._grad_sample._rules import register_rule

__all__: list[str] = []

_SIGNATURE = inspect.signature(F.multi_head_attention_forward)
_WEIGHTS = ("in_proj_weight", "in_proj_bias", "bias_k", "bias_v", "out_proj_weight",
            "out_proj_bias", "q_proj_weight", "k_proj_weight", "v_proj_weight")


def _finish_direct(engine: Engine, g: torch.Tensor, slot: int) -> None:
    engine.add("direct", slot, g)


def _per_example(engine: Engine, t: Any, n: int) -> Any:
    """``t`` expanded to ``(n, *t.shape)`` for a query with ``n`` rows (``B``, or ``m`` per
    example: NOTE [examples merged into axis 0]); a tracked ``t`` records the expanded
    tensor, whose gradient row ``r`` is its row's example's (NOTE [attention through the
    linear rule])."""
    slot = engine.slot(t)
    if slot is None:
        return t.expand(n, *t.shape)
    leaf = engine.bases[slot].detach().requires_grad_()
    out = leaf.expand(n, *leaf.shape)
    engine.record(out, _finish_direct, slot)
    return out


def _pad_mask(mask: torch.Tensor | None) -> torch.Tensor | None:
    return None if mask is None else F.pad(mask, (0, 1))


def _mha(engine: Engine, args: Any, kwargs: dict[str, Any]) -> Any:
    a = _SIGNATURE.bind(*args, **kwargs)
    a.apply_defaults()
    a = a.arguments
    for name in ("query", "key", "value", "key_padding_mask", "attn_mask", "static_k", "static_v"):
        if engine.slot(a[name]) is not None:
            raise Unsupported(f"{engine.name(engine.slot(a[name]))} is used as `{name}` of "
                              "`F.multi_head_attention_forward`")
    slots = [s for s in (engine.slot(a[n]) for n in _WEIGHTS) if s is not None]
    if a["static_k"] is not None or a["static_v"] is not None:
        raise Unsupported(f"{', '.join(engine.name(s) for s in slots)} are used by "
                          "`F.multi_head_attention_forward` with static_k/static_v, which has "
                          "no per-sample gradient rule")
    query, key, value = a["query"], a["key"], a["value"]
    H, E_check = a["num_heads"], a["embed_dim_to_check"]
    kpm, attn_mask, is_causal = a["key_padding_mask"], a["attn_mask"], a["is_causal"]
    is_batched = F._mha_shape_check(query, key, value, kpm, attn_mask, H)
    if not is_batched:
        query, key, value = query.unsqueeze(1), key.unsqueeze(1), value.unsqueeze(1)
        if kpm is not None:
            kpm = kpm.unsqueeze(0)
    L, N, E = query.shape
    if N != engine.batch_size:  # m rows per example, or refused: NOTE [examples merged ...]
        engine.check_input(query.transpose(0, 1), "F.multi_head_attention_forward", slots,
                           features=2)
    if E != E_check:
        raise AssertionError(f"was expecting embedding dimension of {E_check}, but got {E}")
    kpm = F._canonical_mask(mask=kpm, mask_name="key_padding_mask",
                            other_type=F._none_or_dtype(attn_mask), other_name="attn_mask",
                            target_type=query.dtype)
    if is_causal and attn_mask is None:
        raise RuntimeError("Need attn_mask if specifying the is_causal hint. You may use the "
                           "Transformer module method `generate_square_subsequent_mask` to "
                           "create this mask.")
    if is_causal and kpm is None and not a["need_weights"]:
        attn_mask = None
    else:
        attn_mask = F._canonical_mask(mask=attn_mask, mask_name="attn_mask", other_type=None,
                                      other_name="", target_type=query.dtype, check_other=False)
        if kpm is not None:
            is_causal = False
    D = E // H
    if D * H != E:
        raise AssertionError(f"embed_dim {E} not divisible by num_heads {H}")

    qb, kb, vb = query.transpose(0, 1), key.transpose(0, 1), value.transpose(0, 1)
    w, b = a["in_proj_weight"], a["in_proj_bias"]
    if not a["use_separate_proj_weight"]:
        if w is None:
            raise AssertionError("use_separate_proj_weight is False but in_proj_weight is None")
        if query is key and key is value:
            q, k, v = F.linear(qb, w, b).chunk(3, -1)
        elif key is value:
            q = F.linear(qb, w, b)[..., :E]
            k, v = F.linear(kb, w, b)[..., E:].chunk(2, -1)
        else:
            q = F.linear(qb, w, b)[..., :E]
            k = F.linear(kb, w, b)[..., E:2 * E]
            v = F.linear(vb, w, b)[..., 2 * E:]
    else:
        q, k, v = (F.linear(x, a[f"{n}_proj_weight"]) for x, n in ((qb, "q"), (kb, "k"), (vb, "v")))
        if b is not None:
            bq, bk, bv = _per_example(engine, b, N).unsqueeze(1).chunk(3, -1)
            q, k, v = q + bq, k + bk, v + bv
    if a["bias_k"] is not None and a["bias_v"] is not None:
        k = torch.cat([k, _per_example(engine, a["bias_k"], N).reshape(N, 1, E)], 1)
        v = torch.cat([v, _per_example(engine, a["bias_v"], N).reshape(N, 1, E)], 1)
        attn_mask, kpm = _pad_mask(attn_mask), _pad_mask(kpm)
    elif a["bias_k"] is not None or a["bias_v"] is not None:
        raise AssertionError("bias_k and bias_v must be both set or both None")
    q = q.reshape(N, L, H, D).transpose(1, 2)
    k = k.reshape(N, k.shape[1], H, D).transpose(1, 2)
    v = v.reshape(N, v.shape[1], H, D).transpose(1, 2)
    if a["add_zero_attn"]:
        k = torch.cat([k, k.new_zeros(N, H, 1, D)], 2)
        v = torch.cat([v, v.new_zeros(N, H, 1, D)], 2)
        attn_mask, kpm = _pad_mask(attn_mask), _pad_mask(kpm)
    S = k.shape[2]
    if attn_mask is not None:
        if attn_mask.dim() == 2:
            attn_mask = attn_mask.reshape(1, 1, L, S)
        elif attn_mask.dim() == 3:
            attn_mask = attn_mask.reshape(N, H, L, S)
        else:
            raise RuntimeError(f"attn_mask's dimension {attn_mask.dim()} is not supported")
    if kpm is not None:
        kpm = kpm.reshape(N, 1, 1, S)
        attn_mask = kpm if attn_mask is None else attn_mask + kpm
    dropout_p = a["dropout_p"] if a["training"] else 0.0
    weights = None
    if a["need_weights"]:
        scores = (q * math.sqrt(1.0 / D)) @ k.transpose(-2, -1)
        if attn_mask is not None:
            scores = scores + attn_mask
        weights = torch.softmax(scores, dim=-1)
        if dropout_p > 0.0:
            weights = F.dropout(weights, p=dropout_p)
        out = weights @ v
    else:
        out = F.scaled_dot_product_attention(q, k, v, attn_mask, dropout_p, is_causal)
    out = F.linear(out.transpose(1, 2).reshape(N, L, E), a["out_proj_weight"], a["out_proj_bias"])
    out = out.transpose(0, 1)
    if weights is not None and a["average_attn_weights"]:
        weights = weights.mean(dim=1)
    if not is_batched:
        out = out.squeeze(1)
        weights = None if weights is None else weights.squeeze(0)
    return out, weights


register_rule(F.multi_head_attention_forward, _mha)

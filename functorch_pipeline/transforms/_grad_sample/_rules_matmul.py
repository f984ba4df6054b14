"""Per-sample rules for a parameter in a product: ``x @ w``, ``w @ x``, ``torch.einsum``,
``torch.tensordot`` and ``F.bilinear``.

# NOTE [x @ w]
Functional code written the JAX way (``x @ params["w"] + params["b"]``, ``jnp.dot``
ported to ``torch.matmul``) applies a weight ``w`` of shape ``(in, out)`` (or a vector
``(in,)``) to a batched ``x`` of shape ``(B, ..., in)``: ``F.linear(x, w.T)``, with every
leading axis but the examples' a position. So the rule is the Linear rule's, with the
examples found the same way (axis 0, or axis 1 of a sequence-first input, NOTE [which
axis is the batch]); example ``b``'s gradient is ``sum_n x_bn g_bn^T``, ``(in, out)``,
which is the ``"outer"`` kind of part with its two factors in the other order
(``_rules``: the part ``(a, b)`` gives ``sum_n b_n a_n^T`` in the parameter's layout).
Ghost clipping takes it as it takes a Linear weight. A parameter on the left, ``w @ x``
with ``x`` of shape ``(B, ..., in, n)``, is a Linear applied to each of the ``n`` columns:
the same part with both factors transposed; ``x @ w.T`` (PyTorch's ``(out, in)`` layout)
is ``F.linear(x, w)`` and runs as that, rather than through a derived weight, whose
per-example gradients ghost clipping would have to form (398 against 3.7 ms for the
clipped sum of a 784-512-10 MLP at B = 256); a two-axis ``x`` of shape ``(in, B)`` holds
the examples as its columns (``W @ X`` in column-vector notation), checked as ``x.T``'s
axis 0. A ``w`` with leading axes of size 1 (``x @ w[None]``) is that matrix broadcast,
and runs as it. Two batched operands, a parameter of more than two axes (but NOTE [a
matrix per position]) and ``out=`` are refused.

# NOTE [einsum]
``torch.einsum(eq, x, p)`` of one batched operand and one parameter (either order, the
implicit ``->`` form too), where ``x``'s first index is the examples' axis (``"btd,dh->bth"``,
``"bi,oi->bo"``, JAX code's ``DenseGeneral`` projections ``"btd,dnh->btnh"``): example
``b``'s gradient is ``einsum(x_idx + "," + out_idx + "->" + b + p_idx)`` of its input and
output gradient, every index of ``p`` being one of ``x``'s or the output's. It is formed
per example (a ``"direct"`` part, ``B x p.numel()``), by ghost clipping too: that one
parameter's gradients are formed while every other layer keeps ghost's saving, which
beats handing the whole model to hooks. An einsum that is a Linear in other words (``x``'s
last index contracted with a matrix or vector: ``"bd,dh->bh"``, ``"btd,hd->bth"``) runs as
``x @ w`` or ``F.linear`` instead, whose parts need no per-example gradient. Repeated
indices within an operand, an examples' index in ``p`` or missing from the output, and a
parameter axis that einsum broadcasts (size 1 against the other operand's or the output's
size ``n``, whose gradient is a sum over the ``n``) are refused.

# NOTE [einsum ellipsis]
An equation with ``...`` (``"...i,ij->...j"``, the usual way to write a projection of any
leading axes) is first written out with letters of its own: each operand's ``...`` covers
its axes that the named indices do not, the ellipses of all operands are aligned from the
right (as torch broadcasts them), and each aligned axis gets a letter the equation does not
use. ``...`` in the output becomes all of those letters; an implicit output (no ``->``) is
those letters first, then the indices seen once in alphabetical order, as torch orders it
(``"i...,ij"`` gives ``(..., j)``). The written-out equation is the same einsum, and the
rules above (two operands, or three and more) take it like any other; the examples' axis
is the first letter of the batched operand's ellipsis when it leads (``"...i"`` on
``(B, T, i)``). An output without ``...`` sums the ellipsis axes: across the examples
too, which the two-operand rule refuses as it refuses ``"bi,ij->j"``.

# NOTE [a matrix per position]
``x @ w`` with ``w`` a stack of matrices ``(P, in, out)`` and ``x`` of shape ``(P, N, in)``
applies position ``p``'s matrix to that position's ``N`` rows; MViT's temporal relative
position term (``r_q`` of shape ``(T, B * heads * H * W, dim)`` times a ``(T, dim, T)``
stack looked up from ``rel_pos_t``) holds the examples among the rows, ``m`` consecutive
rows each. It runs as ``einsum("npi,pio->pno", x.transpose(0, 1), w)``, whose batched
operand has the rows first, so the einsum rule takes it, the rows checked as any input
with ``m`` rows per example merged into axis 0 is (NOTE [examples merged into axis 0] in
``_engine``: a padded run shows the layout). An einsum's per-example part over merged rows
sums each example's rows inside the product (``"bm...,...->b..."``) rather than forming
a part per row first (9,408 rows of a ``(8, 96, 8)`` stack: 460 MB in float64).

# NOTE [einsum of three or more operands]
An einsum of more operands (a quadratic form ``"bi,ij,bj->b"``, two weights
``"bi,ij,jk->bk"``) is the product of its operands taken two at a time: the first
parameter with the first operand that is not a parameter, keeping the indices that the
other operands or the output still use (the examples' first), then that product with the
rest, each an einsum of its own, so each parameter meets a batched operand in a call the
rule above takes. ``torch.tensordot(a, b, dims)`` is an einsum too and runs as one.

# NOTE [fused products]
``torch.addmm(b, x, w, beta=, alpha=)`` is ``beta * b + alpha * (x @ w)``: Hugging Face's
``Conv1D`` (GPT-2's attention and MLP projections) applies its ``(in, out)`` weight and
bias that way to the tokens flattened into rows, ``x.view(-1, in)``, which are the
examples merged into axis 0 (NOTE [examples merged into axis 0] in ``_engine``).
``torch.mm``, ``torch.mv``, ``torch.addmv`` and ``torch.baddbmm`` are the same products
in other shapes. Each runs as ``x @ w``, then ``* alpha``, then ``+ beta * b``, so each
parameter meets the batch in a call that has a rule (NOTE [x @ w], NOTE [broadcast
parameters]) and is checked there, in the same way as in the user's unfused code. The
result equals the fused kernel's to rounding (the sum is not fused); ``out=`` is refused.
"""

from __future__ import annotations

import string
from typing import Any

import torch
import torch.nn.functional as F

from functorch_pipeline.transforms._grad_sample._engine import Engine
from functorch_pipeline.transforms._grad_sample._engine import Unsupported
from functorch_pipeline.transforms._grad_sample._rules import _get
from functorch_pipeline.transforms._grad_sample._rules import _no_graph
from functorch_pipeline.transforms._grad_sample._rules import register_rule

__all__ = ["FUSED", "MATMUL"]

_T = torch.Tensor
MATMUL = (torch.matmul, _T.matmul, _T.__matmul__, _T.__rmatmul__)  # ghost-ready parts


def _matmul(reflected: bool) -> Any:
    def rule(engine: Engine, args: Any, kwargs: dict[str, Any]) -> torch.Tensor:
        if len(args) != 2 or kwargs:
            raise Unsupported(f"{engine.names(args, kwargs)} is used by `x @ w` with arguments "
                              "its rule does not take")
        a, b = (args[1], args[0]) if reflected else args  # the product is a @ b
        sa, sb = engine.slot(a), engine.slot(b)
        left = sa is not None  # w @ x
        ws, x = (sa, b) if left else (sb, a)
        name = "w @ x" if left else "x @ w"
        parent = None if left else engine.transposed_from(ws)
        if parent is not None:  # x @ w.T is F.linear(x, w): its parts, not a derived weight's
            return F.linear(x, engine.track(parent))
        wp = engine.bases[ws]
        if wp.dim() in (1, 2) and isinstance(x, torch.Tensor) and x.dim() < 2:
            # A constant vector (spectral norm's ``W @ v``): a derived tensor.
            def refuse() -> int:
                raise Unsupported(f"{engine.name(ws)} is used by `{name}` on a vector of shape "
                                  f"{tuple(x.shape)}, which is not a constant of loss_fn")

            engine.examples_axis(x, refuse, f"`{name}` on {engine.name(ws)}")
            return engine.derive_op(torch.matmul, (a, b), {})
        if (not left and wp.dim() == 3 and isinstance(x, torch.Tensor) and x.dim() == 3
                and x.shape[0] == wp.shape[0]):
            # A stack of matrices, one per position, each applied to that position's rows:
            # the examples among the rows (NOTE [a matrix per position]).
            return torch.einsum("npi,pio->pno", x.transpose(0, 1), b)
        if (wp.dim() >= 3 and all(n == 1 for n in wp.shape[:-2]) and isinstance(x, torch.Tensor)
                and x.dim() >= wp.dim()):
            # A matrix with leading axes of size 1 (``x @ w[None]``), not one per position:
            # broadcast, the same product as with the matrix itself.
            w2 = (a if left else b).reshape(wp.shape[-2:])
            return torch.matmul(w2, x) if left else torch.matmul(x, w2)
        if wp.dim() not in (1, 2) or not isinstance(x, torch.Tensor) or x.dim() < 2:
            raise Unsupported(
                f"{engine.name(ws)} of shape {tuple(wp.shape)} is used by `{name}` on an input "
                f"of shape {tuple(getattr(x, 'shape', ()))}; its rule takes a matrix or "
                "vector `w` and a batched `x` of at least 2 axes, or a stack of matrices `w` of "
                "shape (P, in, out) and `x` of shape (P, N, in) (NOTE [x @ w])")
        columns = left and x.dim() == 2  # w @ x with examples as the columns of x

        def check() -> int:
            if columns:  # the examples on axis 1: checked as x^T's axis 0 (a Linear's input)
                return engine.check_input(x.mT, name, [ws], features=1)
            return engine.check_input(x, name, [ws], features=1 + left, seq_first=not left)

        # A constant (``base @ matrix_exp(A)`` in parametrizations.orthogonal): NOTE
        # [constants or batch data] in _engine.
        axis = engine.examples_axis(x, check, f"`{name}` on {engine.name(ws)}")
        if axis is None:
            return engine.derive_op(torch.matmul, (a, b), {})
        xin = x.detach().requires_grad_() if _no_graph(x, wp) else x
        out = torch.matmul(wp, xin) if left else torch.matmul(xin, wp)
        engine.record(out, _finish_matmul, x, ws, axis, left, columns)
        return out

    return rule


def _finish_matmul(engine: Engine, g: torch.Tensor, x: torch.Tensor, ws: int,
                   axis: int = 0, left: bool = False, columns: bool = False) -> None:
    if engine.bases[ws].dim() == 1:  # a vector: the product dropped its axis
        g = g.unsqueeze(0 if columns else -2 if left else -1)
    if columns:  # (in, B) and (out, B): example b's column is its only position
        x, g = x.mT.unsqueeze(1), g.mT.unsqueeze(1)
    else:
        if axis:  # NOTE [sequence-first inputs]
            x, g = x.movedim(axis, 0), g.movedim(axis, 0)
        if left:  # w @ x is (x^T @ w^T)^T: positions on the last axis
            x, g = x.mT, g.mT
    B = g.shape[0]
    x, g = x.reshape(B, 1, -1, x.shape[-1]), g.reshape(B, 1, -1, g.shape[-1])
    # The part (a, b) gives sum_n b_n a_n^T in the parameter's layout: (in, out) for x @ w,
    # from (g, x); (out, in) for w @ x, from (x^T, g^T), as a Linear's weight.
    engine.add("outer", ws, *((x, g) if left else (g, x)))


def _einsum(engine: Engine, args: Any, kwargs: dict[str, Any]) -> torch.Tensor:
    operands = args[1:]
    if len(operands) == 1 and isinstance(operands[0], (list, tuple)):
        operands = tuple(operands[0])
    eq = args[0].replace(" ", "") if args and isinstance(args[0], str) else None
    if kwargs or eq is None or len(operands) < 2:
        raise Unsupported(f"{engine.names(args, kwargs)} is used by `torch.einsum` with operands "
                          "its rule does not take (NOTE [einsum])")
    if "." in eq:
        eq = _written_out(engine, eq, operands)
    if len(operands) > 2:
        return _einsum_pairwise(engine, eq, operands)
    inputs, _, out_idx = eq.partition("->")
    idx = inputs.split(",")
    if len(idx) != 2:
        raise Unsupported(f"{engine.names(args, kwargs)} is used by `torch.einsum` with "
                          f"equation {eq!r}, which does not name two operands")
    if "->" not in eq:  # implicit output: the indices seen once, in alphabetical order
        out_idx = _implicit_output(inputs)
    slots = [engine.slot(o) for o in operands]
    at = 0 if slots[0] is not None else 1
    slot, x = slots[at], operands[1 - at]
    p_idx, x_idx = idx[at], idx[1 - at]
    p = engine.bases[slot]
    letters = set(string.ascii_letters)
    ok = (isinstance(x, torch.Tensor) and x.dim() >= 1 and len(x_idx) == x.dim()
          and len(p_idx) == p.dim() and all(len(set(t)) == len(t) and set(t) <= letters
                                            for t in (x_idx, p_idx, out_idx)))
    batch = x_idx[0] if ok else ""
    if not ok or batch in p_idx or batch not in out_idx or not set(p_idx) <= set(x_idx + out_idx):
        raise Unsupported(
            f"{engine.name(slot)} is used by `torch.einsum({eq!r})` in a way its rule does not "
            "take: it needs one batched operand whose first index is the examples' and "
            "appears in the output, and a parameter without that index (NOTE [einsum])")
    for c, n in zip(p_idx, p.shape, strict=True):
        if c in x_idx and x.shape[x_idx.index(c)] != n:
            raise Unsupported(
                f"{engine.name(slot)} is used by `torch.einsum({eq!r})`, which broadcasts its "
                f"index {c!r} (size {n} against {x.shape[x_idx.index(c)]}): its gradient would "
                "be a sum over that axis, which the rule does not form (NOTE [einsum])")
    c, rest = x_idx[-1], x_idx[:-1]
    if (len(x_idx) >= 2 and c not in out_idx and len(p_idx) <= 2 and c in p_idx
            and out_idx == rest + p_idx.replace(c, "")):
        # A Linear in einsum's words ("bd,dh->bh", "btd,hd->bth", "bd,d->b"): the product
        # rules take it with their cheaper parts (ghost without per-example gradients).
        if p_idx[0] == c:
            return torch.matmul(x, operands[at])
        return F.linear(x, operands[at])
    axis = engine.examples_axis(
        x, lambda: engine.check_input(x, "torch.einsum", [slot], min_dim=1, features=x.dim() - 1),
        f"`torch.einsum` on {engine.name(slot)}")
    if axis is None:  # a constant: NOTE [constants or batch data] in _engine
        return engine.derive_op(torch.einsum, (f"{idx[0]},{idx[1]}->{out_idx}", *operands), {})
    xin = x.detach().requires_grad_() if _no_graph(x, p) else x
    out = torch.einsum(f"{idx[0]},{idx[1]}->{out_idx}", *((p, xin) if at == 0 else (xin, p)))
    engine.record(out, _finish_einsum, x, slot, f"{x_idx},{out_idx}->{batch}{p_idx}")
    return out


def _finish_einsum(engine: Engine, g: torch.Tensor, x: torch.Tensor, slot: int, eq: str) -> None:
    B, n = engine.batch_size, x.shape[0]
    if n != B and n % B == 0:  # m rows per example: summed inside the product, not after it
        inputs, _, out = eq.partition("->")
        x_idx, g_idx = inputs.split(",")
        batch, rows = out[0], next(c for c in string.ascii_letters if c not in eq)
        at = g_idx.index(batch)
        x = x.reshape(B, n // B, *x.shape[1:])
        g = g.reshape(*g.shape[:at], B, n // B, *g.shape[at + 1:])
        eq = f"{batch}{rows}{x_idx[1:]},{g_idx[:at + 1]}{rows}{g_idx[at + 1:]}->{out}"
    engine.add("direct", slot, torch.einsum(eq, x, g))


def _written_out(engine: Engine, eq: str, operands: tuple[Any, ...]) -> str:
    """``eq`` with its ellipses written out as letters of their own (NOTE [einsum ellipsis])."""
    inputs, arrow, out = eq.partition("->")
    terms = inputs.split(",")
    free = [c for c in string.ascii_letters if c not in eq]
    spans = []
    for t, o in zip(terms, operands, strict=False):
        named = t.replace("...", "")
        spans.append(o.dim() - len(named) if "..." in t and isinstance(o, torch.Tensor) else 0)
    width = max(spans, default=0)
    if (len(terms) != len(operands) or any(t.count("...") > 1 or "." in t.replace("...", "")
                                           for t in (*terms, out))
            or min(spans) < 0 or width > len(free)
            or not all(isinstance(o, torch.Tensor) for o in operands)):
        raise Unsupported(f"{engine.names((eq, *operands), {})} is used by `torch.einsum({eq!r})`, "
                          "whose ellipses do not match its operands' shapes (NOTE [einsum ellipsis])")
    letters = "".join(free[:width])
    new = [t.replace("...", letters[width - n:]) for t, n in zip(terms, spans, strict=True)]
    written = out.replace("...", letters) if arrow else letters + _implicit_output(inputs)
    return ",".join(new) + "->" + written


def _implicit_output(inputs: str) -> str:
    """einsum's output without ``->``: the indices seen once, in alphabetical order."""
    return "".join(sorted(c for c in set(inputs) if inputs.count(c) == 1 and c.isalpha()))


def _einsum_pairwise(engine: Engine, eq: str, operands: tuple[Any, ...]) -> torch.Tensor:
    """NOTE [einsum of three or more operands]: the first parameter contracted with the
    first operand that is not one, then the rest, each product an einsum of its own."""
    inputs, arrow, out_idx = eq.partition("->")
    idx = inputs.split(",")
    if len(idx) != len(operands):
        raise Unsupported(f"{engine.names((eq, *operands), {})} is used by `torch.einsum({eq!r})`, "
                          f"whose equation does not name its {len(operands)} operands")
    if not arrow:
        out_idx = _implicit_output(inputs)
    slots = [engine.slot(o) for o in operands]
    params = [i for i, s in enumerate(slots) if s is not None]
    others = [i for i, s in enumerate(slots) if s is None]
    if not others:
        raise Unsupported(f"{engine.names((eq, *operands), {})} are the only operands of "
                          f"`torch.einsum({eq!r})`: no batched operand")
    x, p = others[0], params[0]
    rest = [i for i in range(len(operands)) if i not in (x, p)]
    needed = set(out_idx).union(*(idx[i] for i in rest))
    kept = [c for c in dict.fromkeys(idx[x] + idx[p]) if c in needed]
    if idx[x] and idx[x][0] in kept:  # the examples' index stays first
        kept.remove(idx[x][0])
        kept.insert(0, idx[x][0])
    inter = "".join(kept)
    pair = torch.einsum(f"{idx[x]},{idx[p]}->{inter}", operands[x], operands[p])
    return torch.einsum(",".join([inter, *(idx[i] for i in rest)]) + "->" + out_idx,
                        pair, *(operands[i] for i in rest))


def _tensordot(engine: Engine, args: Any, kwargs: dict[str, Any]) -> torch.Tensor:
    """``torch.tensordot(a, b, dims)`` as the einsum it is (NOTE [einsum of three or more
    operands])."""
    a, b = _get(args, kwargs, 0, "a"), _get(args, kwargs, 1, "b")
    dims = _get(args, kwargs, 2, "dims", 2)
    if kwargs.get("out") is not None or not (isinstance(a, torch.Tensor) and isinstance(b, torch.Tensor)):
        raise Unsupported(f"{engine.names(args, kwargs)} is used by `torch.tensordot` with "
                          "arguments its rule does not take (out=, or a non-tensor operand)")
    if isinstance(dims, torch.Tensor):
        dims = dims.tolist()
    if isinstance(dims, int):
        da, db = list(range(a.dim() - dims, a.dim())), list(range(dims))
    else:
        da, db = ([d] if isinstance(d, int) else list(d) for d in dims)
    da = [d % a.dim() for d in da] if a.dim() else da
    db = [d % b.dim() for d in db] if b.dim() else db
    if a.dim() + b.dim() > len(string.ascii_letters) or len(da) != len(db):
        raise Unsupported(f"{engine.names(args, kwargs)} is used by `torch.tensordot` with "
                          "dims its rule does not take")
    letters = iter(string.ascii_letters)
    sa = [next(letters) for _ in range(a.dim())]
    sb = [next(letters) for _ in range(b.dim())]
    for i, j in zip(da, db, strict=True):
        sb[j] = sa[i]
    out = [c for i, c in enumerate(sa) if i not in da] + [c for j, c in enumerate(sb) if j not in db]
    return torch.einsum(f"{''.join(sa)},{''.join(sb)}->{''.join(out)}", a, b)


register_rule(torch.einsum, _einsum)
register_rule(torch.tensordot, _tensordot)


def _bilinear(engine: Engine, args: Any, kwargs: dict[str, Any]) -> torch.Tensor:
    """``F.bilinear(x1, x2, w, b)`` (``nn.Bilinear``): ``out_o = x1^T w_o x2 + b_o`` with
    both inputs batched on axis 0; example ``b``'s weight gradient is
    ``sum_n g_bno x1_bni x2_bnj`` over its positions ``n``, formed per example (a
    ``"direct"`` part, in ghost clipping too: NOTE [einsum])."""
    x1, x2, w, b = (_get(args, kwargs, i, n) for i, n in enumerate(("input1", "input2", "weight", "bias")))
    ws, bs = engine.slot(w), engine.slot(b)
    slots = [s for s in (ws, bs) if s is not None]
    if not slots or engine.slot(x1) is not None or engine.slot(x2) is not None:
        raise Unsupported(f"{engine.names(args, kwargs)} is used as an input of `F.bilinear`")
    for x in (x1, x2):
        engine.check_input(x, "F.bilinear", slots, features=1)
    wp = engine.bases[ws] if ws is not None else w
    bp = engine.bases[bs] if bs is not None else b
    x1in = x1.detach().requires_grad_() if _no_graph(x1, x2, wp, bp) else x1
    out = torch.bilinear(x1in, x2, wp, bp)
    engine.record(out, _finish_bilinear, x1, x2, ws, bs)
    return out


def _finish_bilinear(engine: Engine, g: torch.Tensor, x1: torch.Tensor, x2: torch.Tensor,
                     ws: int | None, bs: int | None) -> None:
    B = g.shape[0]
    g = g.reshape(B, -1, g.shape[-1])
    if ws is not None:
        x1, x2 = x1.reshape(B, -1, x1.shape[-1]), x2.reshape(B, -1, x2.shape[-1])
        engine.add("direct", ws, torch.einsum("bno,bni,bnj->boij", g, x1, x2))
    if bs is not None:
        engine.add("direct", bs, g.sum(1))


def _fused(first: str, second: str) -> Any:
    """The rule of ``func(input, <first>, <second>, beta=1, alpha=1)`` (addmm, addmv,
    baddbmm), or of ``func(input, <second>)`` (mm, mv) when ``first`` is empty: NOTE
    [fused products]."""

    def rule(engine: Engine, args: Any, kwargs: dict[str, Any]) -> torch.Tensor:
        if kwargs.get("out") is not None:
            raise Unsupported(f"{engine.names(args, kwargs)} is used by a product with `out=`")
        if not first:
            return torch.matmul(_get(args, kwargs, 0, "input"), _get(args, kwargs, 1, second))
        b = _get(args, kwargs, 0, "input")
        prod = torch.matmul(_get(args, kwargs, 1, first), _get(args, kwargs, 2, second))
        beta, alpha = _get(args, kwargs, 3, "beta", 1), _get(args, kwargs, 4, "alpha", 1)
        if not isinstance(alpha, (int, float)) or alpha != 1:
            prod = prod * alpha
        if isinstance(beta, (int, float)) and beta == 0:  # b is ignored, NaN or not
            return prod
        bias = b if isinstance(beta, (int, float)) and beta == 1 else b * beta
        B = engine.batch_size
        if (prod.dim() == 2 and prod.shape[0] > B and prod.shape[0] % B == 0
                and not engine.is_tracked(prod)):
            # Rows the matmul's rule took as m per example (NOTE [examples merged into
            # axis 0] in _engine): the bias meets them as (B, m, out), which needs no
            # second proof of that layout (dropout in training mode defeats a padded one).
            return (prod.view(B, -1, prod.shape[1]) + bias).view(prod.shape)
        return prod + bias

    return rule


FUSED = {torch.addmm: ("mat1", "mat2"), _T.addmm: ("mat1", "mat2"), torch.addmv: ("mat", "vec"),
         _T.addmv: ("mat", "vec"), torch.baddbmm: ("batch1", "batch2"),
         _T.baddbmm: ("batch1", "batch2"), torch.mm: ("", "mat2"), _T.mm: ("", "mat2"),
         torch.mv: ("", "vec"), _T.mv: ("", "vec")}

register_rule(torch.bilinear, _bilinear)
for _func, (_first, _second) in FUSED.items():
    register_rule(_func, _fused(_first, _second))

for _func in MATMUL:
    register_rule(_func, _matmul(reflected=_func is _T.__rmatmul__))

"""``custom_jvp``: JAX's decorator for a function with a hand-written forward-mode rule."""

from __future__ import annotations

import functools
from collections.abc import Callable
from typing import Any

import torch
import torch.func
from torch.autograd.forward_ad import _set_fwd_grad_enabled

from functorch_pipeline import tree as _tree
from functorch_pipeline.transforms._custom_vjp import refuse_under_compiled_transform
from functorch_pipeline.transforms._custom_vjp import resolve_kwargs

__all__ = ["custom_jvp"]


class custom_jvp:  # noqa: N801 - JAX's name
    """Give ``f`` a custom forward-mode rule, as ``jax.custom_jvp`` does.

    Register ``jvp(primals, tangents) -> (primal_out, tangent_out)`` with :meth:`defjvp`
    (usable as a decorator). ``primals`` and ``tangents`` are tuples of the (non-static)
    arguments; a tangent is a zero tensor where the input carries none. The rule drives
    ``fp.jvp``/``jacfwd`` and, as in JAX, reverse mode too: the VJP is the transpose of
    the rule's linear map in the tangents (computed with ``torch.func.vjp`` over the
    tangents), so ``fp.grad``, ``loss.backward()`` and ``fp.vmap`` work. The rule must be
    linear in ``tangents`` (JAX requires the same, and refuses to transpose a rule that is
    not). Arguments may be pytrees of tensors; ``nondiff_argnums`` marks static arguments
    (anything), passed first to the rule: ``jvp(*nondiff_args, primals, tangents)``.
    Keyword arguments are resolved to positions with ``f``'s signature, as in JAX (see
    :class:`custom_vjp`).

    ``tangent_out`` must match ``f``'s output in structure, shapes and dtypes; a mismatch
    raises naming the path. Dtypes are checked in forward mode only: reverse mode casts,
    as autograd does, so an AMP backward outside ``torch.autocast`` works.

    Linearity is checked once, at the first plain reverse-mode use (``fp.grad`` at the
    top level, ``loss.backward()``): the rule must give 0 at zero tangents and
    ``rule(-2 t) == -2 rule(t)`` at ``t`` of ones, else it raises. This is stricter than
    JAX for an affine rule (``t + 1``), whose offset JAX drops in reverse mode while its
    forward mode keeps it. Inside ``torch.func`` transforms (``vmap(grad)``) it is not
    checked, and there a non-linear rule's reverse mode silently gives the transpose of
    its linearisation at zero tangents.

    Limitation: under ``torch.compile`` (``fp.jit``), a call inside a ``torch.func``
    transform raises, because torch.compile would silently ignore the rule there (see
    :class:`custom_vjp`).

    Args:
      f: the function.
      nondiff_argnums: positions of the static arguments.

    Examples:
      A numerically safe ``log1p(exp(x))`` whose derivative is ``sigmoid(x)``:

      >>> @custom_jvp
      ... def softplus(x):
      ...     return torch.nn.functional.softplus(x)
      >>> @softplus.defjvp
      ... def _(primals, tangents):
      ...     (x,), (t,) = primals, tangents
      ...     return softplus(x), torch.sigmoid(x) * t
      >>> import functorch_pipeline as fp
      >>> fp.jvp(softplus, (torch.tensor([0.0]),), (torch.tensor([2.0]),))[1]
      tensor([1.])
      >>> fp.grad(lambda x: softplus(x).sum())(torch.tensor([0.0]))
      tensor([0.5000])
    """

    def __init__(self, f: Callable[..., Any], nondiff_argnums: tuple[int, ...] = ()) -> None:
        functools.update_wrapper(self, f)
        self.f = f
        nums = (nondiff_argnums,) if isinstance(nondiff_argnums, int) else tuple(nondiff_argnums)
        if not all(isinstance(i, int) and not isinstance(i, bool) and i >= 0 for i in nums):
            raise TypeError(
                f"custom_jvp(f, nondiff_argnums): `nondiff_argnums` must be non-negative ints, "
                f"got {nondiff_argnums!r}"
            )
        self.nondiff_argnums = tuple(sorted(set(nums)))
        self.jvp: Callable[..., Any] | None = None
        self._function: type[torch.autograd.Function] | None = None
        self._linear_checked = False  # NOTE [custom_jvp linearity check]

    def defjvp(self, jvp: Callable[..., Any]) -> Callable[..., Any]:
        """Register the rule ``jvp(*nondiff_args, primals, tangents) -> (out, tangent_out)``.

        Args:
          jvp: the rule.

        Returns:
          ``jvp`` itself (so this works as a decorator).
        """
        self.jvp = jvp
        self._function = _make_function(getattr(self.f, "__name__", "f"), self)
        return jvp

    def __call__(self, *args: Any, **kwargs: Any) -> Any:
        if kwargs:
            args = resolve_kwargs(self.f, args, kwargs, self._where())
        if self._function is None:
            raise RuntimeError(f"{self._where()}: register a rule with .defjvp(jvp) before using it")
        if self.nondiff_argnums and self.nondiff_argnums[-1] >= len(args):
            raise ValueError(
                f"{self._where()}: `nondiff_argnums` {self.nondiff_argnums} but f was "
                f"called with {len(args)} positional arguments"
            )
        if torch.compiler.is_compiling():
            refuse_under_compiled_transform(self._where())  # NOTE [custom rules under torch.compile]
        static = set(self.nondiff_argnums)
        diff = tuple(a for i, a in enumerate(args) if i not in static)
        leaves, treedef = _tree.flatten(diff)
        spec = _Spec(treedef, tuple(args[i] for i in self.nondiff_argnums))
        flat = self._function.apply(spec, *leaves)
        return _tree.unflatten(spec.out_def, list(flat))

    def _where(self) -> str:
        return f"custom_jvp({getattr(self.f, '__name__', 'f')})"

    def _call_f(self, spec: _Spec, diff: tuple[Any, ...]) -> Any:
        return self.f(*self._merge(spec, diff))

    def _merge(self, spec: _Spec, diff: tuple[Any, ...]) -> list[Any]:
        it = iter(diff)
        static = dict(zip(self.nondiff_argnums, spec.nondiff, strict=True))
        return [static[i] if i in static else next(it) for i in range(len(diff) + len(static))]

    def _rule(
        self, spec: _Spec, primal_leaves: list[Any], tangent_leaves: list[Any], check_dtype: bool = True
    ) -> list[torch.Tensor]:
        """The tangent output's leaves from the user's rule, checked: structure and shapes
        always, dtypes in forward mode (``check_dtype``). Reverse mode only transposes the
        rule, and there a dtype difference is harmless (the cotangent is cast, as autograd
        does): with AMP, a backward outside ``torch.autocast`` runs the rule in float32 for
        a bfloat16 output."""
        assert self.jvp is not None
        primals = _tree.unflatten(spec.in_def, primal_leaves)
        tangents = _tree.unflatten(spec.in_def, tangent_leaves)
        result = self.jvp(*spec.nondiff, tuple(primals), tuple(tangents))
        where = self._where()
        if not (isinstance(result, tuple) and len(result) == 2):
            raise TypeError(
                f"{where}: the jvp rule must return a pair (primal_out, tangent_out), got "
                f"{type(result).__name__}"
            )
        t_leaves, t_def = _tree.flatten(result[1])
        if t_def != spec.out_def:
            raise ValueError(
                f"{where}: tangent_out has structure {t_def} but f's output has {spec.out_def}"
            )
        for k, (t, meta) in enumerate(zip(t_leaves, spec.out_meta, strict=True)):
            if meta is None:  # an integer or non-tensor output: no tangent to check
                continue
            if not (isinstance(t, torch.Tensor) and t.shape == meta[0]
                    and (t.dtype == meta[1] or not check_dtype)):
                got = (f"shape {tuple(t.shape)} and dtype {t.dtype}" if isinstance(t, torch.Tensor)
                       else f"a {type(t).__name__}")
                path = _tree.keystr(_tree.flatten_with_path(result[1])[0][k])
                raise ValueError(
                    f"{where}: the jvp rule's tangent_out must have the shape and dtype of f's "
                    f"output, but at path `{path}` f's output has shape "
                    f"{tuple(meta[0])} and dtype {meta[1]} and tangent_out has {got}"
                )
        return t_leaves

    def _check_linear(self, linear: Callable[..., Any], zeros: list[torch.Tensor],
                      at_zero: tuple[torch.Tensor, ...], spec: _Spec) -> None:
        """Refuse a rule that is not linear in the tangents (see the class docstring).

        # NOTE [custom_jvp linearity check]
        Reverse mode transposes the rule's linearisation at zero tangents, which is the
        rule itself only when the rule is linear; JAX raises while transposing a
        non-linear rule, and ours silently returned 0 for ``3 * t ** 2`` (and dropped
        the offset of ``t + 1``). A linear map gives 0 at 0 and commutes with scaling by
        -2, and in floating point scaling by a power of two is exact, so a linear rule
        passes exactly; ``t ** 2``, ``abs(t)``, ``relu(t)`` and offsets fail. It costs two
        evaluations of the rule, once per custom_jvp, at the first plain eager backward
        (it needs a Python bool, which vmap cannot give).
        """
        self._linear_checked = True
        ones = [torch.ones_like(z) for z in zeros]
        with torch.no_grad():
            at_t = linear(*ones)
            at_m2t = linear(*[-2 * o for o in ones])
        paths = _tree.flatten_with_path(_tree.unflatten(spec.out_def, list(range(len(at_t)))))[0]
        for p, z, a, b, meta in zip(paths, at_zero, at_t, at_m2t, spec.out_meta, strict=True):
            if meta is None:
                continue
            size = a.detach().abs().nan_to_num(nan=0.0, posinf=0.0)  # a NaN derivative is no evidence
            scale = 1e-6 * max(float(size.max()) if a.numel() else 0.0, 1e-30)
            zero_ok = torch.allclose(z.detach().nan_to_num(nan=0.0, posinf=float("inf"),
                                                           neginf=float("-inf")),
                                     torch.zeros_like(z), rtol=0.0, atol=scale)
            if not zero_ok or not torch.allclose(b, -2 * a, rtol=1e-4, atol=scale, equal_nan=True):
                raise ValueError(
                    f"{self._where()}: the jvp rule is not linear in the tangents, so reverse mode "
                    "(fp.grad, fp.vjp, backward), which transposes it, is undefined (JAX "
                    f"refuses too). At output path `{_tree.keystr(p)}` and tangents t of "
                    f"ones: rule(0) = {_short(z)}, rule(t) = {_short(a)}, rule(-2 t) = "
                    f"{_short(b)} (a linear rule gives 0 and -2 rule(t)). Make tangent_out "
                    "linear in the tangents (e.g. `df(x) * t`)."
                )


def _short(x: torch.Tensor) -> str:
    """A tensor's first values, for a message."""
    flat = x.detach().reshape(-1)
    vals = ", ".join(f"{v:.4g}" for v in flat[:4].tolist())
    return f"[{vals}{', ...' if flat.numel() > 4 else ''}]"


class _Spec:
    """Static data handed to the autograd.Function (not a tensor, so not traced)."""

    def __init__(self, in_def: Any, nondiff: tuple[Any, ...]) -> None:
        self.in_def = in_def
        self.nondiff = nondiff
        self.out_def: Any = None
        self.out_meta: list[Any] = []  # (shape, dtype) of each floating output leaf, else None


def _zeros_for(leaves: list[Any], tangents: tuple[Any, ...]) -> list[Any]:
    return [
        torch.zeros_like(x) if t is None and isinstance(x, torch.Tensor) else t
        for x, t in zip(leaves, tangents, strict=True)
    ]


def _outer_forward_rule(owner: custom_jvp, spec: _Spec, leaves: list[Any], tangents: list[Any]) -> list[Any]:
    """The rule's tangent output, differentiable by an outer forward-mode level.

    PyTorch runs an ``autograd.Function``'s jvp rule with forward-mode AD off, so under
    two forward levels (``jacfwd(jacfwd(f))``) the outer one saw the rule as constant in
    the primals: a silent 0. JAX differentiates the rule. When another forward (jvp)
    transform sits below the current one, the rule runs one level lower (the current
    level's wrappers removed) with forward AD on, so the outer levels see it.
    """
    stack = torch._C._functorch.get_interpreter_stack() or []
    jvps = [i for i in stack if i.key() == torch._C._functorch.TransformType.Jvp]
    if len(jvps) < 2 or stack[-1].key() != torch._C._functorch.TransformType.Jvp:
        return owner._rule(spec, leaves, tangents)
    from torch._functorch.pyfunctorch import retrieve_current_functorch_interpreter

    interp = retrieve_current_functorch_interpreter()
    level = interp.level()
    unwrap = torch._C._functorch._unwrap_for_grad
    down = [unwrap(x, level) if isinstance(x, torch.Tensor) else x for x in leaves]
    t_down = [unwrap(x, level) if isinstance(x, torch.Tensor) else x for x in tangents]
    with _set_fwd_grad_enabled(True), interp.lower():
        return owner._rule(spec, down, t_down)


def _make_function(name: str, owner: custom_jvp) -> type[torch.autograd.Function]:
    class _Fn(torch.autograd.Function):
        generate_vmap_rule = True

        @staticmethod
        def forward(spec: _Spec, *leaves: Any) -> tuple[Any, ...]:  # type: ignore[override]
            out = owner._call_f(spec, tuple(_tree.unflatten(spec.in_def, leaves)))
            out_leaves, spec.out_def = _tree.flatten(out)
            spec.out_meta = [(x.shape, x.dtype) if isinstance(x, torch.Tensor)
                             and (x.is_floating_point() or x.is_complex()) else None
                             for x in out_leaves]
            return tuple(x.view_as(x) if isinstance(x, torch.Tensor) else x for x in out_leaves)

        @staticmethod
        def setup_context(ctx: Any, inputs: tuple[Any, ...], output: Any) -> None:
            spec, *leaves = inputs
            ctx.spec = spec
            ctx.is_tensor = [isinstance(x, torch.Tensor) for x in leaves]
            ctx.others = [None if t else x for x, t in zip(leaves, ctx.is_tensor, strict=True)]
            tensors = [x for x, t in zip(leaves, ctx.is_tensor, strict=True) if t]
            ctx.save_for_backward(*tensors)
            ctx.save_for_forward(*tensors)

        @staticmethod
        def _leaves(ctx: Any) -> list[Any]:
            saved = iter(ctx.saved_tensors)
            return [next(saved) if t else o for t, o in zip(ctx.is_tensor, ctx.others, strict=True)]

        @staticmethod
        def jvp(ctx: Any, *tangents: Any) -> Any:
            leaves = _Fn._leaves(ctx)
            # PyTorch runs a jvp rule with forward-mode AD off, which made an outer forward
            # level (jacfwd(jacfwd(f))) see the rule as constant in the primals (0). JAX
            # differentiates the rule: turn forward AD back on for the outer levels.
            out = _outer_forward_rule(owner, ctx.spec, leaves, _zeros_for(leaves, tangents[1:]))  # [0] is spec
            return tuple(out)

        @staticmethod
        def backward(ctx: Any, *grads: Any) -> tuple[Any, ...]:
            # The VJP is the transpose of the rule's linear map in the tangents. When the
            # outer backward builds a graph (grad mode on: create_graph, an outer
            # fp.grad/jacrev level) the primals stay attached, so the rule itself is
            # differentiated for higher orders, as in JAX; otherwise they are detached and
            # the result carries no graph.
            create_graph = torch.is_grad_enabled()
            leaves = _Fn._leaves(ctx)
            if not create_graph:
                leaves = [x.detach() if isinstance(x, torch.Tensor) else x for x in leaves]
            idx = [
                i
                for i, x in enumerate(leaves)
                if isinstance(x, torch.Tensor) and (x.is_floating_point() or x.is_complex())
            ]

            def linear(*ts: torch.Tensor) -> tuple[torch.Tensor, ...]:
                full = [
                    torch.zeros_like(x) if isinstance(x, torch.Tensor) else None for x in leaves
                ]
                for i, t in zip(idx, ts, strict=True):
                    full[i] = t
                return tuple(owner._rule(ctx.spec, leaves, full, check_dtype=False))

            with torch.set_grad_enabled(create_graph):
                zeros = [torch.zeros_like(leaves[i]) for i in idx]
                outs, vjp_fn = torch.func.vjp(linear, *zeros)
                if (not owner._linear_checked and not create_graph
                        and torch._C._functorch.peek_interpreter_stack() is None
                        and not torch.compiler.is_compiling()):
                    owner._check_linear(linear, zeros, outs, ctx.spec)  # NOTE [custom_jvp linearity check]
                cts = tuple(
                    torch.zeros_like(o) if g is None else g
                    for g, o in zip(grads, outs, strict=True)
                )
                in_grads = vjp_fn(cts)
            result: list[Any] = [None] * len(leaves)
            for i, gi in zip(idx, in_grads, strict=True):
                result[i] = gi
            return (None, *result)

    _Fn.__name__ = f"custom_jvp_{name}"
    return _Fn

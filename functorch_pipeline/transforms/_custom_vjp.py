"""``custom_vjp``: JAX's decorator for a function with a hand-written backward pass."""

from __future__ import annotations

import functools
import inspect
from collections.abc import Callable
from typing import Any

import torch
from torch._subclasses.fake_tensor import is_fake

from functorch_pipeline import tree as _tree

__all__ = ["custom_vjp"]


def resolve_kwargs(f: Callable[..., Any], args: tuple[Any, ...], kwargs: dict[str, Any],
                   where: str) -> tuple[Any, ...]:
    """``args`` and ``kwargs`` bound to ``f``'s positional parameters, defaults filled in
    (JAX's ``resolve_kwargs``): the custom rules see positional arguments only."""
    try:
        bound = inspect.signature(f).bind(*args, **kwargs)
    except TypeError as e:
        raise TypeError(f"{where}: the arguments could not be bound to f's parameters: {e}") from None
    except ValueError:  # no signature (a builtin): nothing to bind to
        raise TypeError(f"{where}: keyword arguments {sorted(kwargs)} cannot be resolved to "
                        "positions (f has no inspectable signature); pass them positionally") from None
    bound.apply_defaults()
    if bound.kwargs:
        raise TypeError(f"{where}: keyword arguments {sorted(k for k in bound.kwargs if k in kwargs)} "
                        "could not be resolved to positions (keyword-only parameters of f are not "
                        "supported); make them positional or close over them")
    return bound.args


def refuse_under_compiled_transform(where: str) -> None:
    """Raise while torch.compile traces a call inside a torch.func transform.

    # NOTE [custom rules under torch.compile]
    Dynamo (torch 2.14) inlines an ``autograd.Function`` called inside a ``torch.func``
    transform (``grad``, ``vjp``, ``jvp``, ``jacrev``, ``vmap``) it traces: only its
    ``forward`` is kept, so ``torch.compile(torch.func.grad(f))`` differentiates ``f``
    itself and silently ignores a custom_vjp/custom_jvp rule ([5, 5] instead of the
    clipped [1, 1]), with every backend. Outside a transform Dynamo keeps the rule (it
    traces ``forward`` and ``backward`` together), so ``loss.backward()`` in a compiled
    function is right. ``fp.grad`` under ``fp.jit`` runs ``torch.func.grad_and_value``
    (plain ``torch.autograd.grad`` would break the graph), so such a call is refused here
    with a hard error rather than letting it compute a different gradient; it is read at
    trace time, and costs nothing in eager mode. A ``vmap`` alone with grad mode off
    cannot differentiate anything and is let through.
    """
    if not torch.compiler.is_compiling():
        return
    depth = torch._C._functorch.get_dynamic_layer_stack_depth()
    if depth == 0:
        return
    if depth == 1 and not torch.is_grad_enabled():
        from torch._functorch.pyfunctorch import retrieve_current_functorch_interpreter

        if retrieve_current_functorch_interpreter().key() == torch._C._functorch.TransformType.Vmap:
            return
    msg = (f"{where}: called inside a torch.func transform (fp.grad, fp.value_and_grad, "
           "fp.vjp, fp.jvp, fp.jacrev, fp.vmap, ...) that torch.compile (fp.jit) is tracing. "
           "torch.compile ignores a custom rule there and would differentiate f itself (a "
           "PyTorch limitation), a silently different gradient. Apply the transform outside "
           "the compiled function (compile the function it calls instead), or differentiate "
           "with loss.backward() inside the compiled function, where the rule is kept.")
    with torch._dynamo.error_on_graph_break(True):
        torch._dynamo.graph_break(msg=msg)


class custom_vjp:  # noqa: N801 - JAX's name
    """Give ``f`` a custom reverse-mode rule, as ``jax.custom_vjp`` does.

    Define ``fwd(*args) -> (out, residuals)`` and ``bwd(residuals, g) -> grads`` where
    ``grads`` is a tuple with one entry (a pytree like that argument, or ``None``) per
    positional argument of ``f``, and register them with :meth:`defvjp`. The result works
    with ``loss.backward()``, ``fp.grad`` and ``fp.vmap`` (the batching rule is derived by
    vmapping ``fwd`` and ``bwd``). Arguments and outputs may be pytrees; non-tensor leaves
    pass through and get no gradient. Residual leaves must be tensors or ``None``.

    With ``nondiff_argnums`` (JAX's), the arguments at those positions are static: they
    may be anything (a function, a config, a tensor that gets no gradient); ``fwd`` takes
    all arguments as ``f`` does, ``bwd`` is ``bwd(*nondiff_args, residuals, g)`` and
    returns one gradient per *other* argument. Use it as
    ``functools.partial(custom_vjp, nondiff_argnums=(0,))``.

    Keyword arguments are resolved to positions with ``f``'s signature, as JAX does (its
    defaults are then filled in, so ``fwd`` and ``bwd`` see every positional parameter);
    keyword-only parameters are refused. A call without keywords is passed as given.

    ``f`` itself is never run for its value: ``fwd``'s primal output is returned (JAX
    returns ``f``'s when not differentiating, ``fwd``'s under differentiation). So
    ``fwd``'s primal output must match ``f``'s in structure, shapes and dtypes, and a
    mismatch raises (JAX 0.10 does not check). This is checked once per argument
    signature (shapes, dtypes, static numbers; at most 64 signatures): ``f`` is run on
    fake tensors (:func:`fp.eval_shape`), so Python side effects in ``f`` happen then;
    where ``f`` cannot run on fake tensors (data-dependent control flow) the check is
    skipped. It is not done under ``torch.compile``.

    Limitations:
      - Forward mode (``fp.jvp``, ``jacfwd``, ``hessian`` = ``jacfwd(jacrev)``) is not
        supported, as in JAX, and raises naming this function: use :class:`custom_jvp`
        (whose rule also gives reverse mode) or ``jacrev(jacrev(f))``.
      - Under ``torch.compile`` (``fp.jit``), a call inside a ``torch.func`` transform
        (``fp.grad``, ``fp.vmap`` with grad mode on, ...) raises, because torch.compile
        (2.14) inlines only the forward of a custom function it meets inside a
        ``torch.func`` transform and would silently differentiate ``f`` itself; in a
        compiled function, ``loss.backward()`` keeps the rule.

    Args:
      f: the function.
      nondiff_argnums: positions of the static arguments.

    Examples:
      A gradient clipped to [-1, 1] on the way back:

      >>> @custom_vjp
      ... def clip_grad(x):
      ...     return x
      >>> clip_grad.defvjp(lambda x: (x, None), lambda res, g: (g.clamp(-1, 1),))
      >>> import functorch_pipeline as fp
      >>> fp.grad(lambda x: (clip_grad(x) * 5).sum())(torch.tensor([1.0, 2.0]))
      tensor([1., 1.])

      A static function argument:

      >>> import functools
      >>> @functools.partial(custom_vjp, nondiff_argnums=(0,))
      ... def apply(fn, x):
      ...     return fn(x)
      >>> apply.defvjp(lambda fn, x: (fn(x), x), lambda fn, x, g: (2 * g,))
      >>> fp.grad(lambda x: apply(torch.sin, x).sum())(torch.tensor([0.0]))
      tensor([2.])
    """

    def __init__(self, f: Callable[..., Any], nondiff_argnums: tuple[int, ...] = ()) -> None:
        functools.update_wrapper(self, f)
        self.f = f
        nums = (nondiff_argnums,) if isinstance(nondiff_argnums, int) else tuple(nondiff_argnums)
        if not all(isinstance(i, int) and not isinstance(i, bool) and i >= 0 for i in nums):
            raise TypeError("custom_vjp(f, nondiff_argnums): `nondiff_argnums` must be "
                            f"non-negative ints, got {nondiff_argnums!r}")
        self.nondiff_argnums = tuple(sorted(set(nums)))
        self.fwd: Callable[..., Any] | None = None
        self.bwd: Callable[..., Any] | None = None
        self._function: type[torch.autograd.Function] | None = None
        self._in_fwd = 0
        self._checked: dict[Any, bool] = {}  # argument signatures whose fwd output was checked

    def defvjp(self, fwd: Callable[..., Any], bwd: Callable[..., Any]) -> None:
        """Register the forward (``fwd(*args) -> (out, residuals)``) and backward
        (``bwd(*nondiff_args, residuals, g) -> tuple of grads``) rules.

        Args:
          fwd: the forward rule.
          bwd: the backward rule.
        """
        self.fwd, self.bwd = fwd, bwd
        name = getattr(self.f, "__name__", "f")
        self._function = _make_function(name, self._run_fwd, self._run_bwd, self._check_fwd_output)

    def _merge(self, spec: _Spec, diff_args: tuple[Any, ...]) -> list[Any]:
        it = iter(diff_args)
        static = dict(zip(self.nondiff_argnums, spec.nondiff, strict=True))
        return [static[i] if i in static else next(it) for i in range(spec.nargs + len(static))]

    def _run_fwd(self, spec: _Spec, *args: Any) -> Any:
        # JAX's idiom calls `f` itself inside `fwd`; there it must be the plain function.
        self._in_fwd += 1
        try:
            assert self.fwd is not None
            return self.fwd(*self._merge(spec, args))
        finally:
            self._in_fwd -= 1

    def _check_fwd_output(self, spec: _Spec, leaves: tuple[Any, ...], out: Any) -> None:
        """Compare ``fwd``'s primal output with ``f``'s, found with ``fp.eval_shape``,
        once per argument signature (see the class docstring; ~2 us a call after)."""
        if len(self._checked) >= _MAX_CHECKED:
            return
        key = (spec.in_def, *map(_leaf_key, leaves), *map(_leaf_key, spec.nondiff))
        if key in self._checked:
            return
        if any(isinstance(x, torch.Tensor) and is_fake(x) for x in leaves):
            return  # already inside fp.eval_shape (or another fake mode)
        self._checked[key] = True
        from functorch_pipeline.transforms._eval_shape import ShapeDtypeStruct
        from functorch_pipeline.transforms._eval_shape import eval_shape

        structs = [ShapeDtypeStruct(x.shape, x.dtype, x.device) if isinstance(x, torch.Tensor) else x
                   for x in leaves]
        args = self._merge(spec, tuple(_tree.unflatten(spec.in_def, structs)))
        try:
            expected = eval_shape(self.f, *args)
        except Exception:  # noqa: BLE001 - f cannot run on fake tensors: nothing to compare
            return
        _compare_outputs(self._where(), expected, out)

    def _where(self) -> str:
        return f"custom_vjp({getattr(self.f, '__name__', 'f')})"

    def _run_bwd(self, spec: _Spec, res: Any, g: Any) -> Any:
        assert self.bwd is not None
        return self.bwd(*spec.nondiff, res, g)

    def __call__(self, *args: Any, **kwargs: Any) -> Any:
        if kwargs:
            args = resolve_kwargs(self.f, args, kwargs, self._where())
        if self._in_fwd:
            return self.f(*args)
        if self._function is None:
            raise RuntimeError(f"{self._where()}: call .defvjp(fwd, bwd) before using it")
        if self.nondiff_argnums and self.nondiff_argnums[-1] >= len(args):
            raise ValueError(f"{self._where()}: `nondiff_argnums` {self.nondiff_argnums} but f "
                             f"was called with {len(args)} positional arguments")
        if torch.compiler.is_compiling():
            refuse_under_compiled_transform(self._where())  # NOTE [custom rules under torch.compile]
        static = set(self.nondiff_argnums)
        diff = tuple(a for i, a in enumerate(args) if i not in static)
        leaves, treedef = _tree.flatten(diff)
        spec = _Spec(treedef, len(diff), tuple(args[i] for i in self.nondiff_argnums))
        try:
            flat = self._function.apply(spec, *leaves)
        except NotImplementedError as e:
            if "implement the jvp function" not in str(e):
                raise
            raise NotImplementedError(
                f"{self._where()}: forward-mode differentiation (fp.jvp, fp.jacfwd, fp.hessian, "
                "torch.func.jvp) of a custom_vjp function is not supported, as in JAX: a "
                "custom_vjp defines only a reverse-mode rule. Use fp.custom_jvp (its rule "
                "gives reverse mode too), or reverse mode only (fp.jacrev, "
                "fp.jacrev(fp.jacrev(f)) for a Hessian)."
            ) from None
        return _tree.unflatten(spec.out_def, flat[: spec.n_out])


_MAX_CHECKED = 64  # signatures remembered per custom_vjp; past that, no more checks


_VALUE_TYPES = (bool, int, float, complex, str, bytes, type(None), torch.dtype, torch.device)


def _leaf_key(x: Any) -> Any:
    """A hashable stand-in for one argument leaf in the signature of a call: a tensor's
    shape, dtype and device; a number's (or string's) value; any other object's type
    (no reference to it is kept)."""
    if isinstance(x, torch.Tensor):
        return (tuple(x.shape), x.dtype, x.device)
    return (type(x), x) if isinstance(x, _VALUE_TYPES) else type(x)


def _compare_outputs(where: str, expected: Any, out: Any) -> None:
    """Refuse ``out`` (fwd's primal output) where it differs from ``expected`` (f's, from
    ``eval_shape``) in structure, or a tensor leaf in shape or dtype."""
    from functorch_pipeline.transforms._eval_shape import ShapeDtypeStruct

    is_struct = lambda x: isinstance(x, ShapeDtypeStruct)  # noqa: E731
    exp_paths, exp_leaves, exp_def = _tree.flatten_with_path(expected, is_leaf=is_struct)
    got_leaves, got_def = _tree.flatten(out)
    if exp_def != got_def:
        raise ValueError(
            f"{where}: fwd must return (out, residuals) with `out` structured as f's output "
            f"(f is not run; fwd's out is returned in its place), but f returns {exp_def} and "
            f"fwd's out is {got_def}")
    for p, e, g in zip(exp_paths, exp_leaves, got_leaves, strict=True):
        if not is_struct(e):
            continue
        if not isinstance(g, torch.Tensor) or tuple(g.shape) != tuple(e.shape) or g.dtype != e.dtype:
            got = (f"shape {tuple(g.shape)} and dtype {g.dtype}" if isinstance(g, torch.Tensor)
                   else f"a {type(g).__name__}")
            raise ValueError(
                f"{where}: fwd's primal output must match f's output, but at path "
                f"`{_tree.keystr(p)}` f returns shape {tuple(e.shape)} and dtype {e.dtype} and "
                f"fwd returns {got}")


class _Spec:
    """Static data handed to the autograd.Function (not a tensor, so not traced)."""

    def __init__(self, in_def: Any, nargs: int, nondiff: tuple[Any, ...] = ()) -> None:
        self.in_def = in_def
        self.nargs = nargs
        self.nondiff = nondiff
        self.out_def: Any = None
        self.res_def: Any = None
        self.n_out = 0


def _check_grads(where: str, spec: _Spec, flat: list[Any], meta: list[Any]) -> None:
    """Refuse a gradient whose shape differs from its argument's (autograd would silently
    sum or broadcast it to the argument's shape, as JAX refuses too)."""
    args_template = _tree.unflatten(spec.in_def, list(range(spec.in_def.num_leaves)))
    for path, k in _tree.leaves_with_path(args_template):
        gx, m = flat[k], meta[k]
        if gx is None or m is None:
            continue
        if not isinstance(gx, torch.Tensor) or gx.shape != m[0]:
            got = (f"shape {tuple(gx.shape)} and dtype {gx.dtype}" if isinstance(gx, torch.Tensor)
                   else f"a {type(gx).__name__}")
            raise ValueError(
                f"{where}: bwd must return a gradient with the shape of its argument: at "
                f"argument {path[0]}{'' if len(path) == 1 else ' path `' + _tree.keystr(path[1:]) + '`'} "
                f"the argument has shape {tuple(m[0])} and dtype {m[1]}, but bwd returned {got}"
            )


def _make_function(name: str, fwd: Callable[..., Any], bwd: Callable[..., Any],
                   check: Callable[..., None]) -> type[torch.autograd.Function]:
    where = f"custom_vjp({name})"

    class _Fn(torch.autograd.Function):
        generate_vmap_rule = True

        @staticmethod
        def forward(spec: _Spec, *leaves: Any) -> tuple[Any, ...]:  # type: ignore[override]
            args = _tree.unflatten(spec.in_def, leaves)
            result = fwd(spec, *args)
            if not (isinstance(result, tuple) and len(result) == 2):
                raise TypeError(f"{where}: fwd must return a pair (out, residuals), got {type(result).__name__}")
            out, res = result
            if not torch.compiler.is_compiling():
                check(spec, leaves, out)  # fwd's out against f's, once per signature
            out_leaves, spec.out_def = _tree.flatten(out)
            res_paths, res_leaves, spec.res_def = _tree.flatten_with_path(res)
            for p, r in zip(res_paths, res_leaves, strict=True):
                if not isinstance(r, torch.Tensor):
                    raise TypeError(
                        f"{where}: residual at path `{_tree.keystr(p)}` is a {type(r).__name__}; "
                        "residuals must be tensors (close over other values instead)"
                    )
            spec.n_out = len(out_leaves)
            # Saving an input returned as-is is refused by autograd.Function; a view is fine
            # (the inputs are saved too, to rerun fwd for higher orders).
            ids = {id(x) for x in leaves if isinstance(x, torch.Tensor)}
            out_leaves = [x.view_as(x) if isinstance(x, torch.Tensor) and id(x) in ids else x
                          for x in out_leaves]
            return (*out_leaves, *(r.view_as(r) for r in res_leaves))

        @staticmethod
        def setup_context(ctx: Any, inputs: tuple[Any, ...], output: tuple[Any, ...]) -> None:
            spec = inputs[0]
            ctx.spec = spec
            res = output[spec.n_out :]
            ctx.mark_non_differentiable(*res)
            leaves = inputs[1:]
            ctx.input_is_tensor = [isinstance(x, torch.Tensor) for x in leaves]
            ctx.others = [None if t else x for x, t in zip(leaves, ctx.input_is_tensor, strict=True)]
            ctx.input_meta = [(x.shape, x.dtype) if t else None
                              for x, t in zip(leaves, ctx.input_is_tensor, strict=True)]
            ctx.n_res = len(res)
            ctx.save_for_backward(*res, *[x for x in leaves if isinstance(x, torch.Tensor)])

        @staticmethod
        def backward(ctx: Any, *grads: Any) -> tuple[Any, ...]:
            spec: _Spec = ctx.spec
            saved = ctx.saved_tensors
            if torch.is_grad_enabled():
                # NOTE [custom_vjp higher order]
                # Grad mode is on in a backward only when a graph of the gradient is wanted
                # (create_graph, an outer fp.grad/jacrev level). The saved residuals are
                # constants (non-differentiable outputs), so bwd would look constant in the
                # primals (a silent 0 second derivative). As JAX differentiates fwd and bwd
                # for higher orders, fwd is rerun on the saved inputs so the residuals, and
                # with them bwd's result, depend on the primals.
                it = iter(saved[ctx.n_res:])
                leaves = [next(it) if t else o for t, o in zip(ctx.input_is_tensor, ctx.others, strict=True)]
                res = fwd(spec, *_tree.unflatten(spec.in_def, leaves))[1]
            else:
                res = _tree.unflatten(spec.res_def, saved[: ctx.n_res])
            g = _tree.unflatten(spec.out_def, grads[: spec.n_out])
            arg_grads = bwd(spec, res, g)
            if not isinstance(arg_grads, tuple) or len(arg_grads) != spec.nargs:
                raise TypeError(
                    f"{where}: bwd must return a tuple with one gradient per argument not in "
                    f"nondiff_argnums ({spec.nargs}), got {type(arg_grads).__name__}"
                    + (f" of length {len(arg_grads)}" if isinstance(arg_grads, tuple) else "")
                )
            flat: list[Any] = []
            args_template = _tree.unflatten(spec.in_def, [0] * spec.in_def.num_leaves)
            for i, (tmpl, ga) in enumerate(zip(args_template, arg_grads, strict=True)):
                n = len(_tree.leaves(tmpl))
                if ga is None:
                    flat.extend([None] * n)
                    continue
                gl = _tree.leaves(ga)
                if len(gl) != n:
                    raise ValueError(
                        f"{where}: bwd returned a gradient for argument {i} with {len(gl)} leaves, "
                        f"but the argument has {n}"
                    )
                flat.extend(gl)
            flat = [gx if is_t else None for gx, is_t in zip(flat, ctx.input_is_tensor, strict=True)]
            _check_grads(where, spec, flat, ctx.input_meta)
            return (None, *flat)

    _Fn.__name__ = f"custom_vjp_{name}"
    return _Fn

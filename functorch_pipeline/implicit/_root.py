"""``custom_root``: gradients of an inner problem's solution by the implicit function theorem."""

from __future__ import annotations

import functools
import warnings
from collections.abc import Callable
from typing import Any

import torch
import torch.func

from functorch_pipeline import tree as _tree
from functorch_pipeline.implicit._linear_solve import ConvergenceWarning
from functorch_pipeline.implicit._linear_solve import solve_normal_cg
from functorch_pipeline.implicit._linear_solve import unwrapped

__all__ = ["custom_root"]


def custom_root(optimality_fn: Callable[..., Any], solve: Callable[[Any, Any], Any] | None = None,
                has_aux: bool = False) -> Callable[[Callable[..., Any]], Callable[..., Any]]:
    """Decorate a solver so its solution is differentiated implicitly, as JAXopt's
    ``jaxopt.implicit_diff.custom_root`` and TorchOpt's ``torchopt.diff.implicit.custom_root``.

    The decorated ``solver(init_params, *args)`` returns ``x*`` with
    ``optimality_fn(x*, *args) = 0`` (a pytree shaped like ``x*``; for a minimiser of
    ``f(x, *args)`` it is usually ``grad(f)``). However ``x*`` was found (any number of
    steps, any library, its own ``torch.autograd.grad`` calls included: it runs on
    detached inputs with grad mode on, and nothing it records is kept), its gradient
    with respect to ``args`` is the implicit function theorem's: for an output cotangent
    ``v``, solve
    ``(∂F/∂x)^T u = -v`` matrix-free (``solve(matvec, -v)`` with ``matvec`` a
    vector-Jacobian product of ``F`` in ``x``), then return ``(∂F/∂args)^T u``. Nothing
    the solver did is stored for backward: memory does not grow with its iterations.

    Works with ``torch.autograd`` (``.backward()``), ``fp.grad`` / ``fp.value_and_grad``,
    ``fp.vmap`` (when the solver itself can be vmapped) and forward mode (``fp.jvp``,
    ``fp.jacfwd``, ``fp.hessian``, ``fp.hvp``: the tangent solves
    ``(∂F/∂x) ẋ = -(∂F/∂args) ȧrgs`` with ``solve`` and jacobian-vector products). Arguments may be pytrees;
    non-tensor and non-floating leaves get no gradient, nor does ``init_params`` (as in
    JAXopt). Tensors that ``optimality_fn`` or the solver close over get no gradient
    either: pass everything you differentiate as an argument. Second derivatives (a
    ``grad`` of ``grad``, ``create_graph=True``) differentiate the backward pass itself,
    linear solver iterations included, so they are as accurate as that solve's ``tol``.
    Unlike JAXopt there is no ``reference_signature`` and no keyword arguments: the
    solver's positional arguments after ``init_params`` are the ones differentiated.
    A linear solve that does not converge warns with its residual
    (:class:`ConvergenceWarning`), or raises with
    ``solve=functools.partial(solve_cg, on_failure="raise")``.

    Args:
      optimality_fn: ``F(x, *args) -> pytree like x``, zero at the solution; written in
        differentiable torch operations.
      solve: ``solve(matvec, b) -> x`` solving ``matvec(x) = b``; default
        :func:`solve_normal_cg` (any non-singular ``∂F/∂x``, as JAXopt). When ``F`` is the
        gradient of a strongly convex function, ``∂F/∂x`` is symmetric positive-definite and
        ``functools.partial(solve_cg, tol=...)`` is faster and more accurate; for other
        systems use :func:`solve_gmres`. Pass ``tol`` through ``functools.partial``: the
        default ``tol=1e-5`` (JAX's) gives gradients to about that relative accuracy.
      has_aux: the solver returns ``(x*, aux)``; ``aux`` is passed through without
        gradient.

    Returns:
      A decorator: ``solver -> solver`` with the same signature.

    Example:
      Ridge regression's solution ``x*(lam) = (A^T A + lam I)^{-1} A^T y``:

      >>> import functools, torch
      >>> import functorch_pipeline as fp
      >>> A = torch.tensor([[1., 2.], [3., 4.], [5., 7.]], dtype=torch.float64)
      >>> y = torch.tensor([1., 0., 2.], dtype=torch.float64)
      >>> def F(x, lam):  # gradient of 0.5 ||A x - y||^2 + 0.5 lam ||x||^2
      ...     return A.T @ (A @ x - y) + lam * x
      >>> @fp.implicit.custom_root(F, solve=functools.partial(fp.implicit.solve_cg, tol=1e-12))
      ... def ridge(init, lam):
      ...     return torch.linalg.solve(A.T @ A + lam * torch.eye(2, dtype=A.dtype), A.T @ y)
      >>> lam = torch.tensor(0.5, dtype=torch.float64)
      >>> g = fp.grad(lambda lam: ridge(None, lam).sum())(lam)
      >>> H = A.T @ A + lam * torch.eye(2, dtype=A.dtype)  # closed form: -1^T H^-1 x*
      >>> closed = -torch.linalg.solve(H, torch.linalg.solve(H, A.T @ y)).sum()
      >>> torch.allclose(g, closed, rtol=1e-10)
      True
    """
    if not callable(optimality_fn):
        raise TypeError(
            f"custom_root: `optimality_fn` must be callable, got {type(optimality_fn).__name__}")
    if solve is not None and not callable(solve):
        raise TypeError(
            f"custom_root: `solve` must be callable or None, got {type(solve).__name__}")
    linear_solve = solve_normal_cg if solve is None else solve

    def decorator(solver: Callable[..., Any]) -> Callable[..., Any]:
        if not callable(solver):
            raise TypeError(f"custom_root: the decorated solver must be callable, got "
                            f"{type(solver).__name__}")
        name = getattr(solver, "__name__", "solver")
        fn = _make_function(f"custom_root({name})", solver, optimality_fn, linear_solve, has_aux)

        @functools.wraps(solver)
        def wrapped(init_params: Any, *args: Any) -> Any:
            leaves, in_def = _tree.flatten((init_params, args))
            spec = _Spec(in_def)
            flat = fn.apply(spec, *leaves)
            sol = _tree.unflatten(spec.out_def, flat[: spec.n_out])
            if has_aux:
                return sol, _tree.unflatten(spec.aux_def, flat[spec.n_out:])
            return sol

        return wrapped

    return decorator


class _Spec:
    """Static data handed to the autograd.Function (not a tensor, so not traced)."""

    def __init__(self, in_def: Any) -> None:
        self.in_def = in_def
        self.out_def: Any = None
        self.aux_def: Any = None
        self.n_out = 0


def _is_diff(x: Any) -> bool:
    return isinstance(x, torch.Tensor) and (x.is_floating_point() or x.is_complex())


def _make_function(where: str, solver: Callable[..., Any], optimality_fn: Callable[..., Any],
                   linear_solve: Callable[[Any, Any], Any], has_aux: bool
                   ) -> type[torch.autograd.Function]:

    class _Fn(torch.autograd.Function):
        generate_vmap_rule = True

        @staticmethod
        def forward(spec: _Spec, *leaves: Any) -> tuple[Any, ...]:  # type: ignore[override]
            # NOTE [solver sees detached inputs with grad enabled]: autograd.Function runs
            # forward under no_grad, which would break a solver that takes its own
            # torch.autograd.grad steps; it gets detached inputs and grad mode back, and
            # whatever graph it builds stays inside (outputs are detached below).
            detached = [x.detach() if isinstance(x, torch.Tensor) else x for x in leaves]
            init_params, args = _tree.unflatten(spec.in_def, detached)
            with torch.enable_grad():
                result = solver(init_params, *args)
            if has_aux:
                if not (isinstance(result, tuple) and len(result) == 2):
                    raise TypeError(f"{where}: with has_aux=True the solver must return a pair "
                                    f"(solution, aux), got {type(result).__name__}")
                sol, aux = result
            else:
                sol, aux = result, None
            sol_paths, sol_leaves, spec.out_def = _tree.flatten_with_path(sol)
            for path, leaf in zip(sol_paths, sol_leaves, strict=True):
                if not (isinstance(leaf, torch.Tensor) and leaf.is_floating_point()):
                    got = leaf.dtype if isinstance(leaf, torch.Tensor) else type(leaf).__name__
                    raise TypeError(f"{where}: every leaf of the solution must be a "
                                    f"floating-point tensor, but the leaf at path "
                                    f"`{_tree.keystr(path)}` is {got}")
            aux_leaves, spec.aux_def = _tree.flatten(aux)
            spec.n_out = len(sol_leaves)
            ids = {id(x) for x in leaves} | {id(x) for x in detached}
            # An input returned as-is would alias it; autograd.Function wants fresh outputs.
            outs = [x.detach().clone() if id(x) in ids else x.detach() for x in sol_leaves]
            aux_leaves = [a.detach() if isinstance(a, torch.Tensor) else a for a in aux_leaves]
            return (*outs, *aux_leaves)

        @staticmethod
        def setup_context(ctx: Any, inputs: tuple[Any, ...], output: tuple[Any, ...]) -> None:
            spec: _Spec = inputs[0]
            ctx.spec = spec
            leaves = inputs[1:]
            aux = [a for a in output[spec.n_out:] if isinstance(a, torch.Tensor)]
            if aux:
                ctx.mark_non_differentiable(*aux)
            ctx.tensor_pos = [i for i, x in enumerate(leaves) if isinstance(x, torch.Tensor)]
            ctx.others = [None if isinstance(x, torch.Tensor) else x for x in leaves]
            ctx.save_for_backward(*output[: spec.n_out], *(leaves[i] for i in ctx.tensor_pos))
            ctx.save_for_forward(*output[: spec.n_out], *(leaves[i] for i in ctx.tensor_pos))

        @staticmethod
        def jvp(ctx: Any, _spec_tangent: Any, *tangents: Any) -> tuple[Any, ...]:
            # forward mode (fp.jvp, jacfwd, hessian, hvp): the implicit function theorem's
            # tangent, (∂F/∂x) ẋ = -(∂F/∂args) ȧrgs, solved with jvp matvecs
            spec: _Spec = ctx.spec
            sol_leaves, args, n_init = _saved_inputs(ctx)
            arg_tangents = list(tangents[n_init:])
            _refuse_nested_forward(where, [*sol_leaves, *_tree.leaves(args), *arg_tangents])
            sol = _tree.unflatten(spec.out_def, list(sol_leaves))
            dx = _implicit_jvp(where, optimality_fn, linear_solve, sol, args, arg_tangents)
            return (*_tree.leaves(dx), *([None] * _n_aux(spec)))

        @staticmethod
        def backward(ctx: Any, *grads: Any) -> tuple[Any, ...]:
            spec: _Spec = ctx.spec
            sol_leaves, args, n_init = _saved_inputs(ctx)
            cot = [torch.zeros_like(s) if g is None else g
                   for s, g in zip(sol_leaves, grads[: spec.n_out], strict=True)]
            sol = _tree.unflatten(spec.out_def, list(sol_leaves))
            v = _tree.unflatten(spec.out_def, [-c for c in cot])
            arg_grads = _implicit_vjp(where, optimality_fn, linear_solve, sol, args, v)
            return (None, *([None] * n_init), *arg_grads)

    # refusals name the class by its forward, which every custom_root shares: the API, not the solver
    _Fn.__name__, _Fn.__qualname__ = where, "custom_root"
    return _Fn


def _refuse_nested_forward(where: str, tensors: list[Any]) -> None:
    """The forward-mode rule differentiated again (``jacfwd(jacfwd)``, ``jvp`` of ``jvp``,
    ``grad`` of ``jvp``) is refused.

    # NOTE [custom_root's forward mode is first order]
    The tangent the rule computes is right, but a derivative taken around it is not: an
    outer forward level saw the rule's tangent as a constant (``jacfwd(jacfwd)`` gave 0 for
    d²x*/dλ²) and an outer reverse level counted it twice (``grad`` of ``jvp``: 2x the
    closed form). Second derivatives go through the backward instead: ``fp.hessian``
    (forward over reverse) and ``jacrev(jacrev)`` are exact. An input that requires grad
    (below any torch.func wrapper) counts as an outer reverse level: a later ``backward``
    would be wrong, so the forward mode refuses it (detach it, or use reverse mode).
    """
    from torch._functorch.pyfunctorch import retrieve_all_functorch_interpreters

    kinds = [str(i.key()).rsplit(".", 1)[-1] for i in retrieve_all_functorch_interpreters()]
    outer_grad = torch.is_grad_enabled() and any(
        isinstance(t, torch.Tensor) and unwrapped(t).requires_grad for t in tensors)
    if kinds.count("Jvp") > 1 or "Grad" in kinds or outer_grad:
        raise NotImplementedError(
            f"{where}: its forward-mode derivative (fp.jvp, fp.jacfwd) cannot itself be "
            "differentiated (jacfwd of jacfwd, jvp of jvp, grad of jvp); for second "
            "derivatives use fp.hessian (forward over reverse) or fp.jacrev(fp.jacrev(f))")


def _saved_inputs(ctx: Any) -> tuple[tuple[Any, ...], Any, int]:
    """The solution's leaves, the solver's ``args`` and the number of ``init_params``
    leaves, from what ``setup_context`` saved."""
    saved = ctx.saved_tensors
    sol_leaves, arg_tensors = saved[: ctx.spec.n_out], saved[ctx.spec.n_out:]
    leaves = list(ctx.others)
    for i, t in zip(ctx.tensor_pos, arg_tensors, strict=True):
        leaves[i] = t
    _, args = _tree.unflatten(ctx.spec.in_def, leaves)
    return sol_leaves, args, len(leaves) - len(_tree.leaves(args))


def _check_residual(where: str, residual: Any, sol: Any) -> None:
    """``optimality_fn(x*, *args)`` must be shaped like ``x*`` (a residual norm, or a dict
    missing a key, failed deep inside torch.func at the backward)."""
    r_paths, r_leaves, r_def = _tree.flatten_with_path(residual)
    s_leaves, s_def = _tree.flatten(sol)
    if not _tree.same_structure(r_def, s_def):
        raise ValueError(f"{where}: `optimality_fn` must return a tree shaped like the solution "
                         f"(structure {s_def}), got structure {r_def}")
    for p, r, x in zip(r_paths, r_leaves, s_leaves, strict=True):
        if not isinstance(r, torch.Tensor) or r.shape != x.shape:
            got = tuple(r.shape) if isinstance(r, torch.Tensor) else type(r).__name__
            raise ValueError(f"{where}: `optimality_fn` must return a tree shaped like the "
                             f"solution; at path `{_tree.keystr(p)}` expected shape "
                             f"{tuple(x.shape)}, got {got}")


def _n_aux(spec: _Spec) -> int:
    return 0 if spec.aux_def is None else spec.aux_def.num_leaves


def _implicit_jvp(where: str, optimality_fn: Callable[..., Any],
                  linear_solve: Callable[[Any, Any], Any], sol: Any, args: tuple[Any, ...],
                  arg_tangents: list[Any]) -> Any:
    """``ẋ`` with ``(∂F/∂x) ẋ = -(∂F/∂args) ȧrgs`` (``arg_tangents``: one per leaf of
    ``args``, None where it has none)."""
    arg_leaves, arg_def = _tree.flatten(args)
    pos = [i for i, (x, t) in enumerate(zip(arg_leaves, arg_tangents, strict=True))
           if _is_diff(x) and t is not None]
    if not pos:
        return _tree.map(torch.zeros_like, sol)

    def f_args(*diff: torch.Tensor) -> Any:
        full = list(arg_leaves)
        for i, d in zip(pos, diff, strict=True):
            full[i] = d
        return optimality_fn(sol, *_tree.unflatten(arg_def, full))

    residual, b = torch.func.jvp(f_args, tuple(arg_leaves[i] for i in pos),
                                 tuple(arg_tangents[i] for i in pos))
    _check_residual(where, residual, sol)

    def matvec(w: Any) -> Any:
        return torch.func.jvp(lambda x: optimality_fn(x, *args), (sol,), (w,))[1]

    return _solve(where, "implicit forward-mode linear solve (∂F/∂x) ẋ = -(∂F/∂args) ȧrgs",
                  "derivative", linear_solve, matvec, _tree.map(torch.neg, b), sol)


def _solve(where: str, what: str, result: str, linear_solve: Callable[[Any, Any], Any],
           matvec: Callable[[Any], Any], b: Any, sol: Any) -> Any:
    """``linear_solve(matvec, b)``, its ConvergenceWarning re-issued with ``where`` and
    what a non-converged solve means for the ``result`` (NOTE [solver warnings in
    backward]), checked to be shaped like ``sol``."""
    with warnings.catch_warnings(record=True) as caught:
        warnings.simplefilter("always", ConvergenceWarning)
        x = linear_solve(matvec, b)
    for w in caught:
        if issubclass(w.category, ConvergenceWarning):
            warnings.warn(f"{where}: the {what} did not converge, so the {result} is inexact: "
                          f"{w.message}", ConvergenceWarning, stacklevel=5)
        else:
            warnings.warn_explicit(w.message, w.category, w.filename, w.lineno)
    if not _tree.same_structure(_tree.structure(x), _tree.structure(sol)):
        raise ValueError(f"{where}: `solve` returned a tree of structure {_tree.structure(x)}, "
                         f"but the solution has {_tree.structure(sol)}")
    return x


def _implicit_vjp(where: str, optimality_fn: Callable[..., Any],
                  linear_solve: Callable[[Any, Any], Any], sol: Any, args: tuple[Any, ...],
                  v: Any) -> list[Any]:
    """``(∂F/∂args)^T u`` with ``(∂F/∂x)^T u = v``, one entry per leaf of ``args``."""
    residual, vjp_x = torch.func.vjp(lambda x: optimality_fn(x, *args), sol)
    _check_residual(where, residual, sol)

    def matvec(u: Any) -> Any:
        return vjp_x(u)[0]

    # NOTE [solver warnings in backward]: the linear solve runs inside autograd's backward,
    # far from the user's code; its ConvergenceWarning is re-issued with this custom_root's
    # name and what a non-converged solve means for the gradient.
    u = _solve(where, "implicit-gradient linear solve (∂F/∂x)^T u = -v", "gradient",
               linear_solve, matvec, v, sol)

    arg_leaves, arg_def = _tree.flatten(args)
    diff_pos = [i for i, x in enumerate(arg_leaves) if _is_diff(x)]
    out: list[Any] = [None] * len(arg_leaves)
    if not diff_pos:
        return out

    def f_args(*diff: torch.Tensor) -> Any:
        full = list(arg_leaves)
        for i, d in zip(diff_pos, diff, strict=True):
            full[i] = d
        return optimality_fn(sol, *_tree.unflatten(arg_def, full))

    _, vjp_args = torch.func.vjp(f_args, *(arg_leaves[i] for i in diff_pos))
    for i, g in zip(diff_pos, vjp_args(u), strict=True):
        out[i] = g
    return out

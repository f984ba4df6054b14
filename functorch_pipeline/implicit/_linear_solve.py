"""Matrix-free linear solvers over pytrees: CG, CG on the normal equations, GMRES, BiCGSTAB.

Each solver takes ``matvec`` (a linear function from a pytree shaped like ``b`` to the
same) and ``b``, and returns ``x`` with ``matvec(x) ≈ b``, as JAXopt's
``jaxopt.linear_solve`` and ``jax.scipy.sparse.linalg`` do. A solve stops once the
residual norm is at most ``max(tol * ||b||, atol)``; a solve that does not get there within
``maxiter`` iterations warns with :class:`ConvergenceWarning` (or raises
:class:`ConvergenceError` with ``on_failure="raise"``), naming the residual it reached.
"""

from __future__ import annotations

import math
import warnings
from collections.abc import Callable
from typing import Any

import torch
import torch.func

from functorch_pipeline import tree as _tree

__all__ = [
    "ConvergenceError",
    "ConvergenceWarning",
    "solve_bicgstab",
    "solve_cg",
    "solve_gmres",
    "solve_normal_cg",
]

Matvec = Callable[[Any], Any]
_ON_FAILURE = ("warn", "raise", "ignore")


class ConvergenceWarning(UserWarning):
    """A matrix-free linear solve stopped at ``maxiter`` above its tolerance."""


class ConvergenceError(RuntimeError):
    """A matrix-free linear solve with ``on_failure="raise"`` did not converge."""


# NOTE [host reads in solvers]: a solve stops when its residual is small enough, which is
# a data-dependent branch: each iteration reads one boolean on the host. Under `vmap`
# (custom_root's backward is vmapped when the caller vmaps) the residual is a batched
# tensor; we read the underlying batched values (every element must have converged), and
# the divisions are guarded so that elements that already converged stay put while the
# others iterate. The solvers are therefore not `torch.compile`-friendly (a graph break per
# iteration); they are not on an optimizer's hot path.
def unwrapped(t: torch.Tensor) -> torch.Tensor:
    """``t`` below every torch.func wrapper (its batched values; plain autograd's
    ``requires_grad``)."""
    while torch._C._functorch.is_functorch_wrapped_tensor(t):
        t = torch._C._functorch.get_unwrapped(t)
    return t


def _unwrap(t: torch.Tensor) -> torch.Tensor:
    return unwrapped(t).detach()


def _host_all(t: torch.Tensor) -> bool:
    return bool(_unwrap(t).all())


def _host_max(t: torch.Tensor) -> float:
    return float(_unwrap(t).max())


def _safe_div(num: torch.Tensor, den: torch.Tensor) -> torch.Tensor:
    ok = den != 0
    return torch.where(ok, num / torch.where(ok, den, torch.ones_like(den)), torch.zeros_like(num))


def _dot(a: torch.Tensor, b: torch.Tensor) -> torch.Tensor:
    return torch.dot(a, b)


class _Problem:
    """``b`` raveled, the flat matvec, the stopping threshold and the report."""

    def __init__(self, name: str, matvec: Matvec, b: Any, init: Any, ridge: float | None,
                 tol: float, atol: float, maxiter: int | None, on_failure: str) -> None:
        self.name = name
        if not callable(matvec):
            raise TypeError(f"{name}: `matvec` must be callable, got {type(matvec).__name__}")
        if on_failure not in _ON_FAILURE:
            raise ValueError(
                f"{name}: `on_failure` must be one of {_ON_FAILURE}, got {on_failure!r}")
        for arg, value in (("tol", tol), ("atol", atol)):
            if not (isinstance(value, (int, float)) and 0 <= value < math.inf):
                raise ValueError(f"{name}: `{arg}` must be a finite number >= 0, got {value!r}")
        if maxiter is not None and (isinstance(maxiter, bool) or not isinstance(maxiter, int)
                                    or maxiter < 1):
            raise ValueError(f"{name}: `maxiter` must be an int >= 1 or None, got {maxiter!r}")
        if ridge is not None and not isinstance(ridge, (int, float, torch.Tensor)):
            raise TypeError(f"{name}: `ridge` must be a number or None, got {type(ridge).__name__}")
        for path, leaf in _tree.leaves_with_path(b):
            if not isinstance(leaf, torch.Tensor) or not leaf.is_floating_point():
                got = leaf.dtype if isinstance(leaf, torch.Tensor) else type(leaf).__name__
                raise TypeError(f"{name}: every leaf of `b` must be a floating-point tensor, but "
                                f"the leaf at path `{_tree.keystr(path)}` is {got}")
        self.b_tree = b
        self.b, self.unravel = _tree.ravel(b)
        self.n = self.b.shape[0]
        self.ridge = ridge
        self.user_matvec = matvec
        self.on_failure = on_failure
        self.tol, self.atol = float(tol), float(atol)
        self.maxiter = maxiter
        if init is None:
            self.x0 = torch.zeros_like(self.b)
        else:
            self._check_like(init, "init")
            self.x0 = _tree.ravel(init)[0].to(self.b.dtype)
        self.bnorm = torch.linalg.vector_norm(self.b)
        self.threshold = torch.clamp(self.bnorm * self.tol, min=self.atol)
        self._checked = False
        self.bname = "||b||"

    def _check_like(self, tree: Any, what: str) -> None:
        want = _tree.leaves_with_path(self.b_tree)
        got, got_def = _tree.flatten(tree)
        if not _tree.same_structure(got_def, _tree.structure(self.b_tree)):
            raise ValueError(f"{self.name}: {what} has tree structure {got_def} but `b` has "
                             f"{_tree.structure(self.b_tree)}")
        for (path, w), g in zip(want, got, strict=True):
            if not isinstance(g, torch.Tensor) or g.shape != w.shape:
                shape = tuple(g.shape) if isinstance(g, torch.Tensor) else type(g).__name__
                raise ValueError(f"{self.name}: {what} at path `{_tree.keystr(path)}` has shape "
                                 f"{shape} but `b` has {tuple(w.shape)}")

    def matvec(self, v: torch.Tensor) -> torch.Tensor:
        out = self.user_matvec(self.unravel(v))
        if not self._checked:
            self._check_like(out, "`matvec(x)`")
            self._checked = True
        flat = _tree.ravel(out)[0].to(v.dtype)
        return flat if self.ridge is None else flat + self.ridge * v

    def default_maxiter(self, per_n: int = 10) -> int:
        return self.maxiter if self.maxiter is not None else max(per_n * self.n, 1)

    def done(self, rnorm: torch.Tensor) -> bool:
        return _host_all(rnorm <= self.threshold)

    def finish(self, x: torch.Tensor, rnorm: torch.Tensor, iters: int, what: str = "residual"
               ) -> Any:
        if not self.done(rnorm) and self.on_failure != "ignore":
            msg = (
                f"{self.name}: did not converge in {iters} iterations: {what} norm "
                f"{_host_max(rnorm):.3e} > tolerance {_host_max(self.threshold):.3e} "
                f"(max(tol={self.tol:g} * {self.bname}={_host_max(self.bnorm):.3e}, "
                f"atol={self.atol:g})); "
                "raise `maxiter`, loosen `tol`, add `ridge`, or use a solver suited to the "
                "system (solve_cg needs a symmetric positive-definite one)"
            )
            if self.on_failure == "raise":
                raise ConvergenceError(msg)
            warnings.warn(msg, ConvergenceWarning, stacklevel=3)
        return self.unravel(x)


_ARGS_DOC = """
    Args:
      matvec: the linear operator ``A``: a function from a pytree shaped like ``b`` to one
        shaped like ``b``.
      b: the right-hand side, a pytree of floating-point tensors.
      init: the starting point (a pytree like ``b``); zeros if ``None``.
      ridge: if given, solve ``(A + ridge * I) x = b`` instead.
      tol: relative tolerance: stop once ``||residual|| <= max(tol * ||b||, atol)``.
      atol: absolute tolerance.
      maxiter: the most iterations (see below for what one is); default ``10 * n`` for
        ``n`` unknowns, as in ``jax.scipy.sparse.linalg``.
      on_failure: what to do when ``maxiter`` is reached above the tolerance: ``"warn"``
        (:class:`ConvergenceWarning`, naming the residual), ``"raise"``
        (:class:`ConvergenceError`) or ``"ignore"``.
"""


def solve_cg(matvec: Matvec, b: Any, *, init: Any = None, ridge: float | None = None,
             tol: float = 1e-5, atol: float = 0.0, maxiter: int | None = None,
             on_failure: str = "warn") -> Any:
    """Solve ``A x = b`` for a symmetric positive-definite ``A`` by conjugate gradients.

    As ``jaxopt.linear_solve.solve_cg`` / ``jax.scipy.sparse.linalg.cg`` (same ``tol``,
    ``atol`` defaults and stopping rule). Matrix-free: ``A`` is only applied, once per
    iteration.
    {args}
    Returns:
      ``x``, a pytree like ``b``.

    Example:
      >>> import torch
      >>> A = torch.tensor([[4., 1.], [1., 3.]], dtype=torch.float64)
      >>> x = solve_cg(lambda v: {{"u": A @ v["u"]}}, {{"u": torch.tensor([1., 2.],
      ...              dtype=torch.float64)}}, tol=1e-12)
      >>> torch.allclose(A @ x["u"], torch.tensor([1., 2.], dtype=torch.float64))
      True
    """
    pb = _Problem("solve_cg", matvec, b, init, ridge, tol, atol, maxiter, on_failure)
    x = pb.x0
    r = pb.b - pb.matvec(x) if init is not None else pb.b.clone()
    p = r
    rs = _dot(r, r)
    k = 0
    for k in range(pb.default_maxiter()):  # noqa: B007 - k is reported
        if pb.done(rs.sqrt()):
            break
        ap = pb.matvec(p)
        alpha = _safe_div(rs, _dot(p, ap))
        x = x + alpha * p
        r = r - alpha * ap
        rs_new = _dot(r, r)
        p = r + _safe_div(rs_new, rs) * p
        rs = rs_new
    else:
        k = pb.default_maxiter()
    return pb.finish(x, rs.sqrt(), k)


solve_cg.__doc__ = (solve_cg.__doc__ or "").format(args=_ARGS_DOC)


def solve_normal_cg(matvec: Matvec, b: Any, *, init: Any = None, ridge: float | None = None,
                    tol: float = 1e-5, atol: float = 0.0, maxiter: int | None = None,
                    on_failure: str = "warn") -> Any:
    """Solve ``A x = b`` for any non-singular ``A`` by CG on ``A^T A x = A^T b``.

    As ``jaxopt.linear_solve.solve_normal_cg``: ``A^T`` is applied by a vector-Jacobian
    product of ``matvec`` (``torch.func.vjp``), so ``matvec`` must be written in
    differentiable torch operations. ``ridge`` regularises the normal equations
    (``(A^T A + ridge I) x = A^T b``), and the tolerance applies to their residual. It
    squares the condition number: prefer :func:`solve_cg` for symmetric positive-definite
    and :func:`solve_gmres` for other well-conditioned systems. One iteration applies
    ``A`` and ``A^T`` once each.
    {args}
    Returns:
      ``x``, a pytree like ``b``.

    Example:
      >>> import torch
      >>> A = torch.tensor([[1., 2.], [0., 1.]], dtype=torch.float64)
      >>> x = solve_normal_cg(lambda v: A @ v, torch.tensor([5., 2.], dtype=torch.float64),
      ...                     tol=1e-12)
      >>> torch.allclose(x, torch.tensor([1., 2.], dtype=torch.float64))
      True
    """
    pb = _Problem("solve_normal_cg", matvec, b, init, None, tol, atol, maxiter, on_failure)
    ridge_ = ridge

    def rmatvec(y: torch.Tensor) -> torch.Tensor:
        # A is linear, so its transpose is the vjp at any point (here at y, same shape).
        _, vjp_fn = torch.func.vjp(pb.matvec, torch.zeros_like(y))
        return vjp_fn(y)[0]

    def normal(v: torch.Tensor) -> torch.Tensor:
        out = rmatvec(pb.matvec(v))
        return out if ridge_ is None else out + ridge_ * v

    atb = rmatvec(pb.b)
    pb.threshold = torch.clamp(torch.linalg.vector_norm(atb) * pb.tol, min=pb.atol)
    pb.bnorm = torch.linalg.vector_norm(atb)
    pb.bname = "||A^T b||"
    x = pb.x0
    r = atb - normal(x) if init is not None else atb.clone()
    p = r
    rs = _dot(r, r)
    k = 0
    for k in range(pb.default_maxiter()):  # noqa: B007 - k is reported
        if pb.done(rs.sqrt()):
            break
        ap = normal(p)
        alpha = _safe_div(rs, _dot(p, ap))
        x = x + alpha * p
        r = r - alpha * ap
        rs_new = _dot(r, r)
        p = r + _safe_div(rs_new, rs) * p
        rs = rs_new
    else:
        k = pb.default_maxiter()
    return pb.finish(x, rs.sqrt(), k, what="normal-equation (A^T A x = A^T b) residual")


solve_normal_cg.__doc__ = (solve_normal_cg.__doc__ or "").format(args=_ARGS_DOC)


def solve_gmres(matvec: Matvec, b: Any, *, init: Any = None, ridge: float | None = None,
                tol: float = 1e-5, atol: float = 0.0, restart: int = 20,
                maxiter: int | None = None, on_failure: str = "warn") -> Any:
    """Solve ``A x = b`` for a general (non-symmetric) ``A`` by restarted GMRES.

    As ``jaxopt.linear_solve.solve_gmres`` / ``jax.scipy.sparse.linalg.gmres`` with
    ``solve_method="incremental"``-like stopping (checked after every Krylov step), with
    one difference: here ``maxiter`` counts matrix-vector products, not restarts.
    {args}      restart: the Krylov subspace size before a restart.

    Returns:
      ``x``, a pytree like ``b``.

    Example:
      >>> import torch
      >>> A = torch.tensor([[2., 1.], [-1., 3.]], dtype=torch.float64)
      >>> x = solve_gmres(lambda v: A @ v, torch.tensor([3., 2.], dtype=torch.float64),
      ...                 tol=1e-12)
      >>> torch.allclose(x, torch.tensor([1., 1.], dtype=torch.float64))
      True
    """
    if isinstance(restart, bool) or not isinstance(restart, int) or restart < 1:
        raise ValueError(f"solve_gmres: `restart` must be an int >= 1, got {restart!r}")
    pb = _Problem("solve_gmres", matvec, b, init, ridge, tol, atol, maxiter, on_failure)
    x = pb.x0
    r = pb.b - pb.matvec(x)
    rnorm = torch.linalg.vector_norm(r)
    budget = pb.default_maxiter()
    used = 0
    while used < budget and not pb.done(rnorm):
        m = min(restart, budget - used)
        basis = [_safe_div(r, rnorm)]
        cols: list[torch.Tensor] = []  # the Hessenberg matrix's columns, zero-padded
        y = torch.zeros(0, dtype=r.dtype, device=r.device)
        j = 0
        for j in range(m):
            w = pb.matvec(basis[j])
            used += 1
            col = []
            for v in basis:  # modified Gram-Schmidt
                hij = _dot(w, v)
                w = w - hij * v
                col.append(hij)
            wnorm = torch.linalg.vector_norm(w)
            col.append(wnorm)
            cols.append(torch.cat([torch.stack(col), r.new_zeros(m - j - 1)]))
            basis.append(_safe_div(w, wnorm))
            hk = torch.stack(cols, dim=-1)[: j + 2]
            rhs = torch.eye(j + 2, 1, dtype=r.dtype, device=r.device)[:, 0] * rnorm
            y = torch.linalg.lstsq(hk, rhs.unsqueeze(-1)).solution.squeeze(-1)
            estimate = torch.linalg.vector_norm(rhs - hk @ y)
            if pb.done(estimate) or _host_max(wnorm) == 0.0:  # converged or lucky breakdown
                break
        x = x + torch.stack(basis[: j + 1], dim=-1) @ y
        r = pb.b - pb.matvec(x)
        rnorm = torch.linalg.vector_norm(r)
    return pb.finish(x, rnorm, used)


solve_gmres.__doc__ = (solve_gmres.__doc__ or "").format(args=_ARGS_DOC)


def solve_bicgstab(matvec: Matvec, b: Any, *, init: Any = None, ridge: float | None = None,
                   tol: float = 1e-5, atol: float = 0.0, maxiter: int | None = None,
                   on_failure: str = "warn") -> Any:
    """Solve ``A x = b`` for a general (non-symmetric) ``A`` by BiCGSTAB.

    As ``jaxopt.linear_solve.solve_bicgstab`` / ``jax.scipy.sparse.linalg.bicgstab``.
    Cheaper per iteration than GMRES (two matrix-vector products, no growing basis) but
    can break down; :func:`solve_gmres` is the robust choice. ``maxiter`` counts
    iterations (two products each).
    {args}
    Returns:
      ``x``, a pytree like ``b``.

    Example:
      >>> import torch
      >>> A = torch.tensor([[2., 1.], [-1., 3.]], dtype=torch.float64)
      >>> x = solve_bicgstab(lambda v: A @ v, torch.tensor([3., 2.], dtype=torch.float64),
      ...                    tol=1e-12)
      >>> torch.allclose(x, torch.tensor([1., 1.], dtype=torch.float64))
      True
    """
    pb = _Problem("solve_bicgstab", matvec, b, init, ridge, tol, atol, maxiter, on_failure)
    x = pb.x0
    r = pb.b - pb.matvec(x) if init is not None else pb.b.clone()
    rhat = r
    rho = alpha = omega = torch.ones((), dtype=r.dtype, device=r.device)
    v = p = torch.zeros_like(r)
    rnorm = torch.linalg.vector_norm(r)
    k = 0
    for k in range(pb.default_maxiter()):  # noqa: B007 - k is reported
        if pb.done(rnorm):
            break
        rho_new = _dot(rhat, r)
        beta = _safe_div(rho_new, rho) * _safe_div(alpha, omega)
        p = r + beta * (p - omega * v)
        v = pb.matvec(p)
        alpha = _safe_div(rho_new, _dot(rhat, v))
        s = r - alpha * v
        t = pb.matvec(s)
        omega = _safe_div(_dot(t, s), _dot(t, t))
        x = x + alpha * p + omega * s
        r = s - omega * t
        rho = rho_new
        rnorm = torch.linalg.vector_norm(r)
    else:
        k = pb.default_maxiter()
    return pb.finish(x, rnorm, k)


solve_bicgstab.__doc__ = (solve_bicgstab.__doc__ or "").format(args=_ARGS_DOC)

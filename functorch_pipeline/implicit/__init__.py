"""``fp.implicit``: implicit differentiation of inner problems and matrix-free linear solvers.

:func:`custom_root` differentiates the solution of an inner problem (a minimiser, a fixed
point, any root of an optimality condition) by the implicit function theorem instead of
unrolling the solver: memory and time of the backward pass do not depend on how many inner
steps were taken. The solvers solve ``A x = b`` for pytrees given only ``x -> A x``.
"""

from functorch_pipeline.implicit._linear_solve import ConvergenceError
from functorch_pipeline.implicit._linear_solve import ConvergenceWarning
from functorch_pipeline.implicit._linear_solve import solve_bicgstab
from functorch_pipeline.implicit._linear_solve import solve_cg
from functorch_pipeline.implicit._linear_solve import solve_gmres
from functorch_pipeline.implicit._linear_solve import solve_normal_cg
from functorch_pipeline.implicit._root import custom_root

__all__ = [
    "ConvergenceError",
    "ConvergenceWarning",
    "custom_root",
    "solve_bicgstab",
    "solve_cg",
    "solve_gmres",
    "solve_normal_cg",
]

"""JAX-signature transforms over ``torch.func``; all accept and return pytrees."""

from functorch_pipeline.transforms._autodiff import grad
from functorch_pipeline.transforms._autodiff import hessian
from functorch_pipeline.transforms._autodiff import hvp
from functorch_pipeline.transforms._autodiff import jacfwd
from functorch_pipeline.transforms._autodiff import jacobian
from functorch_pipeline.transforms._autodiff import jacrev
from functorch_pipeline.transforms._autodiff import jvp
from functorch_pipeline.transforms._autodiff import linear_transpose
from functorch_pipeline.transforms._autodiff import linearize
from functorch_pipeline.transforms._autodiff import value_and_grad
from functorch_pipeline.transforms._autodiff import vjp
from functorch_pipeline.transforms._clipped import clipped_grad
from functorch_pipeline.transforms._clipped import clipped_value_and_grad
from functorch_pipeline.transforms._clipped import per_sample_grad_norms
from functorch_pipeline.transforms._control import checkpoint
from functorch_pipeline.transforms._control import remat
from functorch_pipeline.transforms._control import scan
from functorch_pipeline.transforms._control_flow import cond
from functorch_pipeline.transforms._control_flow import fori_loop
from functorch_pipeline.transforms._control_flow import stop_gradient
from functorch_pipeline.transforms._control_flow import switch
from functorch_pipeline.transforms._control_flow import while_loop
from functorch_pipeline.transforms._custom_jvp import custom_jvp
from functorch_pipeline.transforms._custom_vjp import custom_vjp
from functorch_pipeline.transforms._eval_shape import ShapeDtypeStruct
from functorch_pipeline.transforms._eval_shape import eval_shape
from functorch_pipeline.transforms._grad_sample._kernel_choice import kernel_choices
from functorch_pipeline.transforms._grad_sample._kernel_choice import set_kernel_choices
from functorch_pipeline.transforms._jit import jit
from functorch_pipeline.transforms._per_sample import per_sample_grads
from functorch_pipeline.transforms._per_sample import per_sample_value_and_grad
from functorch_pipeline.transforms._vmap import vmap

__all__ = [
    "ShapeDtypeStruct",
    "checkpoint",
    "clipped_grad",
    "clipped_value_and_grad",
    "cond",
    "custom_jvp",
    "custom_vjp",
    "eval_shape",
    "fori_loop",
    "grad",
    "hessian",
    "hvp",
    "jacfwd",
    "jacobian",
    "jacrev",
    "jit",
    "jvp",
    "kernel_choices",
    "linear_transpose",
    "linearize",
    "per_sample_grad_norms",
    "per_sample_grads",
    "per_sample_value_and_grad",
    "remat",
    "scan",
    "set_kernel_choices",
    "stop_gradient",
    "switch",
    "value_and_grad",
    "vjp",
    "vmap",
    "while_loop",
]

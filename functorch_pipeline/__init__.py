"""functorch_pipeline: the JAX way of working for PyTorch.

Any ``nn.Module`` becomes a pure function over parameter pytrees; gradients,
per-sample gradients, optimizers, checkpoints and data all speak pytrees.

>>> import functorch_pipeline as fp
>>> fp.__version__
'0.1.0'
"""

from functorch_pipeline import data
from functorch_pipeline import devices
from functorch_pipeline import distributed
from functorch_pipeline import implicit
from functorch_pipeline import losses
from functorch_pipeline import nn
from functorch_pipeline import optim
from functorch_pipeline import privacy
from functorch_pipeline import random
from functorch_pipeline import serialization
from functorch_pipeline import train
from functorch_pipeline import transforms
from functorch_pipeline import tree
from functorch_pipeline._version import __version__
from functorch_pipeline.nn import functionalize
from functorch_pipeline.serialization import CheckpointError
from functorch_pipeline.serialization import load
from functorch_pipeline.serialization import save
from functorch_pipeline.train import TrainState
from functorch_pipeline.transforms import ShapeDtypeStruct
from functorch_pipeline.transforms import checkpoint
from functorch_pipeline.transforms import clipped_grad
from functorch_pipeline.transforms import clipped_value_and_grad
from functorch_pipeline.transforms import cond
from functorch_pipeline.transforms import custom_jvp
from functorch_pipeline.transforms import custom_vjp
from functorch_pipeline.transforms import eval_shape
from functorch_pipeline.transforms import fori_loop
from functorch_pipeline.transforms import grad
from functorch_pipeline.transforms import hessian
from functorch_pipeline.transforms import hvp
from functorch_pipeline.transforms import jacfwd
from functorch_pipeline.transforms import jacobian
from functorch_pipeline.transforms import jacrev
from functorch_pipeline.transforms import jit
from functorch_pipeline.transforms import jvp
from functorch_pipeline.transforms import linear_transpose
from functorch_pipeline.transforms import linearize
from functorch_pipeline.transforms import per_sample_grad_norms
from functorch_pipeline.transforms import per_sample_grads
from functorch_pipeline.transforms import per_sample_value_and_grad
from functorch_pipeline.transforms import remat
from functorch_pipeline.transforms import scan
from functorch_pipeline.transforms import stop_gradient
from functorch_pipeline.transforms import switch
from functorch_pipeline.transforms import value_and_grad
from functorch_pipeline.transforms import vjp
from functorch_pipeline.transforms import vmap
from functorch_pipeline.transforms import while_loop

__all__ = [
    "CheckpointError",
    "ShapeDtypeStruct",
    "TrainState",
    "__version__",
    "checkpoint",
    "clipped_grad",
    "clipped_value_and_grad",
    "cond",
    "custom_jvp",
    "custom_vjp",
    "data",
    "devices",
    "distributed",
    "eval_shape",
    "fori_loop",
    "functionalize",
    "grad",
    "hessian",
    "hvp",
    "implicit",
    "jacfwd",
    "jacobian",
    "jacrev",
    "jit",
    "jvp",
    "linear_transpose",
    "linearize",
    "load",
    "losses",
    "nn",
    "optim",
    "per_sample_grad_norms",
    "per_sample_grads",
    "per_sample_value_and_grad",
    "privacy",
    "random",
    "remat",
    "save",
    "scan",
    "serialization",
    "stop_gradient",
    "switch",
    "train",
    "transforms",
    "tree",
    "value_and_grad",
    "vjp",
    "vmap",
    "while_loop",
]

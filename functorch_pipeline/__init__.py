"""functorch_pipeline: the JAX way of working for PyTorch.

Any ``nn.Module`` becomes a pure function over parameter pytrees; gradients,
per-sample gradients, optimizers, checkpoints and data all speak pytrees.

>>> import functorch_pipeline as fp
>>> fp.__version__
'0.1.0'
"""

from functorch_pipeline import random
from functorch_pipeline import tree
from functorch_pipeline._version import __version__

__all__ = [
    "__version__",
    "random",
    "tree",
]

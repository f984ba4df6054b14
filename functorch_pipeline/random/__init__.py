"""Explicit random keys in JAX's style.

A key is a small ``int64`` tensor of shape ``(2,)`` holding two 32-bit words. Keys are
data: they are split and folded deterministically, they live on whatever device you put
them, and every draw is a pure function of the key. Nothing here reads or advances
PyTorch's global random state.

Draws (:func:`uniform`, :func:`normal`, :func:`bernoulli`, ...) are computed from the key
with a counter-based integer hash written in ordinary tensor operations, so they work
under ``vmap`` (a batch of keys gives a batch of independent draws), under ``grad`` and
under ``torch.compile``, with no host synchronisation. In plain eager code on CPU the
same hash runs on the host instead (Python integers for keys, NumPy for draws: the same
numbers, about twice as fast; the design note is in ``fp.random._host``). The JAX samplers
(:func:`categorical`, :func:`choice`, :func:`truncated_normal`, :func:`gumbel`,
:func:`exponential`, :func:`gamma`, :func:`beta`, :func:`dirichlet`,
:func:`multivariate_normal`) are built on them the same way (gamma's rejection step runs
a fixed number of proposal rounds at once), with JAX's signatures; ``PRNGKey`` is
:func:`key`. Samples carry no gradient to the distributions' parameters.

# NOTE [how keys map to torch.func's randomness modes]
``torch.func.vmap(randomness=...)`` controls what *PyTorch's global* generator does
inside ``vmap``: ``"error"`` forbids it, ``"same"`` draws one value for the whole batch,
``"different"`` draws per example. Explicit keys make that switch irrelevant: draws made
from a key never touch the global generator, so they are allowed under the default
``"error"`` mode. Passing one key (unbatched, ``in_axes=None``) gives the same draw to
every example, the analogue of ``"same"``; passing a batch of keys (``split(key, n)``
with ``in_axes=0``) gives each example its own reproducible draw, the analogue of
``"different"``.

The hash is not cryptographic: it is meant for dropout masks, noise and initialisation.
For code that must use PyTorch's own samplers (``nn.init``, ``torch.randn``),
:func:`generator` turns a key into a seeded ``torch.Generator`` (this reads the key on
the host, so do it outside ``vmap``/``compile``).
"""

from functorch_pipeline.random._core import bernoulli
from functorch_pipeline.random._core import bits
from functorch_pipeline.random._core import fold_in
from functorch_pipeline.random._core import generator
from functorch_pipeline.random._core import is_key
from functorch_pipeline.random._core import key
from functorch_pipeline.random._core import key_data
from functorch_pipeline.random._core import normal
from functorch_pipeline.random._core import permutation
from functorch_pipeline.random._core import randint
from functorch_pipeline.random._core import seed_from_key
from functorch_pipeline.random._core import split
from functorch_pipeline.random._core import uniform
from functorch_pipeline.random._distributions import PRNGKey
from functorch_pipeline.random._distributions import beta
from functorch_pipeline.random._distributions import categorical
from functorch_pipeline.random._distributions import choice
from functorch_pipeline.random._distributions import dirichlet
from functorch_pipeline.random._distributions import exponential
from functorch_pipeline.random._distributions import gamma
from functorch_pipeline.random._distributions import gumbel
from functorch_pipeline.random._distributions import multivariate_normal
from functorch_pipeline.random._distributions import truncated_normal

__all__ = [
    "PRNGKey",
    "bernoulli",
    "beta",
    "bits",
    "categorical",
    "choice",
    "dirichlet",
    "exponential",
    "fold_in",
    "gamma",
    "generator",
    "gumbel",
    "is_key",
    "key",
    "key_data",
    "multivariate_normal",
    "normal",
    "permutation",
    "randint",
    "seed_from_key",
    "split",
    "truncated_normal",
    "uniform",
]

"""``fp.privacy``: differential-privacy accounting for DP-SGD on Google's ``dp-accounting``.

- :func:`epsilon`: the epsilon of ``steps`` Poisson-sampled Gaussian steps (RDP or PLD).
- :func:`noise_multiplier_for`: the noise multiplier that meets an epsilon budget.
- :class:`Accountant`: the steps a run has taken (changing sigma or q allowed) as an
  immutable pytree that ``fp.save``/``fp.load`` keep, so a resumed run keeps its budget.

``dp-accounting`` is an optional extra, imported only when an epsilon is computed:
``pip install "functorch-pipeline[privacy]"``. Batches must be Poisson sampled for these
guarantees to hold: see ``fp.data.poisson_batches``.

Example: a DP-SGD run's bookkeeping (the gradient step itself is elided)::

    >>> import torch, functorch_pipeline as fp
    >>> data = (torch.randn(1000, 3), torch.randint(0, 2, (1000,)))
    >>> q, delta, epochs = 0.05, 1e-5, 2
    >>> sigma = fp.privacy.noise_multiplier_for(
    ...     target_epsilon=2.0, delta=delta, sample_rate=q, steps=epochs * round(1 / q))
    >>> acc, key = fp.privacy.Accountant("rdp"), fp.random.key(0)
    >>> for epoch in range(epochs):
    ...     for batch in fp.data.poisson_batches(data, q, key=fp.random.fold_in(key, epoch)):
    ...         pass  # clip per-example gradients, add noise of std sigma * C, update
    ...     acc = acc.step(noise_multiplier=sigma, sample_rate=q, steps=round(1 / q))
    >>> acc.steps, 1.98 <= acc.epsilon(delta) <= 2.0
    (40, True)
"""

from functorch_pipeline.privacy._accountant import Accountant
from functorch_pipeline.privacy._accounting import epsilon
from functorch_pipeline.privacy._accounting import noise_multiplier_for
from functorch_pipeline.privacy._backend import PLD_DISCRETIZATION
from functorch_pipeline.privacy._backend import PLD_MIN_NOISE_MULTIPLIER
from functorch_pipeline.privacy._backend import DpStep

__all__ = [
    "PLD_DISCRETIZATION",
    "PLD_MIN_NOISE_MULTIPLIER",
    "Accountant",
    "DpStep",
    "epsilon",
    "noise_multiplier_for",
]

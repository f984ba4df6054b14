"""``fp.privacy``: differential-privacy accounting for DP-SGD on Google's ``dp-accounting``.

- :func:`epsilon`: the epsilon of ``steps`` Poisson-sampled Gaussian steps (RDP or PLD).
- :func:`noise_multiplier_for`: the noise multiplier that meets an epsilon budget.
- :class:`Accountant`: the steps a run has taken (changing sigma or q allowed) as an
  immutable pytree that ``fp.save``/``fp.load`` keep, so a resumed run keeps its budget.

``dp-accounting`` is an optional extra, imported only when an epsilon is computed:
``pip install "functorch-pipeline[privacy]"``. Batches must be Poisson sampled for these
guarantees to hold: see ``fp.data.poisson_batches``.
"""

from functorch_pipeline.privacy._accountant import Accountant
from functorch_pipeline.privacy._accounting import epsilon
from functorch_pipeline.privacy._accounting import noise_multiplier_for
from functorch_pipeline.privacy._backend import PLD_DISCRETIZATION
from functorch_pipeline.privacy._backend import DpStep

__all__ = [
    "PLD_DISCRETIZATION",
    "Accountant",
    "DpStep",
    "epsilon",
    "noise_multiplier_for",
]

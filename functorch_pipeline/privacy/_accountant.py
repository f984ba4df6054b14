"""``Accountant``: the privacy budget a training run has spent, as a checkpointable pytree."""

from __future__ import annotations

import dataclasses
import math
from typing import Any

from functorch_pipeline import tree as _tree
from functorch_pipeline.privacy._backend import DpStep
from functorch_pipeline.privacy._backend import check_accountant
from functorch_pipeline.privacy._backend import check_delta
from functorch_pipeline.privacy._backend import check_noise_multiplier
from functorch_pipeline.privacy._backend import check_sample_rate
from functorch_pipeline.privacy._backend import check_steps
from functorch_pipeline.privacy._backend import history_delta
from functorch_pipeline.privacy._backend import history_epsilon
from functorch_pipeline.privacy._backend import real_number

__all__ = ["Accountant"]


@_tree.register_dataclass(meta_fields=("kind",))
@dataclasses.dataclass(frozen=True)
class Accountant:
    """The DP-SGD steps a run has taken, and the epsilon (or delta) they spend.

    Immutable, like every state in this library: :meth:`step` returns a NEW accountant,
    so write ``acc = acc.step(...)`` (a bare ``acc.step(...)`` records nothing). Steps may
    change the noise multiplier or the sample rate (schedules, a resumed run with new
    settings); the history is kept run-length encoded, one :class:`DpStep` per stretch of
    equal settings, and the whole history is composed when epsilon is asked for (see
    NOTE [composition cost]). One step is one noisy update of a Poisson-sampled logical
    batch, however many physical chunks it was computed in.

    Opacus's ``RDPAccountant``/``PRVAccountant`` have the same ``step(noise_multiplier=,
    sample_rate=)`` but mutate themselves, and their ``get_epsilon(delta)`` is our
    :meth:`epsilon`; here the accountant is a value (JAX style), so it can live in a
    training state that is checkpointed and resumed exactly.

    # NOTE [accountant as a pytree]
    The accountant is a registered dataclass whose leaves are Python numbers (the
    ``noise_multiplier``, ``sample_rate`` and ``count`` of each ``DpStep``) and whose
    ``kind`` is static, so ``fp.save``/``fp.load`` store it exactly (floats as hex) and
    rebuild it without ``like=``, alone or inside a larger training state; device moves
    and dtype casts (``fp.tree.to``) leave it alone. Its tree structure grows with the
    history, so load it without ``like=`` (or with a template of the same history).

    A step taken WITHOUT noise (``noise_multiplier=0``: an exact gradient is released) is
    recorded with :meth:`step_without_noise`; from then on no guarantee holds, and
    :meth:`epsilon` is ``inf`` and :meth:`delta` is ``1.0`` (NOTE [steps without noise]).

    Args:
      kind: ``"rdp"`` (Renyi DP) or ``"pld"`` (privacy loss distributions, tighter; the
        smaller of its bound and RDP's, as in :func:`~functorch_pipeline.privacy.epsilon`).
      history: ``DpStep``s already taken (normally left empty and grown with :meth:`step`
        and :meth:`step_without_noise`; a ``DpStep`` with ``noise_multiplier=0.0`` is a
        step without noise).

    Notes:
      NOTE [composition cost]: steps with equal ``(sigma, q)`` are merged and each distinct setting
        is composed once with its count, so the cost grows with the number of distinct settings, not
        of steps.
      NOTE [steps without noise]: a noise-free step is kept in the history as a ``DpStep`` with
        ``noise_multiplier=0.0`` (so ``steps`` counts it, and checkpoints, old ones included, keep
        their layout); any such step with a count > 0 makes ``epsilon(delta)`` ``inf`` and
        ``delta(epsilon)`` ``1.0`` for every finite epsilon: the accountant claims nothing.

    Examples:
      >>> acc = Accountant("rdp")
      >>> acc = acc.step(noise_multiplier=1.1, sample_rate=0.004, steps=7500)
      >>> acc = acc.step(noise_multiplier=1.1, sample_rate=0.004, steps=7500)
      >>> acc.history
      (DpStep(noise_multiplier=1.1, sample_rate=0.004, count=15000),)
      >>> round(acc.epsilon(1e-5), 2), acc.steps
      (2.5, 15000)
      >>> acc.delta(3.0) < 1e-5
      True
    """

    kind: str = "rdp"
    history: tuple[DpStep, ...] = ()

    def __post_init__(self) -> None:
        where = "Accountant"
        check_accountant(where, self.kind, "kind")
        if not isinstance(self.history, (tuple, list)):
            raise TypeError(f"{where}: `history` must be a tuple of DpStep, got {self.history!r}")
        steps = tuple(_as_step(where, s) for s in self.history)
        object.__setattr__(self, "history", steps)

    @property
    def steps(self) -> int:
        """The number of steps taken.

        >>> Accountant().step(noise_multiplier=1.0, sample_rate=0.5, steps=3).steps
        3
        """
        return sum(s.count for s in self.history)

    def step(self, *, noise_multiplier: float, sample_rate: float, steps: int = 1) -> Accountant:
        """An accountant that has also taken ``steps`` steps with these settings.

        Args:
          noise_multiplier: sigma of these steps, > 0.
          sample_rate: q of these steps, in (0, 1].
          steps: how many, >= 0.

        Returns:
          A new ``Accountant``; ``self`` is unchanged.

        >>> a = Accountant("pld")
        >>> b = a.step(noise_multiplier=1.0, sample_rate=0.01)
        >>> a.steps, b.steps
        (0, 1)
        """
        where = "Accountant.step"
        try:
            sigma = check_noise_multiplier(where, noise_multiplier)
        except ValueError as e:
            if noise_multiplier == 0:
                raise ValueError(f"{e}; a step without noise (not private) is recorded with "
                                 "Accountant.step_without_noise") from None
            raise
        new = DpStep(sigma, check_sample_rate(where, sample_rate), check_steps(where, steps))
        return self._append(new)

    def step_without_noise(self, *, sample_rate: float, steps: int = 1) -> Accountant:
        """An accountant that has also taken ``steps`` steps WITHOUT noise (sigma = 0).

        # NOTE [steps without noise]
        A DP-SGD step with ``noise_multiplier=0`` releases the exact (clipped) gradient
        sum, so a run that takes one has no (epsilon, delta)-DP guarantee, however much
        noise its other steps add. :meth:`step` (like ``fp.privacy.epsilon``) refuses
        sigma = 0, so a non-private warm-up is not mistaken for a private one; this method
        records such steps on purpose, as a ``DpStep(0.0, sample_rate, steps)`` in the
        history (no new field: checkpoints keep their layout and old ones load as
        before). From the first such step on, :meth:`epsilon` is ``inf`` and
        :meth:`delta` is ``1.0`` for every finite epsilon (at ``epsilon = inf`` it stays
        0.0, as for any history). ``fp.train.DPTrainer`` calls it for each step of a
        trainer with ``noise_multiplier=0``. These are trivial bounds, always valid: the
        accountant makes no claim for such a run (one could bound delta by the chance that
        an example was ever sampled in a noise-free step; it does not try).

        Args:
          sample_rate: q of these steps, in (0, 1] (kept in the history for the record).
          steps: how many, >= 0.

        Returns:
          A new ``Accountant``; ``self`` is unchanged.

        >>> a = Accountant().step(noise_multiplier=1.1, sample_rate=0.01, steps=100)
        >>> b = a.step_without_noise(sample_rate=0.01)
        >>> b.steps, b.epsilon(1e-5), b.delta(2.0)
        (101, inf, 1.0)
        """
        where = "Accountant.step_without_noise"
        new = DpStep(0.0, check_sample_rate(where, sample_rate), check_steps(where, steps))
        return self._append(new)

    def _append(self, new: DpStep) -> Accountant:
        if new.count == 0:
            return self
        hist = self.history
        if hist and hist[-1][:2] == new[:2]:
            hist = (*hist[:-1], hist[-1]._replace(count=hist[-1].count + new.count))
        else:
            hist = (*hist, new)
        return dataclasses.replace(self, history=hist)

    def epsilon(self, delta: float) -> float:
        """The epsilon spent so far at this ``delta`` (0.0 before any step, ``inf`` after a
        step without noise: see :meth:`step_without_noise`).

        Args:
          delta: in (0, 1).

        Returns:
          epsilon as a Python float.

        >>> Accountant().epsilon(1e-5)
        0.0
        """
        where = "Accountant.epsilon"
        d = check_delta(where, delta)
        if not self.history:
            return 0.0
        history = self._checked(where)
        if _noise_free(history):
            return math.inf
        return history_epsilon(self.kind, history, d, where)

    def delta(self, epsilon: float) -> float:
        """The delta spent so far at this ``epsilon`` (0.0 before any step, 1.0 at a finite
        ``epsilon`` after a step without noise: see :meth:`step_without_noise`).

        Args:
          epsilon: >= 0.

        Returns:
          delta as a Python float.

        >>> a = Accountant().step(noise_multiplier=1.3, sample_rate=0.004, steps=3750)
        >>> a.delta(1.0) < 1e-5 < a.delta(0.5)
        True
        """
        where = "Accountant.delta"
        epsilon = real_number(where, "epsilon", epsilon)
        if not epsilon >= 0:
            raise ValueError(f"{where}: `epsilon` must be >= 0, got {epsilon!r}")
        if not self.history:
            return 0.0
        if math.isinf(epsilon):
            return 0.0
        history = self._checked(where)
        if _noise_free(history):
            return 1.0
        return history_delta(self.kind, history, float(epsilon), where)

    def _checked(self, where: str) -> tuple[DpStep, ...]:
        # An accountant rebuilt by fp.load (or any pytree unflatten) skips __post_init__:
        # check again here, where a corrupt value would otherwise reach dp-accounting.
        check_accountant(where, self.kind, "kind")
        return tuple(_as_step(where, s) for s in self.history)


def _noise_free(history: tuple[DpStep, ...]) -> bool:
    """Whether a step without noise was taken (see ``Accountant.step_without_noise``)."""
    return any(s.noise_multiplier == 0.0 and s.count > 0 for s in history)


def _as_step(where: str, s: Any) -> DpStep:
    if not isinstance(s, tuple) or len(s) != 3:
        raise TypeError(f"{where}: each `history` entry must be a DpStep, got {s!r}")
    sigma = s[0]
    if isinstance(sigma, (int, float)) and not isinstance(sigma, bool) and sigma == 0:
        sigma = 0.0  # a step without noise (Accountant.step_without_noise)
    else:
        sigma = check_noise_multiplier(where, sigma)
    return DpStep(sigma, check_sample_rate(where, s[1]), check_steps(where, s[2]))

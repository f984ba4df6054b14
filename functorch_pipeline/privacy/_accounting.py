"""One-shot accounting for DP-SGD: epsilon of a run, and the noise for a target epsilon."""

from __future__ import annotations

import math
from typing import Any

from functorch_pipeline.privacy._backend import PLD_FLOOR_WHY
from functorch_pipeline.privacy._backend import PLD_MIN_NOISE_MULTIPLIER
from functorch_pipeline.privacy._backend import DpStep
from functorch_pipeline.privacy._backend import PldTooLarge
from functorch_pipeline.privacy._backend import check_accountant
from functorch_pipeline.privacy._backend import check_delta
from functorch_pipeline.privacy._backend import check_noise_multiplier
from functorch_pipeline.privacy._backend import check_sample_rate
from functorch_pipeline.privacy._backend import check_steps
from functorch_pipeline.privacy._backend import history_epsilon
from functorch_pipeline.privacy._backend import real_number
from functorch_pipeline.privacy._backend import require_dp_accounting

__all__ = ["epsilon", "noise_multiplier_for"]

# Calibration never goes past this noise multiplier (eps at sigma = 1e4 is ~1e-4 of eps at
# sigma = 1 for these mechanisms; past it only the accountant's floor remains).
_MAX_NOISE_MULTIPLIER = 2.0**14
# Nor below this one: a target met there is met by no meaningful noise at all (epsilon in
# the millions on Opacus's MNIST settings); the search toward 1e-160 took 74 s and ended
# in dp-accounting's ZeroDivisionError.
_MIN_NOISE_MULTIPLIER = 2.0**-12


def _epsilon(kind: str, sigma: float, q: float, steps: int, delta: float, where: str) -> float:
    if steps == 0:
        return 0.0
    return history_epsilon(kind, (DpStep(sigma, q, steps),), delta, where)


def epsilon(
    *,
    noise_multiplier: float,
    sample_rate: float,
    steps: int,
    delta: float,
    accountant: str = "rdp",
) -> float:
    """The epsilon spent by ``steps`` DP-SGD steps with Poisson sampling.

    Each step is a Poisson-subsampled Gaussian mechanism: every example joins the batch
    independently with probability ``sample_rate`` (see ``fp.data.poisson_batches``), and
    the sum of per-example gradients clipped to ``C`` gets Gaussian noise of standard
    deviation ``noise_multiplier * C``. Neighbouring datasets differ by adding or removing
    one example. Computed with Google's ``dp-accounting`` (Opacus's ``RDPAccountant`` and
    ``PRVAccountant`` answer the same question): ``"rdp"`` (Renyi DP, a fast upper bound)
    or ``"pld"`` (privacy loss distributions, a tighter upper bound, slower; both are
    upper bounds, so ``"pld"`` reports RDP's epsilon where that is the smaller: at very
    small per-step losses, where PLD's fixed discretisation is coarse, and below delta
    ~1e-15, where its truncated tail makes it infinite); see NOTE [neighbouring relation
    and orders].

    Args:
      noise_multiplier: sigma, the noise standard deviation over the clipping norm; > 0.
      sample_rate: q, the probability each example is in a batch, in (0, 1]
        (expected batch size over dataset size).
      steps: the number of steps, >= 0.
      delta: the delta of (epsilon, delta)-DP, in (0, 1); usually below 1 / dataset size.
      accountant: ``"rdp"`` or ``"pld"``.

    Returns:
      epsilon as a Python float: ``inf`` when no finite epsilon has this delta, ``0.0``
      when epsilon 0 already has it (the accountant's delta at epsilon 0 is at most
      ``delta``: tiny sample rates, large noise or a large delta; NOTE [the tighter
      bound]).

    Raises:
      ValueError: an argument is out of range (the message names it), or ``"pld"`` would
        need a loss distribution too large to hold (NOTE [PLD size guard]: full-batch
        runs of very many steps; use ``"rdp"``).
      ImportError: ``dp-accounting`` is not installed.

    Notes:
      NOTE [neighbouring relation and orders]: as in dp-accounting and Opacus: add-or-remove-one
        neighbouring datasets, each step a Poisson-subsampled Gaussian mechanism, and
        dp-accounting's default RDP orders and RDP-to-(eps, delta) conversion.
      NOTE [the tighter bound]: ``"pld"`` reports the smaller of PLD's and RDP's epsilon (both
        are upper bounds). An epsilon of 0 from either is reported as 0: dp-accounting returns it
        when delta already bounds the run's total variation distance (RDP's KL branch,
        delta^2 > 1 - exp(-rdp); PLD's delta at epsilon 0 below delta). RDP orders whose value
        dp-accounting could not compute (NaN from overflow near sigma = 1e-160, slightly negative
        from rounding at tiny q) are left out of the conversion, which only loosens the bound;
        with none left epsilon is inf.
      NOTE [PLD size guard]: PLD's composed loss distribution is one array whose length
        dp-accounting sets from a Chernoff bound; it is estimated before composing (on a coarser
        copy, ~15 ms) and a history needing more than ``2**24`` entries (~1.2-1.9 GB) is refused
        with a ValueError suggesting ``"rdp"`` (full-batch runs of many steps: sigma 0.5, q 1 and
        1e7 steps asked numpy for 69.6 GiB; every refused setting measured has epsilon in the
        hundreds or more).

    Example:
      Opacus's MNIST example (q = 240 / 60000, sigma = 1.1, 60 epochs, delta = 1e-5):

      >>> round(epsilon(noise_multiplier=1.1, sample_rate=0.004, steps=15000, delta=1e-5), 2)
      2.5
      >>> epsilon(noise_multiplier=1.1, sample_rate=0.004, steps=15000, delta=1e-5,
      ...         accountant="pld") < 2.5
      True

      A tiny sample rate (10 examples a batch out of 10 million) and seven steps:
      ``delta`` already bounds the whole run's total variation, so epsilon is 0:

      >>> epsilon(noise_multiplier=1.0, sample_rate=1e-6, steps=7, delta=1e-5)
      0.0
    """
    where = "epsilon"
    sigma = check_noise_multiplier(where, noise_multiplier)
    q = check_sample_rate(where, sample_rate)
    n = check_steps(where, steps)
    d = check_delta(where, delta)
    kind = check_accountant(where, accountant)
    return _epsilon(kind, sigma, q, n, d, where)


def noise_multiplier_for(
    *,
    target_epsilon: float,
    delta: float,
    sample_rate: float,
    steps: int,
    accountant: str = "rdp",
    epsilon_tolerance: float = 0.01,
) -> float:
    """The smallest noise multiplier (to a tolerance) whose epsilon is <= ``target_epsilon``.

    Like Opacus's ``get_noise_multiplier``: doubles sigma until the budget is met, then
    bisects. The returned sigma always satisfies ``epsilon(sigma) <= target_epsilon``, and
    ``epsilon(sigma) >= target_epsilon - epsilon_tolerance`` unless the bisection bracket
    became narrower than ``1e-6 * sigma`` first, as it does where epsilon jumps to 0
    (RDP's conversion drops from 0.17 to 0 at sigma 0.9977 for q = 0.01, one step and
    delta = 0.01: a target of 0.02 gets 0.9977, where Opacus's conversion, which has no
    such branch, needs 1.72). Each probe composes the whole run: a few milliseconds with
    RDP, 0.1-0.5 s with PLD for thousands of steps.

    Args:
      target_epsilon: the budget, > 0.
      delta: in (0, 1).
      sample_rate: q in (0, 1].
      steps: the number of steps, >= 1.
      accountant: ``"rdp"`` or ``"pld"``.
      epsilon_tolerance: how far below the target the result's epsilon may be, > 0; at
        most 1% of the target is used.

    Returns:
      sigma as a Python float.

    Raises:
      ValueError: an argument is out of range, or the target cannot be reached with
        sigma <= 2**14, the search's limit (the message states the epsilon at that limit,
        the smallest in the range searched; epsilon keeps falling with sigma beyond it:
        RDP's near a floor of ~0.0035 at delta = 1e-5 and q = 1 until it drops to 0, at
        sigma ~1e5 for one step, when delta bounds the run's total variation).
      ImportError: ``dp-accounting`` is not installed.

    Example:
      >>> sigma = noise_multiplier_for(target_epsilon=1.19, delta=1e-5, sample_rate=0.004,
      ...                              steps=3750)
      >>> round(sigma, 1), epsilon(noise_multiplier=sigma, sample_rate=0.004, steps=3750,
      ...                          delta=1e-5) <= 1.19
      (1.1, True)
    """
    where = "noise_multiplier_for"
    target = _positive(where, "target_epsilon", target_epsilon)
    # at most 1% of the target: 0.01 alone stopped at +44% of the sigma a target of 0.01 needs
    tol = min(_positive(where, "epsilon_tolerance", epsilon_tolerance), 0.01 * target)
    d = check_delta(where, delta)
    q = check_sample_rate(where, sample_rate)
    n = check_steps(where, steps)
    if n == 0:
        raise ValueError(f"{where}: `steps` must be >= 1 (zero steps spend no budget), got 0")
    kind = check_accountant(where, accountant)
    require_dp_accounting(where)

    def eps(sigma: float) -> float:
        try:
            return _epsilon(kind, sigma, q, n, d, where)
        except PldTooLarge:  # NOTE [PLD size guard]: epsilon in the hundreds there,
            return math.inf  # far above any budget worth calibrating

    # NOTE [PLD calibration starts from RDP]
    # A PLD probe costs 0.1-0.5 s and more at small sigma (a wider loss distribution), RDP
    # a few ms. PLD is the tighter bound, so RDP's sigma (found first, cheaply) nearly
    # always meets the budget under PLD, and the PLD answer lies a few percent below it
    # (5-8% on the MNIST settings): searching [0.8 sigma_rdp, sigma_rdp] takes ~4 PLD
    # probes where bisection from [0, 1] takes ~10.
    # Every bracket end is verified, so the result's PLD epsilon is <= target regardless.
    def rdp_eps(sigma: float) -> float:
        return _epsilon("rdp", sigma, q, n, d, where)

    if rdp_eps(_MIN_NOISE_MULTIPLIER) <= target:  # RDP's is the larger: PLD's is met too
        raise ValueError(
            f"{where}: `target_epsilon`={target_epsilon!r} is met at every noise multiplier "
            f"down to {_MIN_NOISE_MULTIPLIER:g}, the search's lower limit (epsilon there is "
            f"{rdp_eps(_MIN_NOISE_MULTIPLIER):.6g}): no noise worth calibrating gives that "
            "budget; set noise_multiplier yourself")
    low, high = _MIN_NOISE_MULTIPLIER, 1.0
    if kind == "pld":
        floor, sigma_rdp = PLD_MIN_NOISE_MULTIPLIER, None
        try:
            sigma_rdp = _search(rdp_eps, target, tol / 4, _MIN_NOISE_MULTIPLIER, 1.0)
            low, high = 0.8 * sigma_rdp, sigma_rdp
        except _Unreachable:  # PLD's floor is lower than RDP's: search from scratch
            pass
        while low > floor and eps(low) <= target:  # keep eps(low) > target, as _search assumes
            low, high = max(0.8 * low, floor), low
        if low <= floor:  # NOTE [PLD at small noise]: no probe below PLD's floor
            if eps(floor) <= target:
                rdp = "" if sigma_rdp is None else f"; accountant='rdp' gives {sigma_rdp:.6g}"
                raise ValueError(
                    f"{where}: `target_epsilon`={target_epsilon!r} is met below noise_multiplier "
                    f"{floor:g}, under which PLD accounting is refused ({PLD_FLOOR_WHY}){rdp}")
            low, high = floor, max(high, floor)
    try:
        return _search(eps, target, tol, low, high)
    except _Unreachable:
        best = eps(_MAX_NOISE_MULTIPLIER)
        raise ValueError(
            f"{where}: `target_epsilon`={target_epsilon!r} is unreachable with "
            f"accountant={kind!r} (delta={d!r}, sample_rate={q!r}, steps={n}) for a noise "
            f"multiplier up to {_MAX_NOISE_MULTIPLIER:g}, the search's limit: the best "
            f"reachable epsilon there is {best:.6g}, at noise_multiplier="
            f"{_MAX_NOISE_MULTIPLIER:g} (a larger one may spend less: fp.privacy.epsilon "
            "computes any)"
        ) from None


class _Unreachable(Exception):
    pass


def _search(eps: Any, target: float, tol: float, low: float, high: float) -> float:
    """Bracketed search for sigma in (low, high] with eps(sigma) in [target - tol, target];
    ``eps(low) > target`` is assumed (low = 0 stands for infinite epsilon).

    Probes interpolate log(epsilon) linearly in sigma between the bracket ends (epsilon
    falls roughly exponentially in sigma here), kept inside the middle 80% of the bracket
    so that it shrinks by at least 10% a probe; plain bisection while an end is infinite.
    """
    e_high = eps(high)
    while e_high > target:
        if high >= _MAX_NOISE_MULTIPLIER:
            raise _Unreachable
        low, high = high, min(2.0 * high, _MAX_NOISE_MULTIPLIER)
        e_high = eps(high)
    e_low = eps(low) if low > 0 else math.inf
    while target - e_high > tol and high - low > 1e-6 * high:
        w = high - low
        mid = 0.5 * (low + high)
        if math.isfinite(e_low) and e_high > 0:
            # log(eps) is linear between the ends: where does it cross log(target)?
            t = (math.log(e_low) - math.log(target - tol / 2)) / (
                math.log(e_low) - math.log(e_high)
            )
            mid = low + min(max(t, 0.1), 0.9) * w
        e_mid = eps(mid)
        if e_mid <= target:
            high, e_high = mid, e_mid
        else:
            low, e_low = mid, e_mid
    return high


def _positive(where: str, name: str, value: object) -> float:
    v = real_number(where, name, value)
    if not (v > 0 and math.isfinite(v)):
        raise ValueError(f"{where}: `{name}` must be a finite number > 0, got {value!r}")
    return v

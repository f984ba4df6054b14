"""The bridge to Google's ``dp-accounting``: a lazy import, argument checks, and the
composed accountant for a run-length-encoded history of DP-SGD steps.

# NOTE [lazy dp-accounting]
``dp-accounting`` (and the scipy it pulls in) is an optional extra: importing
``functorch_pipeline`` must not import it, and a user without it gets an ImportError that
says which extra to install, raised only when an epsilon is actually computed.

# NOTE [neighbouring relation and orders]
Both accountants use dp-accounting's defaults, which are also Opacus's: add-or-remove-one
neighbouring datasets, each step a Poisson-subsampled Gaussian mechanism
(``PoissonSampledDpEvent(q, GaussianDpEvent(sigma))``). RDP uses dp-accounting's default
orders (Opacus's list plus 11 and 128..1024; identical figures on the published MNIST
settings) and its RDP-to-(eps, delta) conversion (Balle et al. 2020, the one Opacus >= 1.0
uses too). PLD discretises the privacy loss pessimistically with interval
``PLD_DISCRETIZATION`` (1e-4): its epsilon is an upper bound, within ~1e-3 of the exact
value on the MNIST settings, at 0.1-0.5 s for 3750-11250 steps (self-composition by FFT).
The interval is fixed, so the bound loosens where one step's privacy loss is not much
larger than it, i.e. at very small sampling rates (it stays a valid upper bound, and
``"pld"`` reports RDP's where that is smaller: NOTE [the tighter bound]). Measured
against dp-accounting with finer intervals (dp-accounting 0.6): +0.05% at sigma = 1,
q = 1e-3 (30,000 steps); +2% at sigma = 0.8, q = 1e-4 (1e5 steps) and at
sigma = 5, q = 1e-3; +70% at sigma = 0.8, q = 1e-5 (1e6 steps, delta = 1e-8: 0.153
against 0.090). Finer intervals are not a safe automatic default: on that last setting
2e-6 took 2.9 GB and 11 s and returned 2.96, so ``PLD_DISCRETIZATION`` stays fixed.
"""

from __future__ import annotations

import functools
import logging
import math
import numbers
from collections.abc import Callable
from typing import Any
from typing import NamedTuple

import torch

from functorch_pipeline._extras import require_extra

__all__ = [
    "ACCOUNTANTS",
    "PLD_DISCRETIZATION",
    "PLD_MAX_ENTRIES",
    "PLD_MIN_NOISE_MULTIPLIER",
    "DpStep",
    "PldTooLarge",
    "check_accountant",
    "check_delta",
    "check_noise_multiplier",
    "check_sample_rate",
    "check_steps",
    "composed",
    "history_delta",
    "history_epsilon",
    "real_number",
    "require_dp_accounting",
]

ACCOUNTANTS = ("rdp", "pld")
PLD_DISCRETIZATION = 1e-4
PLD_MIN_NOISE_MULTIPLIER = 0.1  # NOTE [PLD at small noise]
PLD_MAX_STEPS = 10**7
PLD_MAX_ENTRIES = 2**24  # NOTE [PLD size guard]
# NOTE [huge noise]: dp-accounting squares sigma, which overflows past ~1.3e154
SIGMA_CAP = 1e100
PLD_FLOOR_WHY = ("its loss distribution widens as 1/sigma^2 (minutes below 0.1, terabytes "
                 "near 1e-4)")


class DpStep(NamedTuple):
    """``count`` DP-SGD steps with one noise multiplier and one sample rate.

    An :class:`~functorch_pipeline.privacy.Accountant`'s history is a tuple of these, with
    consecutive equal settings merged (run-length encoded).

    >>> DpStep(noise_multiplier=1.1, sample_rate=0.004, count=250).count
    250
    """

    noise_multiplier: float
    sample_rate: float
    count: int


def require_dp_accounting(where: str) -> Any:
    """Import ``dp_accounting`` or raise an ImportError naming the extra to install (or,
    when it is installed but one of its own dependencies is missing, naming that one)."""
    try:
        return require_extra("dp_accounting", where, "privacy accounting",
                             "Google's `dp-accounting` package", "privacy")
    except ImportError as e:
        cause = e.__cause__
        missing = getattr(cause, "name", None) or ""
        if missing and missing.split(".")[0] != "dp_accounting":
            raise ImportError(
                f"{where}: privacy accounting needs Google's `dp-accounting` package, which is "
                f"installed but cannot be imported: its dependency `{missing}` is missing "
                f"({cause}); reinstall it with the extra: "
                '`pip install "functorch-pipeline[privacy]"`') from cause
        raise


def real_number(where: str, name: str, value: Any) -> float:
    """``value`` (a real number, or a one-element real tensor) as a float; bools and bool
    tensors are refused, and a value too large for a float is a ValueError naming it."""
    if isinstance(value, torch.Tensor) and value.numel() == 1 and not (
            value.is_complex() or value.dtype == torch.bool):
        return float(value)  # accounting runs on the host: one read is fine here
    if isinstance(value, bool) or not isinstance(value, numbers.Real):
        raise TypeError(f"{where}: `{name}` must be a real number, got {type(value).__name__}"
                        + (f" of dtype {value.dtype}" if isinstance(value, torch.Tensor) else ""))
    try:
        return float(value)
    except OverflowError:
        raise ValueError(f"{where}: `{name}` is too large for a float, got {value!r}") from None


def check_noise_multiplier(where: str, value: Any) -> float:
    sigma = real_number(where, "noise_multiplier", value)
    if not (sigma > 0 and math.isfinite(sigma)):
        raise ValueError(f"{where}: `noise_multiplier` must be a finite number > 0, got {value!r}")
    return sigma


def check_sample_rate(where: str, value: Any) -> float:
    q = real_number(where, "sample_rate", value)
    if not 0 < q <= 1:
        raise ValueError(f"{where}: `sample_rate` must be in (0, 1], got {value!r}")
    return q


def check_delta(where: str, value: Any) -> float:
    d = real_number(where, "delta", value)
    if not 0 < d < 1:
        raise ValueError(f"{where}: `delta` must be in (0, 1), got {value!r}")
    return d


def check_steps(where: str, value: Any) -> int:
    if isinstance(value, torch.Tensor) and value.numel() == 1 and not (
            value.is_floating_point() or value.is_complex() or value.dtype == torch.bool):
        value = int(value)
    if isinstance(value, bool) or not isinstance(value, numbers.Integral):
        raise TypeError(f"{where}: `steps` must be an int, got {type(value).__name__}")
    if value < 0:
        raise ValueError(f"{where}: `steps` must be >= 0, got {value!r}")
    return int(value)


def check_accountant(where: str, value: Any, name: str = "accountant") -> str:
    if not isinstance(value, str) or value not in ACCOUNTANTS:
        raise ValueError(f"{where}: `{name}` must be 'rdp' or 'pld', got {value!r}")
    return value


def composed(kind: str, history: tuple[DpStep, ...], where: str) -> Any:
    """A dp-accounting accountant with every step of ``history`` composed.

    # NOTE [composition cost]
    Composition is commutative, so steps with equal ``(sigma, q)`` are merged wherever they
    are in the history (first-appearance order, so the result is a pure function of the
    history) and each distinct setting is composed once, with its count: RDP multiplies
    one RDP curve (~5-20 ms), PLD self-composes one distribution by FFT (0.1-0.5 s).
    The cost grows with the number of DISTINCT settings, not of steps: a sigma changed
    every epoch is cheap; one changed every step makes each epsilon cost seconds (RDP)
    to minutes (PLD). The result is cached on ``(kind, merged history)``, so asking for
    epsilon, then delta, composes once.

    # NOTE [huge noise]
    dp-accounting squares the noise multiplier, which overflows past ~1.3e154 (an
    OverflowError, once reported as epsilon inf for the most private of runs), and its
    RDP at q < 1 is rounding noise long before that. A noise multiplier above
    ``SIGMA_CAP`` (1e100) is accounted as ``SIGMA_CAP``: more noise is a post-processing
    of less (add independent N(0, s'^2 - s^2) noise), so its epsilon is at most the
    capped one's, which is 0 or below 1e-190 for every sample rate and step count tried.
    """
    require_dp_accounting(where)
    counts: dict[tuple[float, float], int] = {}
    for s in history:
        key = (min(s.noise_multiplier, SIGMA_CAP), s.sample_rate)  # NOTE [huge noise]
        counts[key] = counts.get(key, 0) + s.count
    merged = tuple(DpStep(sigma, q, c) for (sigma, q), c in counts.items() if c > 0)
    low = [st.noise_multiplier for st in merged if st.noise_multiplier < PLD_MIN_NOISE_MULTIPLIER]
    if kind == "pld" and low:
        raise ValueError(pld_floor_message(where, min(low)))
    total = sum(st.count for st in merged)
    if kind == "pld" and total > PLD_MAX_STEPS:
        # the composed distribution widens with the steps: ~0.9 GB and 7 s at 1e7 steps
        # (sigma 1, q 0.004); 1e9 asked numpy for 4.6 GiB, 2**64 failed inside its FFT
        raise ValueError(f"{where}: PLD accounting composes at most {PLD_MAX_STEPS:g} steps "
                         f"(its distribution grows with them: ~1 GB at that many), got "
                         f"`steps`={total}; use accountant='rdp'")
    if kind == "pld":
        _check_pld_size(merged, where)
    return _composed(kind, merged)


class PldTooLarge(ValueError):
    """PLD accounting refused because its loss distribution would be too large
    (NOTE [PLD size guard]); a ValueError, so callers need not know this class."""


def _check_pld_size(merged: tuple[DpStep, ...], where: str) -> None:
    """Raise :class:`PldTooLarge` when the composed PLD of ``merged`` would hold more
    than ``PLD_MAX_ENTRIES`` entries.

    # NOTE [PLD size guard]
    dp-accounting self-composes a step's discretised loss distribution by FFT into one
    array whose length it sets with a Chernoff bound on the composed loss (tail mass
    1e-15, orders +-k / length for k = 1..20). At large sample rates and many steps that
    array is huge although sigma and the step count each pass their guards: sigma 0.5,
    q 1, 1e7 steps asked numpy for 69.6 GiB; sigma 1, q 1, 1e5 steps took 58 s and 5.1 GB.
    Peak memory is ~70-115 bytes per entry (measured), and reading epsilon walks the
    array in Python. So before composing, the length is estimated the same way on a copy
    of each step's distribution discretised with ~1024 intervals over its loss range
    (the Chernoff orders are fixed fractions of that range, so the bound in loss units
    barely depends on the interval): within 0.998-1.05 of dp-accounting's length for every
    array over 1e6 entries measured, 0.71-1.08 for the small ones (sigma 0.2-1e4, q 1e-6-1,
    1-1e7 steps), ~15 ms per setting, cached. Histories whose
    settings sum to more than ``PLD_MAX_ENTRIES`` (2**24, ~1.2-1.9 GB and ~10-20 s) are
    refused with a ValueError suggesting RDP. Realistic runs are far below it: Opacus's
    MNIST settings (q 0.004, sigma 0.7-1.1, 15,000 steps) need 1.6e5-3.8e5 entries, q 0.004
    at sigma 0.5 and 1e6 steps 4.6e6 (1e7 steps: 1.5e7, still allowed); every refused
    setting on a grid of sigma 0.1-50, q 1e-4-1, 10-1e7 steps spends epsilon >= 370
    (RDP), which RDP answers in milliseconds.
    """
    need = [(_pld_entries(st.noise_multiplier, st.sample_rate, st.count), st) for st in merged]
    total = sum(n for n, _ in need)
    if total <= PLD_MAX_ENTRIES:
        return
    n, st = max(need, key=lambda x: x[0])
    raise PldTooLarge(
        f"{where}: PLD accounting of {st.count} steps at noise_multiplier={st.noise_multiplier:g}, "
        f"sample_rate={st.sample_rate:g} needs a privacy loss distribution of ~{n:.3g} entries "
        f"(~{n * 100 / 2**30:.3g} GB; the limit is {PLD_MAX_ENTRIES:.3g} entries"
        + (f", this history needs ~{total:.3g} in all" if len(need) > 1 else "")
        + "): its loss is too wide for PLD's fixed discretisation (NOTE [PLD size guard]); "
        "such a run spends epsilon in the hundreds or more; use accountant='rdp'")


@functools.lru_cache(maxsize=256)
def _pld_entries(sigma: float, q: float, count: int) -> int:
    """The estimated length of the composed PLD array of ``count`` steps (NOTE [PLD size
    guard]): the larger of the REMOVE and ADD distributions'."""
    from dp_accounting.pld import common
    from dp_accounting.pld import privacy_loss_distribution as pld_lib
    from dp_accounting.pld import privacy_loss_mechanism as mech

    sides = [mech.AdjacencyType.REMOVE] + ([] if q == 1.0 else [mech.AdjacencyType.ADD])
    width = 0.0
    for side in sides:
        b = mech.GaussianPrivacyLoss(sigma, sampling_prob=q, adjacency_type=side
                                     ).connect_dots_bounds()
        width = max(width, b.epsilon_upper - b.epsilon_lower)
    coarse = max(PLD_DISCRETIZATION, width / 1024)
    single = pld_lib.from_gaussian_mechanism(
        standard_deviation=sigma, value_discretization_interval=coarse, sampling_prob=q)
    try:  # documented attributes of PrivacyLossDistribution; without them, no estimate
        pmfs = [single._pmf_remove, single._pmf_add]
        lengths = []
        for pmf in pmfs:
            probs = pmf.to_dense_pmf()._probs
            lo, hi = common.compute_self_convolve_bounds(probs, count, 1e-15)
            lengths.append(max(hi - lo + 1, len(probs)) * coarse / PLD_DISCRETIZATION)
    except AttributeError:  # pragma: no cover - a dp-accounting without these internals
        return 0
    return math.ceil(max(lengths))


def pld_floor_message(where: str, sigma: float) -> str:
    """The refusal of PLD accounting below ``PLD_MIN_NOISE_MULTIPLIER``.

    # NOTE [PLD at small noise]
    The privacy loss distribution of a Gaussian step spans ~1/sigma^2 at a fixed
    discretisation (NOTE [PLD discretisation]), and composition widens it further: at
    q = 0.004 over 3,750 steps one epsilon took 4 s at sigma 0.5, 13.5 s at 0.2, ~35 s at
    0.1, minutes at 0.03, and at 1e-4 numpy asked for 5 TiB (dp_mnist --target-epsilon 1e9
    died there). Such runs spend epsilon in the hundreds or more, where RDP's looser bound
    answers in milliseconds, so PLD refuses them instead of hanging.
    """
    return (f"{where}: PLD accounting needs noise_multiplier >= {PLD_MIN_NOISE_MULTIPLIER:g}, "
            f"got {sigma:g}: {PLD_FLOOR_WHY}, and such a run spends epsilon in the hundreds or "
            "more; use accountant='rdp'")


def history_epsilon(kind: str, history: tuple[DpStep, ...], delta: float, where: str) -> float:
    """The epsilon of ``history`` at ``delta``: RDP's, or for ``"pld"`` the smaller of
    PLD's and RDP's (NOTE [the tighter bound]); ``inf`` when no finite one is known."""
    if not any(s.count for s in history):
        return 0.0
    rdp = _guarded(lambda: _rdp_convert(composed("rdp", history, where), "epsilon", delta))
    if kind == "rdp":
        return rdp
    return min(rdp, _guarded(lambda: composed("pld", history, where).get_epsilon(delta)))


def history_delta(kind: str, history: tuple[DpStep, ...], epsilon: float, where: str) -> float:
    """The delta of ``history`` at ``epsilon``, in [0, 1], as :func:`history_epsilon`."""
    if not any(s.count for s in history):
        return 0.0
    def clipped(value: Callable[[], Any]) -> float:
        d = _guarded(value, 1.0)
        return min(max(d, 0.0), 1.0)

    rdp = clipped(lambda: _rdp_convert(composed("rdp", history, where), "delta", epsilon))
    if kind == "rdp":
        return rdp
    return min(rdp, clipped(lambda: composed("pld", history, where).get_delta(epsilon)))


def _guarded(value: Callable[[], Any], worst: float = math.inf) -> float:
    """``value()`` as a float, or ``worst`` where dp-accounting's arithmetic fails.

    # NOTE [the tighter bound]
    Both accountants give upper bounds on the same (epsilon, delta) curve, so the smaller
    of the two is one too, and ``"pld"`` reports it. PLD is the tighter almost everywhere;
    where it is not, its fixed discretisation (NOTE [neighbouring relation and orders])
    made it the looser: 0.024 against RDP's 0.0087 at sigma 10, q 1e-4 and 1e5 steps
    (finer PLD: 0.0075), so calibrating with it asked for 2.8 times RDP's noise. Below
    delta ~1e-15, PLD's truncated tail mass made it return ``inf``, or ``inf`` and tiny
    values in turn for noise multipliers 0.1% apart (a calibration returned 11,400 times
    RDP's noise) and a negative delta. A failed epsilon (an exception, NaN) is ``inf``
    here, a failed delta 1, and delta is clipped to [0, 1]. An epsilon of 0.0 is reported
    as such: dp-accounting returns it legitimately when delta already bounds the
    distance between the two output distributions (RDP: delta^2 > 1 - exp(-rdp), its KL
    branch, at tiny q, large sigma or large delta; PLD: its delta at epsilon 0 is below
    delta), see NOTE [RDP orders that failed] for the 0.0 that was not legitimate.
    """
    try:
        v = float(value())
    except (ZeroDivisionError, OverflowError, FloatingPointError):
        return worst
    return worst if math.isnan(v) else v


def _rdp_convert(acc: Any, what: str, value: float) -> float:
    """RDP's epsilon (``what="epsilon"``, ``value`` = delta) or delta (``value`` = epsilon)
    over the orders whose RDP dp-accounting computed.

    # NOTE [RDP orders that failed]
    For noise multipliers near 1e-160 dp-accounting's RDP overflows to NaN at most orders;
    its conversion then returned epsilon 0.0 (no privacy reported as perfect privacy:
    ``max(0, nan)`` is 0). At tiny sample rates (q <= 1e-6, or sigma >= 1e3 with q <= 1e-2)
    rounding makes some orders' RDP slightly negative (-1e-28 to -3e-15), an impossible
    value that its conversion turns into epsilon 0.0 at any delta (too low where the true
    value is positive) and into a ``math domain error`` for delta. Such orders are dropped
    here: the conversion is a minimum over orders, so fewer orders only loosen the bound,
    and it stays valid. With no order left, epsilon is ``inf`` and delta 1. And its delta
    conversion computes ``log1p(-exp(-rdp))``, ``log(0)`` (a ValueError: "math domain
    error" from ``Accountant.delta``) for any order with 0 < rdp < ~1.1e-16 (sigma 1e3,
    q 1e-6): for delta such orders count as rdp = 2**-52, a larger RDP, so again a valid,
    looser bound (by at most ~1.5e-8 in delta). Otherwise the numbers are dp-accounting's
    own conversion's (``compute_epsilon``/``compute_delta``), including its legitimate
    0.0 (NOTE [the tighter bound]).
    """
    import numpy as np  # a dependency of dp-accounting
    from dp_accounting.rdp import rdp_privacy_accountant as rdp_lib

    try:  # public properties in dp-accounting 0.6; the attributes behind them before
        orders, rdp = np.asarray(acc.orders), np.asarray(acc.rdp)
    except AttributeError:  # pragma: no cover - older dp-accounting
        orders, rdp = np.asarray(acc._orders), np.asarray(acc._rdp)
    ok = rdp >= 0  # False for NaN
    if not ok.any():
        return math.inf if what == "epsilon" else 1.0
    orders, rdp = orders[ok], rdp[ok]
    if what == "epsilon":
        return float(rdp_lib.compute_epsilon(orders, rdp, value)[0])
    # compute_delta's log1p(-exp(-rdp)) is log(0), a ValueError, for 0 < rdp < ~1.1e-16
    rdp = np.where((rdp > 0) & (rdp < _TINY_RDP), _TINY_RDP, rdp)
    return float(rdp_lib.compute_delta(orders, rdp, value)[0])


_TINY_RDP = 2.0**-52


@functools.lru_cache(maxsize=4)  # a PLD can hold ~10 MB of arrays
def _composed(kind: str, history: tuple[DpStep, ...]) -> Any:
    import dp_accounting as dpa

    # NOTE [quiet RDP orders]
    # For large q, dp-accounting's RDP logs one absl WARNING per fractional order whose
    # series does not converge ("Excluding this order"), dozens per call and hundreds in a
    # calibration. Excluding orders only loosens the bound (still valid), so we silence
    # that logger while composing and restore its level afterwards.
    log = logging.getLogger("absl")
    level = log.level
    log.setLevel(max(level, logging.ERROR))
    try:
        return _compose_all(dpa, kind, history)
    finally:
        log.setLevel(level)


def _compose_all(dpa: Any, kind: str, history: tuple[DpStep, ...]) -> Any:
    from dp_accounting import pld
    from dp_accounting import rdp

    if kind == "rdp":
        acc = rdp.RdpAccountant()
    else:
        acc = pld.PLDAccountant(value_discretization_interval=PLD_DISCRETIZATION)
    for s in history:
        event = dpa.PoissonSampledDpEvent(s.sample_rate, dpa.GaussianDpEvent(s.noise_multiplier))
        if s.count > 0:
            acc.compose(event, s.count)
    return acc

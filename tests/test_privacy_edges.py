"""Edges of ``fp.privacy`` found by a sweep against dp-accounting called directly (NOTE [the
tighter bound] in ``privacy/_backend.py``): PLD's truncation below delta ~1e-15 and its
fixed discretisation at tiny per-step losses, RDP's overflow at absurd noise, the
calibration's limits and tolerance, and argument checks."""

from __future__ import annotations

import time

import dp_accounting as dpa
import numpy as np
import pytest
import torch
from dp_accounting import pld as dpa_pld
from dp_accounting import rdp as dpa_rdp

from functorch_pipeline.privacy import Accountant
from functorch_pipeline.privacy import epsilon
from functorch_pipeline.privacy import noise_multiplier_for


def _event(sigma: float, q: float) -> dpa.DpEvent:
    return dpa.PoissonSampledDpEvent(q, dpa.GaussianDpEvent(sigma))


def _rdp(sigma: float, q: float, steps: int, delta: float) -> float:
    acc = dpa_rdp.RdpAccountant()
    acc.compose(_event(sigma, q), steps)
    return acc.get_epsilon(delta)


def _pld(sigma: float, q: float, steps: int, delta: float, interval: float = 1e-4) -> float:
    acc = dpa_pld.PLDAccountant(value_discretization_interval=interval)
    acc.compose(_event(sigma, q), steps)
    return acc.get_epsilon(delta)


def test_pld_below_its_truncation_reports_rdp_not_inf():
    # dp-accounting's PLD is inf below delta ~1.1e-15 (sigma 1, q 0.01, 100 steps)
    assert _pld(1.0, 0.01, 100, 1e-16) == float("inf")
    got = epsilon(noise_multiplier=1.0, sample_rate=0.01, steps=100, delta=1e-16, accountant="pld")
    assert got == pytest.approx(_rdp(1.0, 0.01, 100, 1e-16), rel=1e-12)
    # above the truncation PLD stays the tighter, as dp-accounting computes it
    got = epsilon(noise_multiplier=1.0, sample_rate=0.01, steps=100, delta=1e-14, accountant="pld")
    assert got == pytest.approx(_pld(1.0, 0.01, 100, 1e-14), rel=1e-9)
    assert got < _rdp(1.0, 0.01, 100, 1e-14)


def test_pld_calibration_below_the_truncation_is_near_rdp():
    # it returned 16384 (the search's limit) where RDP needs 1.434
    pld = noise_multiplier_for(target_epsilon=2.0, delta=1e-16, sample_rate=0.01, steps=100,
                               accountant="pld")
    rdp = noise_multiplier_for(target_epsilon=2.0, delta=1e-16, sample_rate=0.01, steps=100)
    assert pld <= rdp * (1 + 1e-6)
    assert min(_rdp(pld, 0.01, 100, 1e-16), _pld(pld, 0.01, 100, 1e-16)) <= 2.0


def test_pld_never_looser_than_rdp():
    # the fixed 1e-4 interval made PLD 0.024 against RDP's 0.0087 here (finer PLD: 0.0075)
    args = dict(noise_multiplier=10.0, sample_rate=1e-4, steps=100_000, delta=1e-5)
    rdp = _rdp(10.0, 1e-4, 100_000, 1e-5)
    assert _pld(10.0, 1e-4, 100_000, 1e-5) > 2 * rdp
    assert epsilon(**args, accountant="pld") == pytest.approx(rdp, rel=1e-12)
    sigma_pld = noise_multiplier_for(target_epsilon=0.02, delta=1e-5, sample_rate=1e-4,
                                     steps=100_000, accountant="pld")
    sigma_rdp = noise_multiplier_for(target_epsilon=0.02, delta=1e-5, sample_rate=1e-4, steps=100_000)
    assert sigma_pld <= sigma_rdp * (1 + 1e-6)  # was 2.8 times


def test_accountant_delta_is_a_probability():
    acc = Accountant("pld").step(noise_multiplier=2.0**14, sample_rate=0.01, steps=100)  # PLD: -4.7e-16
    for eps in (0.0, 1e-6, 0.5, 3.0):
        assert 0.0 <= acc.delta(eps) <= 1.0
    acc = Accountant("pld").step(noise_multiplier=1.0, sample_rate=0.01, steps=100)
    acc_rdp = Accountant("rdp").step(noise_multiplier=1.0, sample_rate=0.01, steps=100)
    d_direct = dpa_pld.PLDAccountant(value_discretization_interval=1e-4)
    d_direct.compose(_event(1.0, 0.01), 100)
    assert acc.delta(1.0) == pytest.approx(min(d_direct.get_delta(1.0), acc_rdp.delta(1.0)), rel=1e-9)


@pytest.mark.parametrize("sigma", [1e-156, 1e-160, 1e-170])
def test_no_noise_is_never_perfect_privacy(sigma):
    # every RDP order overflows: dp-accounting gave 0.0 (or ZeroDivisionError)
    for kind in ("rdp",):
        assert epsilon(noise_multiplier=sigma, sample_rate=0.5, steps=10, delta=1e-5,
                       accountant=kind) == float("inf")
    assert Accountant().step(noise_multiplier=sigma, sample_rate=0.5).epsilon(1e-5) == float("inf")


def test_a_target_met_without_meaningful_noise_is_refused_quickly():
    start = time.perf_counter()
    with pytest.raises(ValueError, match=r"`target_epsilon`=1e\+305 is met at every noise multiplier "
                       r"down to 0.000244141, the search's lower limit"):
        noise_multiplier_for(target_epsilon=1e305, delta=1e-5, sample_rate=0.004, steps=3750)
    assert time.perf_counter() - start < 10  # it searched toward 1e-160 for 74 s


@pytest.mark.parametrize("target,q,steps", [(0.01, 0.01, 1000), (0.005, 0.01, 1000), (0.05, 1e-3, 1000)])
def test_calibration_is_tight_at_small_targets(target, q, steps):
    # an absolute tolerance of 0.01 stopped at +44% of the smallest sigma at target 0.01
    got = noise_multiplier_for(target_epsilon=target, delta=1e-5, sample_rate=q, steps=steps)
    assert _rdp(got, q, steps, 1e-5) <= target
    lo, hi = 1e-3, got  # the smallest sigma meeting the target, by plain bisection
    for _ in range(60):
        mid = (lo + hi) / 2
        lo, hi = (lo, mid) if _rdp(mid, q, steps, 1e-5) <= target else (mid, hi)
    assert got <= hi * 1.03


def test_arguments_checked_by_name():
    base = dict(noise_multiplier=1.0, sample_rate=0.01, steps=10, delta=1e-5)
    for name in ("noise_multiplier", "sample_rate", "delta"):
        with pytest.raises(TypeError, match=rf"`{name}` must be a real number, got Tensor of dtype torch.bool"):
            epsilon(**{**base, name: torch.tensor(True)})
        with pytest.raises(ValueError, match=rf"`{name}` is too large for a float"):
            epsilon(**{**base, name: 10**400})
    with pytest.raises(TypeError, match="`steps` must be an int, got Tensor"):
        epsilon(**{**base, "steps": torch.tensor(True)})
    with pytest.raises(ValueError, match=r"PLD accounting composes at most 1e\+07 steps.*`steps`=1000000000; "
                       r"use accountant='rdp'"):
        epsilon(**{**base, "steps": 10**9}, accountant="pld")
    with pytest.raises(ValueError, match="`kind` must be 'rdp' or 'pld', got 'prv'"):
        Accountant(kind="prv")
    # numpy and one-element tensors are accepted wherever a number is
    sigma = noise_multiplier_for(target_epsilon=1.0, delta=1e-5, sample_rate=0.01, steps=1000)
    assert noise_multiplier_for(target_epsilon=np.float32(1.0), delta=1e-5, sample_rate=0.01,
                                steps=1000) == sigma
    assert noise_multiplier_for(target_epsilon=torch.tensor(1.0), delta=1e-5, sample_rate=0.01,
                                steps=1000) == sigma
    acc = Accountant().step(noise_multiplier=1.0, sample_rate=0.01, steps=1000)
    assert acc.delta(np.float32(1.0)) == acc.delta(torch.tensor(1.0)) == acc.delta(1.0)

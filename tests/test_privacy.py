"""fp.privacy: epsilon, noise_multiplier_for and Accountant against independent references:
dp-accounting called directly, closed forms for the unsubsampled Gaussian mechanism, and
Opacus's published MNIST figures."""

from __future__ import annotations

import ast
import math
import pathlib
import sys

import dp_accounting as dpa
import pytest
import torch
from dp_accounting import pld as dpa_pld
from dp_accounting import rdp as dpa_rdp
from hypothesis import given
from hypothesis import settings
from hypothesis import strategies as st

import functorch_pipeline as fp
from functorch_pipeline.privacy import Accountant
from functorch_pipeline.privacy import DpStep
from functorch_pipeline.privacy import epsilon
from functorch_pipeline.privacy import noise_multiplier_for

DELTA = 1e-5
Q = 0.004  # Opacus's MNIST example: batch 240 of 60000


def _event(sigma: float, q: float) -> dpa.DpEvent:
    return dpa.PoissonSampledDpEvent(q, dpa.GaussianDpEvent(sigma))


def _rdp_direct(sigma: float, q: float, steps: int, delta: float) -> float:
    acc = dpa_rdp.RdpAccountant()
    acc.compose(dpa.SelfComposedDpEvent(_event(sigma, q), steps))
    return acc.get_epsilon(delta)


def _pld_direct(sigma: float, q: float, steps: int, delta: float) -> float:
    # a different route through dp-accounting: the PLD module itself, not its accountant
    pl = dpa_pld.privacy_loss_distribution.from_gaussian_mechanism(
        standard_deviation=sigma, sampling_prob=q, value_discretization_interval=1e-4
    )
    return pl.self_compose(steps).get_epsilon_for_delta(delta)


# ----------------------------------------------------------------- against dp-accounting


@settings(max_examples=12, deadline=None)
@given(
    sigma=st.floats(0.5, 5.0),
    q=st.floats(1e-3, 1.0),
    steps=st.integers(1, 3000),
    log_delta=st.floats(-9, -3),
)
def test_rdp_epsilon_matches_dp_accounting(sigma, q, steps, log_delta):
    delta = 10.0**log_delta
    got = epsilon(noise_multiplier=sigma, sample_rate=q, steps=steps, delta=delta)
    assert got == pytest.approx(_rdp_direct(sigma, q, steps, delta), abs=1e-3, rel=1e-6)


@settings(max_examples=4, deadline=None)
@given(
    sigma=st.floats(1.0, 3.0),
    q=st.floats(1e-3, 0.05),
    steps=st.integers(1, 100),
    log_delta=st.floats(-8, -4),
)
def test_pld_epsilon_matches_dp_accounting(sigma, q, steps, log_delta):
    delta = 10.0**log_delta
    got = epsilon(noise_multiplier=sigma, sample_rate=q, steps=steps, delta=delta, accountant="pld")
    assert got == pytest.approx(_pld_direct(sigma, q, steps, delta), abs=1e-3)


def test_zero_steps_spend_nothing():
    for kind in ("rdp", "pld"):
        assert (
            epsilon(noise_multiplier=1.0, sample_rate=0.1, steps=0, delta=DELTA, accountant=kind)
            == 0
        )


# ------------------------------------------------------------------------ closed forms


def _rdp_closed_form(sigma: float, steps: int, delta: float) -> float:
    """No subsampling (q = 1): RDP of the Gaussian mechanism is alpha / (2 sigma^2) per
    step; the conversion is Balle et al. 2020, Thm 21, minimised over dp-accounting's
    orders (Mironov 2017, Prop. 7 and Canonne et al. 2020)."""
    best = math.inf
    for a in dpa_rdp.rdp_privacy_accountant.DEFAULT_RDP_ORDERS:
        rdp = steps * a / (2 * sigma**2)
        eps = rdp + math.log1p(-1 / a) - (math.log(delta) + math.log(a)) / (a - 1)
        best = min(best, eps)
    return max(best, 0.0)


def _gaussian_delta(eps: float, mu: float) -> float:
    """The exact delta(eps) of a Gaussian mechanism with mu = sensitivity / sigma
    (Balle & Wang 2018, Thm 8)."""

    def cdf(x: float) -> float:
        return 0.5 * math.erfc(-x / math.sqrt(2))

    return cdf(-eps / mu + mu / 2) - math.exp(eps) * cdf(-eps / mu - mu / 2)


def _gaussian_epsilon(sigma: float, steps: int, delta: float) -> float:
    mu = math.sqrt(steps) / sigma  # T Gaussian steps compose into one with sigma / sqrt(T)
    lo, hi = 0.0, 100.0
    for _ in range(200):
        mid = (lo + hi) / 2
        lo, hi = (mid, hi) if _gaussian_delta(mid, mu) > delta else (lo, mid)
    return hi


@pytest.mark.parametrize("sigma,steps", [(2.0, 1), (5.0, 10), (20.0, 100)])
def test_rdp_without_subsampling_matches_closed_form(sigma, steps):
    got = epsilon(noise_multiplier=sigma, sample_rate=1.0, steps=steps, delta=DELTA)
    assert got == pytest.approx(_rdp_closed_form(sigma, steps, DELTA), rel=1e-9)


@pytest.mark.parametrize("sigma,steps", [(2.0, 1), (5.0, 10), (20.0, 100)])
def test_pld_without_subsampling_matches_exact_gaussian(sigma, steps):
    exact = _gaussian_epsilon(sigma, steps, DELTA)
    got = epsilon(
        noise_multiplier=sigma, sample_rate=1.0, steps=steps, delta=DELTA, accountant="pld"
    )
    # PLD discretises pessimistically: an upper bound, close to the exact value
    assert exact - 1e-9 <= got <= exact + 2e-3


# ------------------------------------------------------------- Opacus's published MNIST


# (sigma, epochs, README figure from Opacus's older RDP conversion, current accountants)
OPACUS_MNIST = [(1.3, 15, 1.19, 0.92), (1.1, 60, 3.01, 2.50), (0.7, 45, 7.10, 6.09)]


@pytest.mark.parametrize("sigma,epochs,published,current", OPACUS_MNIST)
def test_opacus_mnist_figures(sigma, epochs, published, current):
    steps = round(epochs / Q)
    rdp = epsilon(noise_multiplier=sigma, sample_rate=Q, steps=steps, delta=DELTA)
    pld = epsilon(noise_multiplier=sigma, sample_rate=Q, steps=steps, delta=DELTA, accountant="pld")
    assert rdp == pytest.approx(current, abs=0.015)
    assert rdp <= published
    assert pld < rdp - 0.05  # tighter by a margin, not by rounding


# -------------------------------------------------------------------- noise calibration


@pytest.mark.parametrize(
    "kind,target,q,steps", [("rdp", 1.19, Q, 3750), ("rdp", 3.0, Q, 15000), ("pld", 0.5, 0.02, 50)]
)
def test_noise_multiplier_for_meets_the_target(kind, target, q, steps):
    sigma = noise_multiplier_for(
        target_epsilon=target, delta=DELTA, sample_rate=q, steps=steps, accountant=kind
    )
    eps = (
        _rdp_direct(sigma, q, steps, DELTA)
        if kind == "rdp"
        else _pld_direct(sigma, q, steps, DELTA)
    )
    assert target - 0.01 - 1e-3 <= eps <= target + 1e-9
    if kind == "pld":  # PLD's tighter epsilon buys less noise than RDP for the same budget
        rdp_sigma = noise_multiplier_for(
            target_epsilon=target, delta=DELTA, sample_rate=q, steps=steps
        )
        assert sigma < rdp_sigma - 0.03


def test_noise_multiplier_for_inverts_epsilon():
    # sigma = 1.1 over 60 epochs spends 2.50 (RDP); asking for 2.5029 gives 1.1 back
    eps = epsilon(noise_multiplier=1.1, sample_rate=Q, steps=15000, delta=DELTA)
    sigma = noise_multiplier_for(
        target_epsilon=eps, delta=DELTA, sample_rate=Q, steps=15000, epsilon_tolerance=1e-4
    )
    assert sigma == pytest.approx(1.1, abs=1e-3)


def test_unreachable_target_states_the_best_epsilon():
    # RDP's conversion has a floor (~0.0035 at delta = 1e-5 with orders up to 1024)
    best = epsilon(noise_multiplier=2.0**14, sample_rate=1.0, steps=100, delta=DELTA)
    with pytest.raises(
        ValueError, match=r"noise_multiplier_for: `target_epsilon`=0.001 is unreachable"
    ) as e:
        noise_multiplier_for(target_epsilon=1e-3, delta=DELTA, sample_rate=1.0, steps=100)
    assert (f"for a noise multiplier up to 16384, the search's limit: the best reachable "
            f"epsilon there is {best:.6g}, at noise_multiplier=16384") in str(e.value)
    assert 1e-3 < best < 0.01


# ---------------------------------------------------------------------------- bad input

GOOD = dict(noise_multiplier=1.0, sample_rate=0.01, steps=10, delta=DELTA)


@pytest.mark.parametrize(
    "name,value",
    [
        ("sample_rate", 0.0),
        ("sample_rate", 1.5),
        ("sample_rate", -0.1),
        ("sample_rate", float("nan")),
        ("noise_multiplier", 0.0),
        ("noise_multiplier", -1.0),
        ("noise_multiplier", float("inf")),
        ("delta", 0.0),
        ("delta", 1.0),
        ("delta", 2.0),
        ("steps", -1),
    ],
)
def test_out_of_range_arguments_are_named(name, value):
    with pytest.raises(ValueError, match=rf"^epsilon: `{name}` must be"):
        epsilon(**{**GOOD, name: value})
    if name != "delta":
        args = {k: v for k, v in GOOD.items() if k != "delta"}
        with pytest.raises(ValueError, match=rf"^Accountant.step: `{name}` must be"):
            Accountant().step(**{**args, name: value})
    if name != "noise_multiplier":
        args = {k: v for k, v in GOOD.items() if k != "noise_multiplier"}
        with pytest.raises(ValueError, match=rf"^noise_multiplier_for: `{name}` must be"):
            noise_multiplier_for(target_epsilon=1.0, **{**args, name: value})


def test_other_bad_arguments():
    with pytest.raises(
        ValueError, match=r"epsilon: `accountant` must be 'rdp' or 'pld', got 'prv'"
    ):
        epsilon(**GOOD, accountant="prv")
    with pytest.raises(TypeError, match=r"epsilon: `steps` must be an int, got float"):
        epsilon(**{**GOOD, "steps": 10.0})
    with pytest.raises(
        ValueError, match=r"noise_multiplier_for: `target_epsilon` must be a finite number > 0"
    ):
        noise_multiplier_for(target_epsilon=0.0, delta=DELTA, sample_rate=0.01, steps=10)
    with pytest.raises(ValueError, match=r"noise_multiplier_for: `steps` must be >= 1"):
        noise_multiplier_for(target_epsilon=1.0, delta=DELTA, sample_rate=0.01, steps=0)
    with pytest.raises(ValueError, match=r"Accountant.epsilon: `delta` must be in \(0, 1\), got 0"):
        Accountant().epsilon(0)
    with pytest.raises(ValueError, match=r"Accountant.delta: `epsilon` must be >= 0, got -1"):
        Accountant().delta(-1)
    with pytest.raises(
        ValueError, match=r"Accountant: `kind` must be 'rdp' or 'pld', got 'gdp'"
    ):
        Accountant("gdp")
    with pytest.raises(ValueError, match=r"Accountant: `sample_rate` must be in \(0, 1\], got 2"):
        Accountant("rdp", (DpStep(1.0, 2, 3),))


def test_missing_dp_accounting_names_the_extra(monkeypatch):
    monkeypatch.setitem(sys.modules, "dp_accounting", None)
    extra = r'pip install "functorch-pipeline\[privacy\]"'
    with pytest.raises(ImportError, match=rf"^epsilon: .*`dp-accounting`.*{extra}"):
        epsilon(**GOOD)
    with pytest.raises(ImportError, match=rf"^noise_multiplier_for: .*{extra}"):
        noise_multiplier_for(target_epsilon=1.0, delta=DELTA, sample_rate=0.01, steps=10)
    acc = Accountant().step(noise_multiplier=1.0, sample_rate=0.01, steps=10)
    with pytest.raises(ImportError, match=rf"^Accountant.epsilon: .*{extra}"):
        acc.epsilon(DELTA)
    # stepping and checkpointing need no dp-accounting
    assert acc.step(noise_multiplier=1.0, sample_rate=0.01).steps == 11


def test_dp_accounting_is_imported_only_inside_functions():
    # (a subprocess checking sys.modules costs seconds; the module-level statements say it all)
    package = pathlib.Path(fp.__file__).parent
    for path in package.rglob("*.py"):
        for node in ast.parse(path.read_text()).body:
            names = []
            if isinstance(node, ast.Import):
                names = [a.name for a in node.names]
            elif isinstance(node, ast.ImportFrom):
                names = [node.module or ""]
            assert not any(n.split(".")[0] == "dp_accounting" for n in names), path


# --------------------------------------------------------------------------- Accountant

SCHEDULE = [(1.3, 0.004, 8), (1.3, 0.004, 4), (1.1, 0.004, 6), (1.1, 0.01, 3), (2.0, 0.01, 2)]


@pytest.mark.parametrize("kind", ["rdp", "pld"])
def test_accountant_composes_changing_settings_like_dp_accounting(kind):
    acc = Accountant(kind)
    ref = dpa_rdp.RdpAccountant() if kind == "rdp" else dpa_pld.PLDAccountant()
    for sigma, q, n in SCHEDULE:
        acc = acc.step(noise_multiplier=sigma, sample_rate=q, steps=n)
        if kind == "rdp":  # the reference composes step by step
            for _ in range(n):
                ref.compose(_event(sigma, q))
        else:  # (a PLD compose is a convolution: one per segment, unmerged)
            ref.compose(_event(sigma, q), n)
    assert acc.steps == sum(n for *_, n in SCHEDULE)
    assert [tuple(s) for s in acc.history] == [
        (1.3, 0.004, 12),
        (1.1, 0.004, 6),
        (1.1, 0.01, 3),
        (2.0, 0.01, 2),
    ]
    for delta in (1e-5, 1e-7):
        assert acc.epsilon(delta) == pytest.approx(ref.get_epsilon(delta), abs=1e-3)
    for eps in (0.5, 1.0, 2.0):
        assert acc.delta(eps) == pytest.approx(ref.get_delta(eps), rel=1e-2, abs=1e-12)


def test_accountant_steps_one_at_a_time_equal_one_call():
    acc = Accountant()
    for _ in range(200):
        acc = acc.step(noise_multiplier=1.1, sample_rate=0.01)
    assert acc.history == (DpStep(1.1, 0.01, 200),)
    assert acc.epsilon(DELTA) == epsilon(
        noise_multiplier=1.1, sample_rate=0.01, steps=200, delta=DELTA
    )


def test_accountant_is_immutable_and_starts_at_zero():
    a = Accountant("pld")
    b = a.step(noise_multiplier=1.0, sample_rate=0.1, steps=5)
    assert a.steps == 0 and a.history == () and b.steps == 5
    assert a.epsilon(DELTA) == 0.0 and a.delta(0.0) == 0.0
    with pytest.raises(AttributeError):
        b.kind = "rdp"  # type: ignore[misc]
    assert b.step(noise_multiplier=1.0, sample_rate=0.1, steps=0) is b


@pytest.mark.parametrize("kind", ["rdp", "pld"])
def test_accountant_survives_save_and_load(tmp_path, kind):
    """A run checkpointed mid-way and resumed spends exactly the budget of a straight run."""
    settings_ = [(1.0 + 1.0 / 3.0, 0.004, 17), (1.1, (0.1 + 0.2) / 10, 5), (0.7, 1e-3, 9)]
    straight = Accountant(kind)
    for sigma, q, n in settings_:
        straight = straight.step(noise_multiplier=sigma, sample_rate=q, steps=n)
    first = Accountant(kind)
    for sigma, q, n in settings_[:2]:
        first = first.step(noise_multiplier=sigma, sample_rate=q, steps=n)
    state = {
        "params": {"w": torch.ones(2, dtype=torch.float64)},
        "step": torch.tensor(22),
        "accountant": first,
    }
    path = tmp_path / "ckpt.safetensors"
    fp.save(path, state)
    loaded = fp.load(path)["accountant"]
    assert type(loaded) is Accountant and loaded == first and loaded.kind == kind
    assert all(type(s) is DpStep for s in loaded.history)
    resumed = loaded.step(noise_multiplier=0.7, sample_rate=1e-3, steps=9)
    assert resumed == straight
    assert resumed.epsilon(DELTA) == straight.epsilon(DELTA) > 0
    # a template with the same history loads with like= too; device/dtype moves leave it alone
    assert fp.load(path, like=state)["accountant"] == first
    assert fp.tree.to(state, dtype=torch.float32)["accountant"] == first


def test_accountant_rebuilt_from_bad_leaves_is_checked_before_use():
    acc = Accountant().step(noise_multiplier=1.0, sample_rate=0.1, steps=3)
    bad = fp.tree.unflatten(fp.tree.structure(acc), [1.0, 2.0, 3])  # as fp.load would rebuild
    with pytest.raises(ValueError, match=r"^Accountant.epsilon: `sample_rate` must be in \(0, 1\]"):
        bad.epsilon(DELTA)
    bad = fp.tree.unflatten(fp.tree.structure(acc), [1.0, 0.1, -3])
    with pytest.raises(ValueError, match=r"^Accountant.delta: `steps` must be >= 0, got -3"):
        bad.delta(1.0)


def test_alternating_settings_compose_like_dp_accounting_in_order():
    # equal settings far apart in the history are merged (composition commutes)
    acc = Accountant()
    ref = dpa_rdp.RdpAccountant()
    for i in range(30):
        sigma, q = (1.0, 0.01) if i % 2 else (2.0, 0.05)
        acc = acc.step(noise_multiplier=sigma, sample_rate=q)
        ref.compose(_event(sigma, q))
    assert len(acc.history) == 30  # the history keeps the order ...
    assert acc.epsilon(DELTA) == pytest.approx(ref.get_epsilon(DELTA), abs=1e-9)
    swapped = Accountant(history=(DpStep(1.0, 0.01, 15), DpStep(2.0, 0.05, 15)))
    assert acc.epsilon(DELTA) == pytest.approx(swapped.epsilon(DELTA), abs=1e-12)  # ... not eps


# ------------------------------------------------------------------- steps without noise


@pytest.mark.parametrize("kind", ["rdp", "pld"])
def test_a_step_without_noise_voids_the_guarantee(kind):
    """A noise-free step releases an exact gradient: no (epsilon, delta) guarantee remains,
    whatever comes before or after (the accountant used to record nothing: epsilon 0.0)."""
    free = Accountant(kind).step_without_noise(sample_rate=0.1)
    assert free.steps == 1 and free.history == (DpStep(0.0, 0.1, 1),)
    assert free.epsilon(DELTA) == math.inf and free.delta(1.0) == 1.0 and free.delta(0.0) == 1.0
    later = free.step(noise_multiplier=1.1, sample_rate=Q, steps=100)
    assert later.steps == 101 and later.epsilon(DELTA) == math.inf and later.delta(20.0) == 1.0
    before = Accountant(kind).step(noise_multiplier=1.1, sample_rate=Q, steps=100)
    assert math.isfinite(before.epsilon(DELTA))
    after = before.step_without_noise(sample_rate=Q, steps=2).step_without_noise(sample_rate=Q)
    assert after.history == (DpStep(1.1, Q, 100), DpStep(0.0, Q, 3)) and after.steps == 103
    assert after.epsilon(DELTA) == math.inf and after.delta(1.0) == 1.0
    assert before.step_without_noise(sample_rate=Q, steps=0) is before  # nothing recorded


@settings(max_examples=15, deadline=None)
@given(plan=st.lists(st.tuples(st.sampled_from([0.0, 0.8, 1.3]), st.sampled_from([0.01, 0.2]),
                               st.integers(0, 50)), min_size=1, max_size=5))
def test_epsilon_is_infinite_iff_a_noise_free_step_was_taken(plan):
    """Against dp-accounting on the noisy steps alone: a history with no noise-free step
    (or only empty ones) has the epsilon of its noisy steps; with one it is inf."""
    acc, ref, any_free = Accountant(), dpa_rdp.RdpAccountant(), False
    for sigma, q, n in plan:
        if sigma == 0.0:
            acc = acc.step_without_noise(sample_rate=q, steps=n)
            any_free = any_free or n > 0
        else:
            acc = acc.step(noise_multiplier=sigma, sample_rate=q, steps=n)
            if n:
                ref.compose(_event(sigma, q), n)
    assert acc.steps == sum(n for *_, n in plan)
    if any_free:
        assert acc.epsilon(DELTA) == math.inf and acc.delta(1.0) == 1.0
    else:
        assert acc.epsilon(DELTA) == pytest.approx(ref.get_epsilon(DELTA), abs=1e-9)


def test_step_without_noise_survives_save_and_load_and_old_checkpoints_load(tmp_path):
    acc = Accountant("pld").step(noise_multiplier=1.0, sample_rate=0.1, steps=4)
    fp.save(tmp_path / "old.safetensors", {"accountant": acc})  # no noise-free step: as before
    old = fp.load(tmp_path / "old.safetensors")["accountant"]
    assert old == acc and math.isfinite(old.epsilon(DELTA))
    free = acc.step_without_noise(sample_rate=0.1, steps=2)
    fp.save(tmp_path / "new.safetensors", {"accountant": free})
    loaded = fp.load(tmp_path / "new.safetensors")["accountant"]
    assert loaded == free and all(type(s) is DpStep for s in loaded.history)
    assert loaded.epsilon(DELTA) == math.inf and loaded.delta(3.0) == 1.0
    assert fp.tree.leaves(loaded) == [1.0, 0.1, 4, 0.0, 0.1, 2]


def test_step_without_noise_bad_input_and_sigma_zero_elsewhere():
    with pytest.raises(ValueError, match=r"^Accountant.step_without_noise: `sample_rate` must be "
                                         r"in \(0, 1\], got 0.0"):
        Accountant().step_without_noise(sample_rate=0.0)
    with pytest.raises(ValueError, match=r"^Accountant.step_without_noise: `steps` must be >= 0"):
        Accountant().step_without_noise(sample_rate=0.1, steps=-1)
    # sigma = 0 stays an error where a finite epsilon is asked for ...
    with pytest.raises(ValueError, match=r"^epsilon: `noise_multiplier` must be a finite number "
                                         r"> 0, got 0"):
        epsilon(noise_multiplier=0, sample_rate=0.1, steps=10, delta=DELTA)
    # ... and in Accountant.step, which points to the explicit method
    with pytest.raises(ValueError, match=r"^Accountant.step: `noise_multiplier` must be a finite "
                                         r"number > 0, got 0.0; .*step_without_noise"):
        Accountant().step(noise_multiplier=0.0, sample_rate=0.1)
    # a stored sigma that is neither 0 nor valid is still refused before use
    bad = fp.tree.unflatten(fp.tree.structure(Accountant(history=(DpStep(1.0, 0.1, 1),))),
                            [-1.0, 0.1, 1])
    with pytest.raises(ValueError, match=r"^Accountant.epsilon: `noise_multiplier` must be"):
        bad.epsilon(DELTA)


def test_pld_refuses_noise_below_its_floor():
    # NOTE [PLD at small noise]: dp_mnist --target-epsilon 1e9 died asking numpy for 5 TiB,
    # and epsilon(sigma=0.03, q=0.05, steps=20, accountant="pld") ran for minutes.
    floor = fp.privacy.PLD_MIN_NOISE_MULTIPLIER
    with pytest.raises(ValueError, match=r"epsilon: PLD accounting needs noise_multiplier >= "
                                         r"0.1, got 0.03.*use accountant='rdp'"):
        epsilon(noise_multiplier=0.03, sample_rate=0.05, steps=20, delta=DELTA, accountant="pld")
    acc = fp.privacy.Accountant("pld").step(noise_multiplier=1e-4, sample_rate=0.004)
    with pytest.raises(ValueError, match="PLD accounting needs noise_multiplier >= 0.1, got 0.0001"):
        acc.epsilon(DELTA)
    # RDP answers there, and a target met only below the floor names RDP's sigma
    rdp = noise_multiplier_for(target_epsilon=1000.0, delta=DELTA, sample_rate=1.0, steps=1)
    assert rdp < floor
    with pytest.raises(ValueError, match=r"met below noise_multiplier 0.1.*accountant='rdp' "
                                         r"gives") as e:
        noise_multiplier_for(target_epsilon=1000.0, delta=DELTA, sample_rate=1.0, steps=1,
                             accountant="pld")
    assert float(str(e.value).rsplit(" ", 1)[1]) == pytest.approx(rdp, rel=0.01)

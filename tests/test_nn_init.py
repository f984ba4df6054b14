"""fp.nn.init: pure initialisers checked against torch.nn.init's formulas and draws."""

import math

import pytest
import torch
from torch import nn

import functorch_pipeline as fp
from functorch_pipeline.nn import init

KEY = fp.random.key(0)


def _rel(a: float, b: float) -> float:
    return abs(a - b) / abs(b)


ALL = {
    "zeros": init.zeros,
    "ones": init.ones,
    "constant": init.constant(0.3),
    "uniform": init.uniform(-2.0, 1.0),
    "normal": init.normal(1.0, 0.5),
    "truncated_normal": init.truncated_normal(0.0, 1.0, -1.0, 2.0),
    "xavier_uniform": init.xavier_uniform(2.0),
    "xavier_normal": init.xavier_normal(),
    "kaiming_uniform": init.kaiming_uniform(a=math.sqrt(5)),
    "kaiming_normal": init.kaiming_normal(mode="fan_out", nonlinearity="relu"),
    "orthogonal": init.orthogonal(1.5),
    "variance_scaling": init.variance_scaling(1.0, "fan_avg", "truncated_normal"),
}


@pytest.mark.parametrize("name", sorted(ALL))
@pytest.mark.parametrize("dtype", [torch.float32, torch.float64, torch.bfloat16])
def test_pure_deterministic_shaped(name, dtype):
    f = ALL[name]
    rng = torch.get_rng_state()
    a = f(KEY, (6, 4, 3), dtype)
    assert torch.equal(torch.get_rng_state(), rng)
    assert a.shape == (6, 4, 3) and a.dtype == dtype and a.device == KEY.device
    torch.manual_seed(123)
    assert torch.equal(a, f(KEY, (6, 4, 3), dtype))
    if name not in ("zeros", "ones", "constant"):
        assert not torch.equal(a, f(fp.random.key(1), (6, 4, 3), dtype))
    assert f(KEY, [6, 4, 3]).dtype == torch.float32  # default dtype, list shape


SHAPES = [(200, 150), (32, 16, 3, 3), (100, 25, 7)]


def _torch_std(fill, shape) -> float:
    torch.manual_seed(0)
    return float(fill(torch.empty(shape, dtype=torch.float64)).std())


@pytest.mark.parametrize("shape", SHAPES)
@pytest.mark.parametrize("mode", ["fan_in", "fan_out"])
@pytest.mark.parametrize("nonlinearity,a", [("leaky_relu", math.sqrt(5)), ("relu", 0.0), ("tanh", 0.0)])
def test_kaiming_matches_torch_formula_and_draws(shape, mode, nonlinearity, a):
    receptive = math.prod(shape[2:])
    fan = shape[1] * receptive if mode == "fan_in" else shape[0] * receptive
    gain = {"relu": math.sqrt(2), "tanh": 5 / 3}.get(nonlinearity, math.sqrt(2 / (1 + a * a)))
    std = gain / math.sqrt(fan)
    u = init.kaiming_uniform(a, mode, nonlinearity)(KEY, shape, torch.float64)
    z = init.kaiming_normal(a, mode, nonlinearity)(KEY, shape, torch.float64)
    bound = math.sqrt(3) * std
    assert float(u.abs().max()) <= bound and float(u.abs().max()) > 0.99 * bound
    n = math.prod(shape)
    tol = 6 / math.sqrt(n)  # ~5 sigma of a sample std's relative error
    assert _rel(float(u.std()), std) < tol and _rel(float(z.std()), std) < tol
    assert abs(float(z.mean())) < 6 * std / math.sqrt(n)
    t_u = _torch_std(lambda t: nn.init.kaiming_uniform_(t, a, mode, nonlinearity), shape)
    t_z = _torch_std(lambda t: nn.init.kaiming_normal_(t, a, mode, nonlinearity), shape)
    assert _rel(float(u.std()), t_u) < 2 * tol and _rel(float(z.std()), t_z) < 2 * tol


@pytest.mark.parametrize("shape", SHAPES)
@pytest.mark.parametrize("gain", [1.0, 0.5])
def test_xavier_matches_torch(shape, gain):
    receptive = math.prod(shape[2:])
    std = gain * math.sqrt(2 / ((shape[0] + shape[1]) * receptive))
    u = init.xavier_uniform(gain)(KEY, shape, torch.float64)
    z = init.xavier_normal(gain)(KEY, shape, torch.float64)
    tol = 6 / math.sqrt(math.prod(shape))
    assert float(u.abs().max()) <= math.sqrt(3) * std
    assert _rel(float(u.std()), std) < tol and _rel(float(z.std()), std) < tol
    assert _rel(float(u.std()), _torch_std(lambda t: nn.init.xavier_uniform_(t, gain), shape)) < 2 * tol
    assert _rel(float(z.std()), _torch_std(lambda t: nn.init.xavier_normal_(t, gain), shape)) < 2 * tol


def test_uniform_and_normal_moments():
    n = 40_000
    u = init.uniform(-1.0, 3.0)(KEY, (n,), torch.float64)
    assert float(u.min()) >= -1 and float(u.max()) < 3
    assert abs(float(u.mean()) - 1.0) < 5 * math.sqrt(16 / 12 / n)
    z = init.normal(2.0, 3.0)(KEY, (n,), torch.float64)
    assert abs(float(z.mean()) - 2.0) < 5 * 3 / math.sqrt(n)
    assert _rel(float(z.std()), 3.0) < 5 / math.sqrt(2 * n)
    assert init.constant(-1.5)(KEY, (2, 2)).eq(-1.5).all()
    assert init.zeros(KEY, (3,)).eq(0).all() and init.ones(KEY, (3,)).eq(1).all()


@pytest.mark.parametrize("mean,std,a,b", [(0.0, 1.0, -2.0, 2.0), (1.0, 2.0, 0.0, 5.0), (0.0, 0.02, -0.04, 0.04)])
def test_truncated_normal_moments(mean, std, a, b):
    n = 40_000
    t = init.truncated_normal(mean, std, a, b)(KEY, (n,), torch.float64)
    assert float(t.min()) >= a and float(t.max()) <= b
    alpha, beta = (a - mean) / std, (b - mean) / std
    phi = lambda x: math.exp(-x * x / 2) / math.sqrt(2 * math.pi)  # noqa: E731
    cdf = lambda x: 0.5 * (1 + math.erf(x / math.sqrt(2)))  # noqa: E731
    z = cdf(beta) - cdf(alpha)
    m = mean + std * (phi(alpha) - phi(beta)) / z
    var = std**2 * (1 + (alpha * phi(alpha) - beta * phi(beta)) / z - ((phi(alpha) - phi(beta)) / z) ** 2)
    assert abs(float(t.mean()) - m) < 5 * math.sqrt(var / n)
    assert _rel(float(t.var()), var) < 0.04


@pytest.mark.parametrize("distribution", ["truncated_normal", "normal", "uniform"])
@pytest.mark.parametrize("mode", ["fan_in", "fan_out", "fan_avg"])
def test_variance_scaling_variance(distribution, mode):
    shape = (200, 50, 3)
    fan_in, fan_out = 50 * 3, 200 * 3
    n = {"fan_in": fan_in, "fan_out": fan_out, "fan_avg": (fan_in + fan_out) / 2}[mode]
    w = init.variance_scaling(2.0, mode, distribution)(KEY, shape, torch.float64)
    assert _rel(float(w.var()), 2.0 / n) < 0.04


@pytest.mark.parametrize("shape", [(5, 5), (3, 8), (8, 3), (6, 2, 3, 3)])
def test_orthogonal(shape):
    q = init.orthogonal(2.0)(KEY, shape, torch.float64)
    m = q.reshape(shape[0], -1) / 2.0
    rows, cols = m.shape
    gram = m @ m.T if rows <= cols else m.T @ m
    assert torch.allclose(gram, torch.eye(min(rows, cols), dtype=torch.float64), atol=1e-12)
    # the same property holds for torch's own orthogonal_ (same algorithm)
    t = nn.init.orthogonal_(torch.empty(shape, dtype=torch.float64), gain=2.0).reshape(shape[0], -1) / 2.0
    tg = t @ t.T if rows <= cols else t.T @ t
    assert torch.allclose(tg, gram, atol=1e-12)


def test_orthogonal_is_haar_distributed():
    # the first entry of a Haar-random orthogonal n x n matrix has variance 1/n
    qs = fp.vmap(lambda k: init.orthogonal()(k, (4, 4), torch.float64))(fp.random.split(KEY, 2000))
    assert _rel(float(qs[:, 0, 0].var()), 0.25) < 0.12
    assert abs(float(qs[:, 0, 0].mean())) < 0.06


def test_initialisers_vmap_over_keys():
    ks = fp.random.split(KEY, 3)
    for f in (init.kaiming_uniform(), init.xavier_normal(), init.truncated_normal(std=0.1)):
        assert torch.equal(fp.vmap(lambda k, f=f: f(k, (4, 5)))(ks), torch.stack([f(k, (4, 5)) for k in ks]))


def test_errors():
    with pytest.raises(ValueError, match="fewer than 2 dimensions"):
        init.kaiming_uniform()(KEY, (5,))
    with pytest.raises(ValueError, match="`mode` must be 'fan_in' or 'fan_out'"):
        init.kaiming_normal(mode="fan_avg")(KEY, (5, 5))
    with pytest.raises(ValueError, match="`mode` must be 'fan_in', 'fan_out' or 'fan_avg'"):
        init.variance_scaling(1.0, "avg", "normal")
    with pytest.raises(ValueError, match="`distribution` must be"):
        init.variance_scaling(1.0, "fan_in", "cauchy")
    with pytest.raises(TypeError, match="`dtype` must be a floating-point"):
        init.normal()(KEY, (2,), torch.int64)
    with pytest.raises(TypeError, match="`key` must be one key"):
        init.uniform()(torch.zeros(2), (2,))
    with pytest.raises(TypeError, match="`key` must be one key"):
        init.uniform()(fp.random.split(KEY, 2), (2,))
    with pytest.raises(ValueError, match="need a <= b"):
        init.uniform(1.0, 0.0)
    with pytest.raises(ValueError, match="only shapes with 2 or more"):
        init.orthogonal()(KEY, (3,))
    with pytest.raises(ValueError, match="non-negative sizes"):
        init.zeros(KEY, (-1, 2))


# ---------------------------------------------------------------- reinitialize
def _params():
    return {
        "fc1.weight": torch.zeros(20, 10),
        "fc1.bias": torch.zeros(20),
        "fc2.weight": torch.zeros(5, 20, dtype=torch.float64),
        "fc2.bias": torch.zeros(5, dtype=torch.float64),
    }


def test_reinitialize_by_glob_keeps_the_rest():
    p = _params()
    new = init.reinitialize(KEY, p, {"*.weight": init.kaiming_uniform(), "fc2.*": init.ones})
    assert new["fc1.bias"] is p["fc1.bias"] and new["fc2.bias"].eq(1).all()  # first match wins
    assert new["fc2.weight"].dtype == torch.float64 and not new["fc2.weight"].eq(0).any()
    assert not new["fc1.weight"].eq(0).all() and p["fc1.weight"].eq(0).all()  # input untouched
    bound = math.sqrt(6 / 10)
    assert float(new["fc1.weight"].abs().max()) <= bound


def test_reinitialize_keys_depend_on_the_path_only():
    rule = {lambda path: path.endswith("weight"): init.normal()}
    a = init.reinitialize(KEY, _params(), rule)
    smaller = {"fc1.weight": torch.zeros(20, 10)}
    b = init.reinitialize(KEY, smaller, rule)
    assert torch.equal(a["fc1.weight"], b["fc1.weight"])
    assert not torch.equal(a["fc1.weight"][:5, :5].double(), a["fc2.weight"][:5, :5])
    assert torch.equal(a["fc1.weight"], init.reinitialize(KEY, _params(), rule)["fc1.weight"])
    assert not torch.equal(a["fc1.weight"], init.reinitialize(fp.random.key(1), _params(), rule)["fc1.weight"])


def test_reinitialize_on_variables_and_nested_trees():
    model = fp.functionalize(nn.Sequential(nn.Linear(3, 4), nn.LayerNorm(4)))
    v = model.init(KEY)
    new = init.reinitialize(KEY, v, {"params.1.weight": init.constant(2.0)})
    assert new["params"]["1.weight"].eq(2).all()
    assert new["params"]["0.weight"] is v["params"]["0.weight"]
    nested = {"layers": [{"w": torch.zeros(2, 2)}, {"w": torch.zeros(2, 2)}]}
    out = init.reinitialize(KEY, nested, {"layers.1.w": init.ones})
    assert out["layers"][1]["w"].eq(1).all() and out["layers"][0]["w"].eq(0).all()


def test_reinitialize_errors():
    with pytest.raises(ValueError, match=r"rules \['\*\.kernel'\] match no leaf; the paths are \['fc1.bias'"):
        init.reinitialize(KEY, _params(), {"*.kernel": init.zeros})
    with pytest.raises(TypeError, match="`rules` must be a non-empty mapping"):
        init.reinitialize(KEY, _params(), {})
    with pytest.raises(TypeError, match="matches `step`, which is not a floating-point tensor"):
        init.reinitialize(KEY, {"step": torch.tensor(3)}, {"step": init.zeros})
    with pytest.raises(ValueError, match="returned shape"):
        init.reinitialize(KEY, _params(), {"fc1.bias": lambda k, s, d: torch.zeros(3)})

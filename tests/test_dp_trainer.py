"""fp.train.DPTrainer against independent references: a per-example autograd loop with
torch.optim, the unchunked step, the noise's standard deviation, dp-accounting, and an
uninterrupted run (exact resume)."""

from __future__ import annotations

import math
import warnings

import pytest
import torch
import torch.nn.functional as F

import functorch_pipeline as fp
from functorch_pipeline import optim

F64 = torch.float64
N = 40  # examples in the toy dataset


def _params(seed=0, hidden=5):
    g = torch.Generator().manual_seed(seed)
    return {
        "fc1": {"weight": torch.randn(hidden, 4, generator=g, dtype=F64),
                "bias": torch.randn(hidden, generator=g, dtype=F64)},
        "fc2": {"weight": torch.randn(3, hidden, generator=g, dtype=F64),
                "bias": torch.randn(3, generator=g, dtype=F64)},
    }


def _data(seed=1, n=N):
    g = torch.Generator().manual_seed(seed)
    x = torch.randn(n, 4, generator=g, dtype=F64) * 2
    y = torch.randint(0, 3, (n,), generator=g)
    return x, y


def _logits(params, x):
    h = torch.tanh(F.linear(x, params["fc1"]["weight"], params["fc1"]["bias"]))
    return F.linear(h, params["fc2"]["weight"], params["fc2"]["bias"])


def loss_fn(params, batch):
    x, y = batch
    return F.cross_entropy(_logits(params, x), y, reduction="none")


def _loop_clipped_sum(params, batch, clip):
    """Each example's gradient by torch.autograd, clipped, summed."""
    x, y = batch
    leaves, td = fp.tree.flatten(params)
    total = [torch.zeros_like(p) for p in leaves]
    for i in range(x.shape[0]):
        ps = [p.detach().clone().requires_grad_(True) for p in leaves]
        loss = F.cross_entropy(_logits(fp.tree.unflatten(td, ps), x[i:i + 1]), y[i:i + 1])
        gs = torch.autograd.grad(loss, ps)
        norm = math.sqrt(sum(float((g ** 2).sum()) for g in gs))
        factor = min(1.0, clip / norm)
        total = [t + g * factor for t, g in zip(total, gs, strict=True)]
    return fp.tree.unflatten(td, total)


def _trainer(inner, sigma=0.0, chunk=None, method="auto", q=0.25, clip=0.7):
    return fp.train.DPTrainer(loss_fn, inner, l2_norm_clip=clip, noise_multiplier=sigma,
                              sample_rate=q, expected_batch_size=q * N,
                              max_physical_batch_size=chunk, method=method)


def _batches(steps, q=0.25, key=7, **kw):
    return list(fp.data.poisson_batches(_data(), q, key=fp.random.key(key), num_batches=steps,
                                        **kw))


@pytest.mark.parametrize("method, which", [("auto", "sgd"), ("auto", "adam"), ("hooks", "adam"),
                                           ("vmap", "sgd")])
def test_noiseless_step_is_loop_clipped_mean_then_torch_optim(method, which):
    """sigma = 0: DP-SGD / DP-Adam equal torch.optim stepped on a per-example autograd
    loop's clipped sum over the expected batch size (float64, 1e-10)."""
    clip, q = 0.7, 0.25
    inner = optim.sgd(0.3, momentum=0.9) if which == "sgd" else optim.adam(0.05)
    trainer = _trainer(inner, method=method, chunk=4)
    state = trainer.init(_params(), fp.random.key(0))
    ref = fp.tree.map(lambda p: p.clone().requires_grad_(True), _params())
    ref_leaves = fp.tree.leaves(ref)
    torch_opt = (torch.optim.SGD(ref_leaves, lr=0.3, momentum=0.9) if which == "sgd"
                 else torch.optim.Adam(ref_leaves, lr=0.05))
    for batch in _batches(3):
        assert batch[0].shape[0] > 0
        state, metrics = trainer.step(state, batch)
        want = _loop_clipped_sum(fp.tree.map(torch.Tensor.detach, ref), batch, clip)
        for p, g in zip(ref_leaves, fp.tree.leaves(want), strict=True):
            p.grad = g / (q * N)
        torch_opt.step()
        want_loss = loss_fn(fp.tree.map(torch.Tensor.detach, ref), batch)
        assert int(metrics["num_examples"]) == batch[0].shape[0]
    got = fp.tree.leaves(state.params)
    for g, w in zip(got, ref_leaves, strict=True):
        torch.testing.assert_close(g, w.detach(), rtol=0, atol=1e-10)
    assert want_loss.shape == (batch[0].shape[0],)
    assert int(state.step) == 3


def test_clipped_sum_matches_the_loop_and_reports_norms():
    trainer = _trainer(optim.sgd(0.1), chunk=3)
    batch = tuple(a[:10] for a in _data())
    total, losses, norms = trainer.clipped_sum(_params(), batch)
    assert fp.tree.allclose(total, _loop_clipped_sum(_params(), batch, 0.7), rtol=0, atol=1e-12)
    torch.testing.assert_close(losses, loss_fn(_params(), batch), rtol=0, atol=1e-12)
    x, y = batch
    for i in range(10):
        g = torch.func.grad(lambda p, i=i: loss_fn(p, (x[i:i + 1], y[i:i + 1])).sum())(_params())
        assert abs(float(norms[i]) - float(fp.tree.global_norm(g))) < 1e-12


def test_chunked_accumulation_equals_the_unchunked_step():
    """Physical chunks of 3 (and of 1) give the unchunked step, noise included."""
    runs = []
    for chunk in (None, 3, 1):
        trainer = _trainer(optim.adam(0.05), sigma=1.1, chunk=chunk)
        state = trainer.init(_params(), fp.random.key(5))
        for batch in _batches(3):
            state, _ = trainer.step(state, batch)
        runs.append(state.params)
    assert fp.tree.allclose(runs[1], runs[0], rtol=0, atol=1e-12)
    assert fp.tree.allclose(runs[2], runs[0], rtol=0, atol=1e-12)


def test_padded_batch_with_mask_equals_the_variable_size_batch():
    trainer = _trainer(optim.sgd(0.2), sigma=0.5, chunk=4)
    s_var = trainer.init(_params(), fp.random.key(2))
    s_pad = trainer.init(_params(), fp.random.key(2))
    cap = fp.data.poisson_max_batch_size(N, 0.25)
    for batch, (padded, mask) in zip(_batches(3), _batches(3, max_batch_size=cap), strict=True):
        s_var, m_var = trainer.step(s_var, batch)
        s_pad, m_pad = trainer.step(s_pad, padded, mask)
        assert int(m_pad["num_examples"]) == batch[0].shape[0]
        torch.testing.assert_close(m_pad["loss"], m_var["loss"], rtol=0, atol=1e-12)
    assert fp.tree.allclose(s_pad.params, s_var.params, rtol=0, atol=1e-12)


def test_metrics_without_a_mask_match_the_masked_step_and_a_direct_count():
    """Without a mask the step reports the mean loss, the batch size and the number of
    examples whose gradient norm (by torch.autograd, one example at a time) exceeds the
    bound: the same metrics, state and dtypes as with an all-True mask."""
    trainer = _trainer(optim.sgd(0.2), sigma=0.5, clip=0.7)
    batch = tuple(a[:13] for a in _data())
    state = trainer.init(_params(), fp.random.key(3))
    plain, m = trainer.step(state, batch)
    masked, m_mask = trainer.step(state, batch, torch.ones(13, dtype=torch.bool))
    assert fp.tree.allclose(plain.params, masked.params, rtol=0, atol=0)
    x, y = batch
    leaves, td = fp.tree.flatten(_params())
    norms = []
    for i in range(13):
        ps = [p.detach().clone().requires_grad_(True) for p in leaves]
        loss = F.cross_entropy(_logits(fp.tree.unflatten(td, ps), x[i:i + 1]), y[i:i + 1])
        norms.append(math.sqrt(sum(float((g ** 2).sum()) for g in torch.autograd.grad(loss, ps))))
    clipped = sum(n > 0.7 for n in norms)
    assert 0 < clipped < 13  # both kinds present
    for metrics in (m, m_mask):
        assert metrics["num_examples"].shape == () and metrics["num_clipped"].shape == ()
        assert metrics["num_examples"].dtype == metrics["num_clipped"].dtype == torch.int64
        assert int(metrics["num_examples"]) == 13 and int(metrics["num_clipped"]) == clipped
        torch.testing.assert_close(metrics["loss"], loss_fn(_params(), batch).mean(), rtol=0,
                                   atol=1e-14)


def test_noise_std_is_clip_times_sigma_once_per_step():
    """The noise on the sum has std C * sigma: recovered from (noisy - noiseless) updates
    of plain SGD(lr=1) on a 120 x 100 layer (12k draws per step, std within ~1%)."""
    clip, sigma, q = 0.5, 2.0, 0.25

    def wide_loss(params, batch):
        x, y = batch
        return F.cross_entropy(F.linear(x, params["w"]), y, reduction="none")

    # 120 x 100 = 12k draws, as the docstring says (it was 120 x 4: 480 draws, where a
    # correlation's std error is 0.046 against the 0.05 bound, a coin flip per key)
    params = {"w": torch.zeros(120, 100, dtype=F64)}
    data = (torch.randn(N, 100, dtype=F64), torch.randint(0, 120, (N,)))
    batches = list(fp.data.poisson_batches(data, q, key=fp.random.key(1), num_batches=4))
    kw = dict(l2_norm_clip=clip, sample_rate=q, expected_batch_size=q * N,
              max_physical_batch_size=3)
    noisy = fp.train.DPTrainer(wide_loss, optim.sgd(1.0), noise_multiplier=sigma, **kw)
    clean = fp.train.DPTrainer(wide_loss, optim.sgd(1.0), noise_multiplier=0.0, **kw)
    s_noisy, s_clean = noisy.init(params, fp.random.key(3)), clean.init(params, fp.random.key(3))
    draws = []
    for batch in batches:
        before = s_noisy.params["w"]
        s_noisy, _ = noisy.step(s_noisy, batch)
        s_clean = s_clean.replace(params={"w": before})
        s_clean, _ = clean.step(s_clean, batch)
        draws.append((s_clean.params["w"] - s_noisy.params["w"]) * (q * N))  # the noise on the sum
    for d in draws:
        assert abs(float(d.std()) / (clip * sigma) - 1) < 0.04  # 12k draws: ~0.65% std error
        assert abs(float(d.mean())) < 5 * clip * sigma / math.sqrt(d.numel())
    # fresh noise each step: draws of different steps are uncorrelated
    corr = torch.corrcoef(torch.stack([draws[0].flatten(), draws[1].flatten()]))[0, 1]
    assert abs(float(corr)) < 0.05


def test_exact_resume_through_save_and_load(tmp_path):
    """N steps straight == k steps, fp.save, fp.load (fresh objects), N - k steps: bit
    for bit, including the noise, the optimizer state and the accountant."""
    batches = _batches(6)
    trainer = _trainer(optim.adam(0.05), sigma=1.0, chunk=4)
    straight = trainer.init(_params(), fp.random.key(11), accountant="pld")
    for batch in batches:
        straight, _ = trainer.step(straight, batch)

    state = trainer.init(_params(), fp.random.key(11), accountant="pld")
    for batch in batches[:3]:
        state, _ = trainer.step(state, batch)
    fp.save(tmp_path / "dp.safetensors", state)
    restored = fp.load(tmp_path / "dp.safetensors")
    assert isinstance(restored, fp.train.DPTrainState)
    again = _trainer(optim.adam(0.05), sigma=1.0, chunk=4)  # a new process would rebuild it
    for batch in batches[3:]:
        restored, _ = again.step(restored, batch)
    for a, b in zip(fp.tree.leaves(restored), fp.tree.leaves(straight), strict=True):
        if isinstance(a, torch.Tensor):
            assert torch.equal(a, b)
        else:
            assert a == b
    assert restored.accountant == straight.accountant
    assert restored.accountant.steps == 6 and int(restored.step) == 6


def test_accountant_steps_alongside():
    pytest.importorskip("dp_accounting")
    trainer = _trainer(optim.sgd(0.1), sigma=1.3, q=0.25)
    state = trainer.init(_params(), fp.random.key(0))
    for batch in _batches(4):
        state, _ = trainer.step(state, batch)
    want = fp.privacy.epsilon(noise_multiplier=1.3, sample_rate=0.25, steps=4, delta=1e-5)
    assert abs(state.accountant.epsilon(1e-5) - want) < 1e-9


def test_empty_logical_batch_still_adds_noise_and_counts():
    trainer = _trainer(optim.sgd(1.0), sigma=1.0)
    state = trainer.init(_params(), fp.random.key(0))
    empty = tuple(a[:0] for a in _data())
    new, metrics = trainer.step(state, empty)
    assert int(metrics["num_examples"]) == 0 and int(new.step) == 1
    assert new.accountant.steps == 1
    assert not fp.tree.allclose(new.params, state.params)  # the noise moved them


def test_train_step_accepts_a_dp_state():
    """The non-private step works on the same state, and the accountant records it as a
    step without noise (epsilon inf from then on)."""
    trainer = _trainer(optim.sgd(0.1), sigma=1.0)
    state = trainer.init(_params(), fp.random.key(0))
    plain = optim.sgd(0.1)
    state = state.replace(opt_state=plain.init(state.params))
    batch = _data()
    with pytest.warns(UserWarning, match="not private"):
        new, _ = fp.train.train_step(state, batch, lambda p, b, batch, k: (loss_fn(p, batch).mean(), b),
                                     plain)
    assert isinstance(new, fp.train.DPTrainState)
    assert new.accountant == state.accountant.step_without_noise(sample_rate=1.0)
    assert new.accountant.epsilon(1e-5) == math.inf
    want = fp.tree.add_scale(state.params, -0.1, fp.grad(lambda p: loss_fn(p, batch).mean())(
        state.params))
    assert fp.tree.allclose(new.params, want, rtol=0, atol=1e-12)


def test_bad_input_is_named():
    with pytest.raises(ValueError, match=r"DPTrainer: `sample_rate` must be in \(0, 1.0\], "
                                         r"got 1.5"):
        _trainer(optim.sgd(0.1), q=1.5)
    with pytest.raises(ValueError, match=r"DPTrainer: `l2_norm_clip` must be > 0, got 0"):
        _trainer(optim.sgd(0.1), clip=0)
    with pytest.raises(TypeError, match=r"DPTrainer: `max_physical_batch_size` must be an int"):
        _trainer(optim.sgd(0.1), chunk=2.5)
    trainer = _trainer(optim.sgd(0.1))
    state = trainer.init(_params(), fp.random.key(0))
    x, y = _data()
    with pytest.raises(ValueError, match=r"DPTrainer.clipped_sum: `mask` must be a bool tensor "
                                         r"of shape \(40,\)"):
        trainer.step(state, (x, y), torch.ones(39, dtype=torch.bool))
    with pytest.raises(ValueError, match=r"leaf at path `\[1\]` of the batch has 39 rows but the "
                                         r"first leaf has 40"):
        trainer.step(state, (x, y[:39]))
    with pytest.raises(TypeError, match=r"DPTrainer.step: `state` must be a DPTrainState"):
        trainer.step(fp.train.TrainState.create(_params(), (), fp.random.key(0)), (x, y))
    with pytest.raises(TypeError, match=r"DPTrainer.init: `key` must be an fp.random key"):
        trainer.init(_params(), 0)


@pytest.mark.parametrize("method", ["auto", "ghost", "hooks"])
def test_a_mask_needs_per_example_losses(method):
    # A scalar (mean) loss with a padding mask failed inside the masking with torch's
    # "shape '[]' is invalid for input of size 40".
    def mean_loss(params, batch):
        return loss_fn(params, batch).mean()

    trainer = fp.train.DPTrainer(mean_loss, optim.sgd(0.1), l2_norm_clip=0.7, noise_multiplier=0.0,
                                 sample_rate=0.25, expected_batch_size=10.0, method=method)
    state = trainer.init(_params(), fp.random.key(0))
    with pytest.raises(ValueError, match=r"with a `mask`, loss_fn must return one loss per "
                                         r"example, shape \(40,\), got shape \(\)"):
        trainer.step(state, _data(), torch.ones(N, dtype=torch.bool))


@pytest.mark.parametrize("trainable", [False, {"fc1": False, "fc2": False}])
def test_nothing_trainable_is_refused_at_init(trainable):
    # Every leaf frozen passed init, then step failed with a bare IndexError.
    trainer = fp.train.DPTrainer(loss_fn, optim.sgd(0.1), l2_norm_clip=0.7, noise_multiplier=1.0,
                                 sample_rate=0.25, expected_batch_size=10.0, trainable=trainable)
    with pytest.raises(ValueError, match=r"DPTrainer.init: `trainable` marks no parameter trainable"):
        trainer.init(_params(), fp.random.key(0))


def test_step_equals_opacus_dp_optimizer_without_noise():
    """Opacus' own DP-SGD step (GradSampleModule + DPOptimizer over torch.optim.SGD, mean
    loss, Poisson-style expected batch size) on the same conv net, parameters and batch:
    the same update up to Opacus' 1e-6 in the clip factor's denominator (float64). Needs
    the `bench` extra's opacus."""
    pytest.importorskip("opacus", reason="opacus (the `bench` extra) is not installed")
    import copy
    import warnings

    from opacus import GradSampleModule
    from opacus.optimizers import DPOptimizer

    torch.manual_seed(0)
    net = torch.nn.Sequential(torch.nn.Conv2d(1, 3, 3, 2, padding=1), torch.nn.ReLU(),
                              torch.nn.Flatten(), torch.nn.Linear(3 * 4 * 4, 5)).double()
    x, y = torch.randn(12, 1, 8, 8, dtype=F64) * 3, torch.randint(0, 5, (12,))
    params = {k: v.detach().clone() for k, v in net.named_parameters()}
    clip, lr, expected = 0.7, 0.25, 10.0
    theirs = copy.deepcopy(net)
    with warnings.catch_warnings():
        warnings.simplefilter("ignore")  # Opacus' secure-RNG and backward-hook notices
        gsm = GradSampleModule(theirs)
        opt = DPOptimizer(torch.optim.SGD(gsm.parameters(), lr=lr), noise_multiplier=0.0,
                          max_grad_norm=clip, expected_batch_size=int(expected))
        opt.zero_grad()
        F.cross_entropy(gsm(x), y).backward()
        opt.step()
    model = fp.functionalize(net)

    def losses(p, b):
        return F.cross_entropy(model.apply({"params": p}, b[0]), b[1], reduction="none")

    trainer = fp.train.DPTrainer(losses, optim.sgd(lr), l2_norm_clip=clip, noise_multiplier=0.0,
                                 sample_rate=0.1, expected_batch_size=expected)
    state, metrics = trainer.step(trainer.init(params, fp.random.key(0)), (x, y))
    assert int(metrics["num_clipped"]) > 0  # the bound is active
    for k, p in theirs.named_parameters():
        step = (p.detach() - params[k]).abs().max()
        assert (state.params[k] - p.detach()).abs().max() <= 1e-5 * step, k


def test_a_sequence_first_transformer_layer_is_clipped_by_ghost(recwarn):
    """An ``nn.TransformerEncoderLayer(batch_first=False)`` behind a batch-first projection:
    the default method clips it by ghost (attention and the sequence-first Linear/LayerNorm
    uses, NOTE [sequence-first inputs]) without a fallback warning, and a noiseless SGD
    step equals the per-example loop's clipped sum (float64, 1e-10)."""
    torch.manual_seed(0)
    proj = torch.nn.Linear(4, 6).double()
    layer = torch.nn.TransformerEncoderLayer(6, 2, dim_feedforward=8, dropout=0.0).double()
    params = {"proj": {k: v.detach() for k, v in proj.named_parameters()},
              "layer": {k: v.detach() for k, v in layer.named_parameters()}}

    def seq_loss(p, batch):
        x, y = batch
        h = torch.func.functional_call(proj, p["proj"], (x,)).transpose(0, 1)
        h = torch.func.functional_call(layer, p["layer"], (h,)).transpose(0, 1)
        return F.cross_entropy(h.mean(1)[:, :3], y, reduction="none")

    trainer = fp.train.DPTrainer(seq_loss, optim.sgd(1.0), l2_norm_clip=0.5, noise_multiplier=0.0,
                                 sample_rate=0.5, expected_batch_size=3.0)
    state = trainer.init(params, fp.random.key(0))
    x, y = torch.randn(3, 5, 4, dtype=F64), torch.tensor([0, 2, 1])
    new, metrics = trainer.step(state, (x, y))
    want = fp.tree.map(torch.zeros_like, params)
    for i in range(3):
        g = torch.func.grad(lambda p, i=i: seq_loss(p, (x[i:i + 1], y[i:i + 1])).sum())(params)
        factor = min(1.0, 0.5 / float(fp.tree.global_norm(g)))
        want = fp.tree.map(lambda w, gi, factor=factor: w + gi * factor, want, g)
    expected = fp.tree.map(lambda p, w: p - w / 3.0, params, want)
    assert fp.tree.allclose(new.params, expected, rtol=0, atol=1e-10)
    assert int(metrics["num_clipped"]) > 0
    assert not [w for w in recwarn if "falls back" in str(w.message)]


def _lora_and_cell_model(kind):
    """A LoRA update merged into a frozen (5, 5) weight applied with ``@``, or an
    ``nn.LSTMCell`` stepped over the sequence (NOTE [constants or batch data], NOTE
    [recurrent cells]); per-example losses of ``(B, 5, 5)`` sequences."""
    g = torch.Generator().manual_seed(3)
    frozen = torch.randn(5, 5, generator=g, dtype=F64)
    if kind == "lora":
        params = {"A": torch.randn(2, 5, generator=g, dtype=F64),
                  "B": torch.randn(5, 2, generator=g, dtype=F64) * 0.3,
                  "head": torch.randn(5, 3, generator=g, dtype=F64)}

        def losses(p, batch):
            x, y = batch
            h = torch.tanh(x @ (frozen + p["B"] @ p["A"])).mean(1)
            return F.cross_entropy(h @ p["head"], y, reduction="none")

        return params, losses
    cell = torch.nn.LSTMCell(5, 4).double()
    params = {k: v.detach() for k, v in cell.named_parameters()}
    params["head"] = torch.randn(3, 4, generator=g, dtype=F64)

    def losses(p, batch):
        x, y = batch
        state = None
        for t in range(x.shape[1]):
            state = torch.func.functional_call(cell, {k: v for k, v in p.items() if k != "head"},
                                               (x[:, t], state))
        return F.cross_entropy(F.linear(state[0], p["head"]), y, reduction="none")

    return params, losses


@pytest.mark.parametrize("kind", ["lora", "cell"])
@pytest.mark.parametrize("chunk", [None, 2])
def test_clipped_sum_with_a_mask_and_chunks_on_this_stops_rules(kind, chunk):
    """Masked rows dropped, physical chunks summed, a batch of 5 sequences of 5 steps
    (as long as the batch: padded runs), against the per-example loop."""
    params, losses = _lora_and_cell_model(kind)
    g = torch.Generator().manual_seed(4)
    x, y = torch.randn(5, 5, 5, generator=g, dtype=F64), torch.randint(0, 3, (5,), generator=g)
    mask = torch.tensor([True, False, True, True, False])
    trainer = fp.train.DPTrainer(losses, optim.sgd(1.0), l2_norm_clip=0.5, noise_multiplier=0.0,
                                 sample_rate=0.5, expected_batch_size=5.0,
                                 max_physical_batch_size=chunk)
    total, _, norms = trainer.clipped_sum(params, (x, y), mask)
    assert float(norms[~mask].abs().max()) == 0.0
    want = {k: torch.zeros_like(v) for k, v in params.items()}
    for i in range(5):
        ps = {k: v.clone().requires_grad_(True) for k, v in params.items()}
        grads = torch.autograd.grad(losses(ps, (x[i:i + 1], y[i:i + 1])).sum(), list(ps.values()))
        norm = math.sqrt(sum(float((gr ** 2).sum()) for gr in grads))
        if mask[i]:  # a masked row's loss, and so its norm, is zeroed
            assert abs(float(norms[i]) - norm) <= 1e-10 * max(1.0, norm)
            for k, gr in zip(ps, grads, strict=True):
                want[k] += gr * min(1.0, 0.5 / norm)
    for k in want:
        torch.testing.assert_close(total[k], want[k], rtol=0, atol=1e-10)


@pytest.mark.parametrize("name, value, want", [
    ("noise_multiplier", float("inf"), r"a finite number >= 0, got inf"),
    ("noise_multiplier", float("nan"), r"a finite number >= 0, got nan"),
    ("noise_multiplier", -1.0, r"a finite number >= 0, got -1.0"),
    ("expected_batch_size", float("inf"), r"a finite number > 0, got inf"),
    ("expected_batch_size", float("nan"), r"a finite number > 0, got nan"),
    ("expected_batch_size", 0.0, r"a finite number > 0, got 0.0"),
])
def test_non_finite_arguments_are_refused_by_the_constructor(name, value, want):
    """sigma = inf failed later, in every step, under the accountant's name; an infinite
    expected batch size made every update silently 0."""
    kw = dict(l2_norm_clip=1.0, noise_multiplier=1.0, sample_rate=0.25, expected_batch_size=10.0)
    with pytest.raises(ValueError, match=rf"^DPTrainer: `{name}` must be {want}$"):
        fp.train.DPTrainer(loss_fn, optim.sgd(0.1), **{**kw, name: value})


def test_infinite_clip_needs_sigma_zero():
    """C = inf (no clipping) is allowed without noise only; the error names DPTrainer."""
    kw = dict(sample_rate=0.25, expected_batch_size=10.0)
    fp.train.DPTrainer(loss_fn, optim.sgd(0.1), l2_norm_clip=math.inf, noise_multiplier=0.0, **kw)
    with pytest.raises(ValueError, match=r"^DPTrainer: `l2_norm_clip` must be finite when "
                                         r"noise_multiplier > 0 .*got inf$"):
        fp.train.DPTrainer(loss_fn, optim.sgd(0.1), l2_norm_clip=math.inf, noise_multiplier=1.0,
                           **kw)


def test_noise_free_steps_void_the_privacy_claim_and_survive_save_and_load(tmp_path):
    """sigma = 0 steps recorded nothing: epsilon(1e-5) was 0.0 (perfect privacy) for a
    non-private run, and a finite epsilon once noisy steps followed. Any noise-free step
    means no guarantee (epsilon = inf, delta = 1) from then on, across fp.save / fp.load."""
    pytest.importorskip("dp_accounting")
    plain = _trainer(optim.sgd(0.1), sigma=0.0)
    state = plain.init(_params(), fp.random.key(0))
    for batch in _batches(3):
        state, _ = plain.step(state, batch)
    acc = state.accountant
    assert acc.steps == int(state.step) == 3
    assert acc.epsilon(1e-5) == math.inf and acc.delta(1.0) == 1.0
    noisy = _trainer(optim.sgd(0.1), sigma=1.3)  # continue privately from the same state
    path = tmp_path / "ckpt.safetensors"
    fp.save(path, state)
    resumed = fp.load(path)
    assert resumed.accountant == acc
    for batch in _batches(2, key=8):
        state, _ = noisy.step(state, batch)
        resumed, _ = noisy.step(resumed, batch)
    assert resumed.accountant == state.accountant
    for a in (state.accountant, resumed.accountant):
        assert a.steps == 5 and a.epsilon(1e-5) == math.inf and a.delta(5.0) == 1.0
    # the noisy steps alone: what dp-accounting says for 2 steps (a finite epsilon)
    alone = _trainer(optim.sgd(0.1), sigma=1.3).init(_params(), fp.random.key(0))
    for batch in _batches(2, key=8):
        alone, _ = noisy.step(alone, batch)
    want = fp.privacy.epsilon(noise_multiplier=1.3, sample_rate=0.25, steps=2, delta=1e-5)
    assert abs(alone.accountant.epsilon(1e-5) - want) < 1e-9 and math.isfinite(want)


# -- NOTE [frozen parameters in DP-SGD] --------------------------------------------------------

FROZEN_FC1 = {"fc1": {"weight": False, "bias": False}, "fc2": {"weight": True, "bias": True}}


def _loop_clipped_sum_of_trained(params, batch, clip, trainable):
    """Each example's gradient with respect to the trained leaves alone (the frozen ones as
    constants, as Opacus treats parameters without requires_grad), clipped, summed."""
    x, y = batch
    leaves, td = fp.tree.flatten(params)
    flags = fp.tree.leaves(trainable)
    total = [torch.zeros_like(p) for p in leaves]
    for i in range(x.shape[0]):
        ps = [p.detach().clone().requires_grad_(f) for p, f in zip(leaves, flags, strict=True)]
        loss = F.cross_entropy(_logits(fp.tree.unflatten(td, ps), x[i:i + 1]), y[i:i + 1])
        gs = torch.autograd.grad(loss, [p for p, f in zip(ps, flags, strict=True) if f])
        norm = math.sqrt(sum(float((g ** 2).sum()) for g in gs))
        it = iter(gs)
        gs = [next(it) if f else torch.zeros_like(p) for p, f in zip(leaves, flags, strict=True)]
        total = [t + g * min(1.0, clip / norm) for t, g in zip(total, gs, strict=True)]
    return fp.tree.unflatten(td, total)


@pytest.mark.parametrize("method, chunk", [("auto", None), ("ghost", 3), ("hooks", None),
                                           ("vmap", 4)])
def test_frozen_leaves_count_in_no_norm_and_stay_fixed(method, chunk):
    # Before `trainable`, frozen leaves were trained, and freezing them in the optimizer
    # alone still clipped the trained ones by the norm of the whole gradient.
    clip, q = 0.3, 0.25
    trainer = fp.train.DPTrainer(loss_fn, optim.sgd(1.0), l2_norm_clip=clip, noise_multiplier=0.0,
                                 sample_rate=q, expected_batch_size=q * N,
                                 max_physical_batch_size=chunk, method=method,
                                 trainable=FROZEN_FC1)
    params = _params()
    batch = _data(n=10)
    total, _, norms = trainer.clipped_sum(params, batch)
    want = _loop_clipped_sum_of_trained(params, batch, clip, FROZEN_FC1)
    for got_leaf, want_leaf in zip(fp.tree.leaves(total), fp.tree.leaves(want), strict=True):
        assert torch.allclose(got_leaf, want_leaf, atol=1e-12, rtol=0)
    # the norms are the trained leaves' alone
    per = fp.per_sample_grads(lambda w, b: loss_fn({"fc1": params["fc1"], "fc2": w}, b))(
        params["fc2"], batch)
    want_norms = torch.sqrt(sum(g.flatten(1).square().sum(1) for g in fp.tree.leaves(per)))
    assert torch.allclose(norms, want_norms, atol=1e-12, rtol=0)
    state = trainer.init(params, fp.random.key(0))
    new, _ = trainer.step(state, batch)
    assert all(torch.equal(new.params["fc1"][k], params["fc1"][k]) for k in ("weight", "bias"))
    for k in ("weight", "bias"):  # sgd(1.0) on the clipped sum over the expected batch size
        assert torch.allclose(new.params["fc2"][k], params["fc2"][k] - want["fc2"][k] / (q * N),
                              atol=1e-12, rtol=0)


def test_frozen_leaves_get_no_noise_and_the_trained_ones_the_noise_of_a_model_without_them():
    # The noise covers the trained leaves alone: the same draws as a trainer whose params
    # are the trained leaves, the frozen ones closed over as constants.
    clip, q, sigma = 0.3, 0.25, 1.3
    params = _params()
    frozen = params["fc1"]
    masked = fp.train.DPTrainer(loss_fn, optim.adam(0.01), l2_norm_clip=clip,
                                noise_multiplier=sigma, sample_rate=q, expected_batch_size=q * N,
                                trainable=FROZEN_FC1)
    alone = fp.train.DPTrainer(lambda w, b: loss_fn({"fc1": frozen, "fc2": w}, b),
                               optim.adam(0.01), l2_norm_clip=clip, noise_multiplier=sigma,
                               sample_rate=q, expected_batch_size=q * N)
    s1, s2 = masked.init(params, fp.random.key(3)), alone.init(params["fc2"], fp.random.key(3))
    for batch in _batches(3):
        s1, _ = masked.step(s1, batch)
        s2, _ = alone.step(s2, batch)
    assert all(torch.equal(s1.params["fc1"][k], frozen[k]) for k in frozen)
    assert all(torch.allclose(s1.params["fc2"][k], s2.params[k],
                              atol=1e-12, rtol=0) for k in ("weight", "bias"))
    assert s1.accountant.epsilon(1e-5) == s2.accountant.epsilon(1e-5)


def test_trainable_must_match_the_parameters():
    t = fp.train.DPTrainer(loss_fn, optim.sgd(0.1), l2_norm_clip=1.0, noise_multiplier=1.0,
                           sample_rate=0.1, expected_batch_size=4.0,
                           trainable={"fc1": False, "fc3": True})
    with pytest.raises(ValueError, match=r"DPTrainer.init: no trainable for the leaf at path `fc2.bias`.*a prefix of it"):
        t.init(_params(), fp.random.key(0))
    # a prefix of the parameters' tree is a mask too
    prefix = fp.train.DPTrainer(loss_fn, optim.sgd(1.0), l2_norm_clip=0.3, noise_multiplier=0.0,
                                sample_rate=0.25, expected_batch_size=10.0,
                                trainable={"fc1": False, "fc2": True})
    full = fp.train.DPTrainer(loss_fn, optim.sgd(1.0), l2_norm_clip=0.3, noise_multiplier=0.0,
                              sample_rate=0.25, expected_batch_size=10.0, trainable=FROZEN_FC1)
    batch = _data(n=6)
    a, b = prefix.clipped_sum(_params(), batch), full.clipped_sum(_params(), batch)
    assert all(torch.equal(u, v) for u, v in zip(fp.tree.leaves(a), fp.tree.leaves(b), strict=True))
    with pytest.raises(TypeError, match=r"DPTrainer: `trainable` must be a tree of bools"):
        fp.train.DPTrainer(loss_fn, optim.sgd(0.1), l2_norm_clip=1.0, noise_multiplier=1.0,
                           sample_rate=0.1, expected_batch_size=4.0, trainable={"fc1": 0, "fc2": 1})


def test_frozen_leaves_survive_save_and_load_exactly(tmp_path):
    trainer = fp.train.DPTrainer(loss_fn, optim.adam(0.01), l2_norm_clip=0.5, noise_multiplier=1.0,
                                 sample_rate=0.25, expected_batch_size=10.0,
                                 max_physical_batch_size=3, trainable=FROZEN_FC1)
    params, batches = _params(), _batches(6)
    straight = trainer.init(params, fp.random.key(2))
    for b in batches[:3]:
        straight, _ = trainer.step(straight, b)
    fp.save(tmp_path / "s.safetensors", straight)
    resumed = fp.load(tmp_path / "s.safetensors")
    for b in batches[3:]:
        straight, _ = trainer.step(straight, b)
        resumed, _ = trainer.step(resumed, b)
    for x, y in zip(fp.tree.leaves(straight.params), fp.tree.leaves(resumed.params), strict=True):
        assert torch.equal(x, y)
    assert straight.accountant == resumed.accountant and straight.accountant.steps == 6
    assert all(torch.equal(straight.params["fc1"][k], params["fc1"][k]) for k in params["fc1"])


# NOTE [padding rows] in train/_dp.py: padding holding NaN or inf (garbage past a
# fixed-shape batch's end) made every method's clipped sum NaN, and an all-padding batch of
# zero rows NaN under a model that normalises its input, although padding rows are dropped.


@pytest.mark.parametrize("garbage", [math.nan, math.inf])
@pytest.mark.parametrize("method", ["auto", "ghost", "hooks", "vmap"])
@pytest.mark.parametrize("chunk", [None, 3])
def test_padding_rows_holding_nan_or_inf_are_dropped(garbage, method, chunk):
    params = _params()
    x, y = _data(n=5)
    xs = torch.cat([x[:2], torch.full((2, 4), garbage, dtype=F64), x[2:], torch.full((1, 4), garbage, dtype=F64)])
    ys = torch.cat([y[:2], torch.zeros(2, dtype=y.dtype), y[2:], torch.zeros(1, dtype=y.dtype)])
    mask = torch.tensor([True, True, False, False, True, True, True, False])
    trainer = _trainer(optim.sgd(1.0), chunk=chunk, method=method)
    total, losses, norms = trainer.clipped_sum(params, (xs, ys), mask)
    want = _loop_clipped_sum(params, (x, y), 0.7)
    for a, b in zip(fp.tree.leaves(total), fp.tree.leaves(want), strict=True):
        torch.testing.assert_close(a, b, rtol=1e-12, atol=1e-12)
    assert bool(torch.isfinite(losses).all()) and bool(torch.isfinite(norms).all())
    state, metrics = trainer.step(trainer.init(params, fp.random.key(0)), (xs, ys), mask)
    assert all(bool(torch.isfinite(p).all()) for p in fp.tree.leaves(state.params))
    torch.testing.assert_close(metrics["loss"], loss_fn(params, (x, y)).mean())


def test_an_all_padding_batch_adds_the_noise_an_empty_batch_adds():
    def unit_loss(params, batch):  # normalises its input: a zero row is NaN
        x, y = batch
        return loss_fn(params, (x / x.norm(dim=1, keepdim=True), y))

    kw = dict(l2_norm_clip=0.7, sample_rate=0.25, expected_batch_size=10.0)
    empty = (torch.zeros(0, 4, dtype=F64), torch.zeros(0, dtype=torch.long))
    padded, mask = fp.data.pad_batch(empty, 6)
    for sigma in (0.0, 1.3):
        trainer = fp.train.DPTrainer(unit_loss, optim.sgd(1.0), noise_multiplier=sigma, **kw)
        start = trainer.init(_params(), fp.random.key(3))
        a, _ = trainer.step(start, padded, mask)
        b, _ = trainer.step(start, empty)
        for p, q in zip(fp.tree.leaves(a.params), fp.tree.leaves(b.params), strict=True):
            assert torch.equal(p, q)
        if sigma == 0:
            assert all(torch.equal(p, q) for p, q in zip(fp.tree.leaves(a.params),
                                                        fp.tree.leaves(_params()), strict=True))


# NOTE [parameters that require grad in DPTrainer]: nn.Parameters kept every step's graph
# (317 MB over 12 steps of a small CNN) and sent auto to vmap.


def test_parameters_that_require_grad_train_as_their_values():
    leaves = [p.clone().requires_grad_() for p in fp.tree.leaves(_params())]
    params = fp.tree.unflatten(fp.tree.structure(_params()), leaves)
    trainer, plain = _trainer(optim.adam(0.1), sigma=1.0), _trainer(optim.adam(0.1), sigma=1.0)
    a, b = trainer.init(params, fp.random.key(0)), plain.init(_params(), fp.random.key(0))
    for batch in _batches(3):
        with warnings.catch_warnings():
            warnings.simplefilter("error")  # auto keeps ghost clipping: no fall-back note
            a, _ = trainer.step(a, batch)
        b, _ = plain.step(b, batch)
    for p, q in zip(fp.tree.leaves(a.params), fp.tree.leaves(b.params), strict=True):
        assert not p.requires_grad and p.grad_fn is None
        assert torch.equal(p, q)

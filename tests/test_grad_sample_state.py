"""NOTE [runs that change module state] (``_grad_sample/_state.py``): a model that updates
its buffers in its forward (``spectral_norm`` in training mode, a norm layer with
``track_running_stats``) gets the gradient of one forward from its state before the call,
and ends the call as one forward of the batch leaves it, however many runs the fast
methods needed (padded runs, a refusal and the fall-back to ``vmap``).

The reference is a per-example autograd loop, each example from the state before the call,
and the state one ``torch.no_grad()`` forward of the batch leaves."""

from __future__ import annotations

import warnings

import pytest
import torch
import torch.nn.functional as F
from per_example_reference import StraightThrough
from per_example_reference import float64_default  # noqa: F401 (autouse fixture)
from per_example_reference import loop_grads
from per_example_reference import params_of
from torch import nn
from torch.func import functional_call
from torch.nn.utils import parametrizations

import functorch_pipeline as fp
from functorch_pipeline.transforms._grad_sample import _state

pytestmark = pytest.mark.filterwarnings("ignore::UserWarning")


def _state_of(m: nn.Module) -> dict[str, torch.Tensor]:
    return {k: v.clone() for k, v in m.state_dict().items()}


def _loop_from(m: nn.Module, state: dict, losses, params, x, y) -> dict[str, torch.Tensor]:
    """One autograd gradient per example, each from ``state``."""
    rows = []
    for i in range(x.shape[0]):
        m.load_state_dict(state)
        p = {k: v.clone().requires_grad_() for k, v in params.items()}
        grads = torch.autograd.grad(losses(p, x[i:i + 1], y[i:i + 1]).sum(), list(p.values()),
                                    allow_unused=True)
        rows.append([torch.zeros_like(v) if g is None else g for v, g in zip(p.values(), grads, strict=True)])
    return {k: torch.stack([r[j] for r in rows]) for j, k in enumerate(params)}


def _after_one_forward(m: nn.Module, state: dict, x: torch.Tensor) -> dict[str, torch.Tensor]:
    m.load_state_dict(state)
    with torch.no_grad():
        m(x)
    return _state_of(m)


def _references(m: nn.Module, losses, params, x, y) -> tuple[dict, dict]:
    """The loop's gradients from ``m``'s state, and the state one forward leaves; ``m`` is
    left as it was."""
    state = _state_of(m)
    want = _loop_from(m, state, losses, params, x, y)
    one = _after_one_forward(m, state, x)
    m.load_state_dict(state)
    return want, one


def _assert_grads(got: dict, want: dict, atol: float) -> None:
    for k in want:
        torch.testing.assert_close(got[k], want[k], rtol=0, atol=atol, msg=k)


def _assert_states_equal(m: nn.Module, want: dict[str, torch.Tensor]) -> None:
    got = m.state_dict()
    for k, v in want.items():
        torch.testing.assert_close(got[k], v, rtol=0, atol=1e-12, msg=k)


def _losses_of(m: nn.Module, calls: list[int]):
    def losses(p, x, y):
        calls.append(x.shape[0])
        return F.cross_entropy(functional_call(m, p, (x,)), y, reduction="none")
    return losses


@pytest.mark.parametrize("old_style", [False, True])
@pytest.mark.parametrize("method", ["auto", "hooks"])
def test_spectral_norm_in_training_first_call_per_batch_size(method, old_style):
    # A Linear whose output count is the batch size: the first call per batch size runs
    # padded, and each run advanced the power iteration (error 0.27 with the old form).
    torch.manual_seed(0)
    wrap = torch.nn.utils.spectral_norm if old_style else parametrizations.spectral_norm
    m = nn.Sequential(wrap(nn.Linear(5, 4 if not old_style else 8)), nn.Tanh(), nn.Linear(4 if not old_style else 8, 3)).train()
    calls: list[int] = []
    losses = _losses_of(m, calls)
    params = params_of(m)
    fn = fp.per_sample_grads(losses, method=method)
    for B in (4, 4, 8, 5):  # the first call per size runs more than once
        x, y = torch.randn(B, 5), torch.randint(0, 3, (B,))
        want, one = _references(m, losses, params, x, y)
        calls.clear()
        got = fn(params, x, y)
        _assert_grads(got, want, 1e-10)
        _assert_states_equal(m, one)
    assert len(calls) >= 1


def test_spectral_norm_padded_run_with_has_aux():
    # has_aux: a padded run gives the answers, then an unpadded run the result.
    torch.manual_seed(1)
    m = nn.Sequential(parametrizations.spectral_norm(nn.Linear(5, 4)), nn.Tanh(), nn.Linear(4, 3)).train()
    calls: list[int] = []
    losses = _losses_of(m, calls)
    params = params_of(m)
    x, y = torch.randn(4, 5), torch.randint(0, 3, (4,))
    want, one = _references(m, losses, params, x, y)
    grads, aux = fp.per_sample_grads(lambda p, x, y: (losses(p, x, y), x.shape[0]),
                                     has_aux=True, method="hooks")(params, x, y)
    assert aux == 4
    assert len(calls) >= 2
    _assert_grads(grads, want, 1e-10)
    _assert_states_equal(m, one)


class _SeqInstanceNorm(nn.Module):
    def __init__(self, T: int, D: int = 3) -> None:
        super().__init__()
        self.lin = nn.Linear(D, D)
        self.norm = nn.InstanceNorm1d(D, affine=True, track_running_stats=True)
        self.out = nn.Linear(D * T, 3)

    def forward(self, x):
        return self.out(self.norm(self.lin(x).transpose(1, 2)).flatten(1))


@pytest.mark.parametrize("api", ["per_sample_grads", "norms_ghost", "clipped_hooks"])
def test_running_stats_from_the_real_batch_when_padded_every_call(api):
    # T == B: every call runs padded; the running statistics came from the padded batch
    # (copies of the first example), 2e-3 off one forward of the batch.
    B = T = 4
    torch.manual_seed(2)
    m = _SeqInstanceNorm(T).train()
    calls: list[int] = []
    losses = _losses_of(m, calls)
    params = params_of(m)
    if api == "per_sample_grads":
        fn = fp.per_sample_grads(losses, method="hooks")
    elif api == "norms_ghost":
        fn = fp.per_sample_grad_norms(losses, method="ghost")
    else:
        fn = fp.clipped_grad(losses, 1.0, method="hooks")
    for _ in range(2):
        x, y = torch.randn(B, T, 3) * 2 + 1, torch.randint(0, 3, (B,))
        want, one = _references(m, losses, params, x, y)
        calls.clear()
        out = fn(params, x, y)
        assert B + 1 in calls  # it did run padded
        _assert_states_equal(m, one)
        if api == "per_sample_grads":
            _assert_grads(out, want, 1e-10)
        else:
            ref = torch.cat([g.flatten(1) for g in want.values()], 1).norm(dim=1)
            norms = out if api == "norms_ghost" else out[1]
            torch.testing.assert_close(norms, ref, rtol=0, atol=1e-10)


def _spectral_and_refused_head(seed: int):
    """A spectral-normed layer in training (its forward advances its state) and a head
    whose weight goes through a custom Function, which the fast methods refuse."""
    torch.manual_seed(seed)
    sn = parametrizations.spectral_norm(nn.Linear(5, 6)).train()
    head = nn.Linear(6, 3)
    m = nn.ModuleDict({"sn": sn, "head": head})

    def losses(p, x, y):
        h = torch.tanh(functional_call(sn, {k[3:]: v for k, v in p.items() if k.startswith("sn.")}, (x,)))
        w = StraightThrough.apply(p["head.weight"])
        return F.cross_entropy(F.linear(h, w, p["head.bias"]), y, reduction="none")

    return m, sn, losses


def _sn_references(m: nn.Module, sn: nn.Module, losses, params, x, y) -> tuple[dict, dict]:
    """The loop's gradients from ``m``'s state, and the state one forward of ``sn`` leaves
    (the head holds none); ``m`` is left as it was."""
    state = _state_of(m)
    want = _loop_from(m, state, losses, params, x, y)
    m.load_state_dict(state)
    with torch.no_grad():
        sn(x)
    one = _state_of(m)
    m.load_state_dict(state)
    return want, one


def test_state_put_back_before_the_fall_back_to_vmap():
    # The engine refuses the custom Function on a weight after the spectral norm's forward
    # ran; auto then runs vmap. The state must be advanced once, not twice.
    m, sn, losses = _spectral_and_refused_head(3)

    params = params_of(m)
    x, y = torch.randn(7, 5), torch.randint(0, 3, (7,))
    want, one = _sn_references(m, sn, losses, params, x, y)
    with warnings.catch_warnings():
        warnings.simplefilter("ignore")
        got = fp.per_sample_grads(losses)(params, x, y)
    _assert_grads(got, want, 1e-10)
    _assert_states_equal(m, one)


@pytest.mark.parametrize("api", ["per_sample_grads", "clipped_grad"])
def test_chunks_refused_late_put_back_every_chunk(api):
    # The second chunk is refused (a branch on its size); the first chunk's state
    # change is undone too, so auto's vmap run starts from the call's state: the same
    # numbers and state as method="vmap" with the same chunks.
    torch.manual_seed(4)
    sn = parametrizations.spectral_norm(nn.Linear(5, 7)).train()
    head = nn.Linear(7, 3)
    m = nn.ModuleDict({"sn": sn, "head": head})

    calls = []

    def losses(p, x, y):
        calls.append(x.shape)
        h = torch.tanh(functional_call(sn, {k[3:]: v for k, v in p.items() if k.startswith("sn.")}, (x,)))
        w = p["head.weight"]
        if x.shape[0] == 3:  # the last chunk of the fast methods (never in vmap)
            w = StraightThrough.apply(w)
        return F.cross_entropy(F.linear(h, w, p["head.bias"]), y, reduction="none")

    params = params_of(m)
    x, y = torch.randn(7, 5), torch.randint(0, 3, (7,))
    state = _state_of(m)
    if api == "per_sample_grads":
        def make(method):
            return fp.per_sample_grads(losses, method=method, chunk_size=4)
    else:
        def make(method):
            f = fp.clipped_grad(losses, 0.5, method=method, chunk_size=4)
            return lambda *a: f(*a)[0]
    want = make("vmap")(params, x, y)
    want_state = _state_of(m)
    m.load_state_dict(state)
    calls.clear()
    with pytest.raises(ValueError, match="custom torch.autograd.Function StraightThrough"):
        make("ghost" if api == "clipped_grad" else "hooks")(params, x, y)
    assert [c[0] for c in calls] == [4, 3]  # the second chunk refused, unpadded
    _assert_states_equal(m, state)  # and both chunks undone
    with warnings.catch_warnings():
        warnings.simplefilter("ignore")
        got = make("auto")(params, x, y)
    _assert_grads(got, want, 1e-12)
    _assert_states_equal(m, want_state)


class _Counter(nn.Module):
    """A buffer too large to copy, changed in every forward."""

    def __init__(self, n: int) -> None:
        super().__init__()
        self.register_buffer("seen", torch.zeros(n))

    def forward(self, h):
        self.seen.add_(1.0)
        return h


def test_a_change_too_large_to_copy_in_a_discarded_run_is_an_error(monkeypatch):
    monkeypatch.setattr(_state, "_MAX_COPY_BYTES", 64)
    monkeypatch.setattr(_state, "_ALWAYS_COPY_BYTES", 32)
    B = T = 4
    torch.manual_seed(5)
    m = nn.Sequential(_Counter(100), _SeqInstanceNorm(T)).train()
    losses = _losses_of(m, [])
    with pytest.raises(_state.StateLost, match=r"per_sample_grads.*'seen' of a _Counter.*method='vmap'"):
        fp.per_sample_grads(losses, method="hooks")(params_of(m), torch.randn(B, T, 3), torch.randint(0, 3, (B,)))


def test_a_large_buffer_that_does_not_change_is_fine(monkeypatch):
    monkeypatch.setattr(_state, "_MAX_COPY_BYTES", 64)
    B = T = 4
    torch.manual_seed(6)
    m = _SeqInstanceNorm(T).train()
    m.register_buffer("table", torch.randn(100))
    losses = _losses_of(m, [])
    x, y = torch.randn(B, T, 3), torch.randint(0, 3, (B,))
    state = _state_of(m)
    one = _after_one_forward(m, state, x)
    m.load_state_dict(state)
    fp.per_sample_grads(losses, method="hooks")(params_of(m), x, y)
    _assert_states_equal(m, one)


def test_snapshot_sees_a_kernel_update_without_a_version_bump():
    # batch_norm's kernel updates running_mean without bumping its version counter.
    bn = nn.BatchNorm1d(3).train()
    v = bn.running_mean._version
    with _state.Snapshot() as s:
        bn(torch.randn(5, 3) + 4)
        assert bn.running_mean._version == v
        assert "BatchNorm1d.running_mean" in s.changed()
        s.restore()
        assert s.changed() == []
    assert torch.equal(bn.running_mean, torch.zeros(3))
    assert int(bn.num_batches_tracked) == 0


def test_snapshot_hook_removed_after_use():
    hooks = torch.nn.modules.module._global_forward_pre_hooks
    before = len(hooks)
    with _state.Snapshot():
        with _state.Snapshot():
            assert len(hooks) == before + 1
    assert len(hooks) == before


@pytest.mark.parametrize("method", ["hooks", "vmap", "auto", "clipped_ghost"])
def test_each_chunk_starts_from_the_call_state(method):
    # chunk_size gave each chunk the state the previous chunk left (old spectral_norm:
    # 0.20 off the loop, state 0.34 off one forward, in every method).
    torch.manual_seed(7)
    m = nn.Sequential(torch.nn.utils.spectral_norm(nn.Linear(5, 7)), nn.Tanh(), nn.Linear(7, 3)).train()
    losses = _losses_of(m, [])
    params = params_of(m)
    x, y = torch.randn(9, 5), torch.randint(0, 3, (9,))
    want, one = _references(m, losses, params, x, y)
    if method == "clipped_ghost":
        total, norms = fp.clipped_grad(losses, 0.4, method="ghost", chunk_size=3)(params, x, y)
        ref = torch.cat([g.flatten(1) for g in want.values()], 1).norm(dim=1)
        torch.testing.assert_close(norms, ref, rtol=0, atol=1e-10)
        c = (0.4 / ref).clamp(max=1.0)
        for k in params:
            torch.testing.assert_close(total[k], (c.view(-1, *[1] * (want[k].dim() - 1)) * want[k]).sum(0),
                                       rtol=0, atol=1e-10, msg=k)
    else:
        got = fp.per_sample_grads(losses, method=method, chunk_size=3)(params, x, y)
        _assert_grads(got, want, 1e-10)
    _assert_states_equal(m, one)


def test_chunks_leave_the_running_stats_of_the_whole_batch():
    torch.manual_seed(8)
    m = _SeqInstanceNorm(5).train()
    losses = _losses_of(m, [])
    params = params_of(m)
    x, y = torch.randn(8, 5, 3) * 2 + 1, torch.randint(0, 3, (8,))
    want, one = _references(m, losses, params, x, y)
    got = fp.per_sample_grads(losses, method="hooks", chunk_size=3)(params, x, y)
    _assert_grads(got, want, 1e-10)
    _assert_states_equal(m, one)


@pytest.mark.parametrize("chunk_size", [None, 2])
def test_buffers_among_the_differentiated_arguments(chunk_size):
    # The snapshot held the engine's stand-ins of the buffers: a StaleTracked error.
    torch.manual_seed(9)
    B = 4
    m = nn.Sequential(torch.nn.utils.spectral_norm(nn.Linear(5, B)), nn.Tanh(), nn.Linear(B, 3)).train()
    losses = _losses_of(m, [])
    params = {**params_of(m), **{k: v.detach() for k, v in m.named_buffers()}}
    x, y = torch.randn(B, 5), torch.randint(0, 3, (B,))
    want, one = _references(m, losses, params, x, y)
    got = fp.per_sample_grads(losses, method="hooks", chunk_size=chunk_size)(params, x, y)
    _assert_grads(got, want, 1e-10)
    _assert_states_equal(m, one)


class _EMA(nn.Module):
    """``x`` minus a running mean of ``x`` (the mean before this forward), updated in place
    or by reassignment."""

    def __init__(self, d: int, in_place: bool) -> None:
        super().__init__()
        self.in_place = in_place
        self.register_buffer("mu", torch.zeros(d))

    def forward(self, x):
        with torch.no_grad():
            new = 0.5 * self.mu + 0.5 * x.mean((0, 1))
        out = x - self.mu.clone()
        if self.in_place:
            self.mu.copy_(new)
        else:
            self.mu = new
        return out


class _WithEMA(nn.Module):
    def __init__(self, T: int, in_place: bool, direct: bool, D: int = 3) -> None:
        super().__init__()
        self.direct = direct
        self.lin, self.ema, self.out = nn.Linear(D, D), _EMA(D, in_place), nn.Linear(D * T, 3)

    def forward(self, x):
        h = self.ema.forward(x) if self.direct else self.ema(x)
        return self.out(torch.tanh(self.lin(h)).transpose(1, 2).flatten(1))


@pytest.mark.parametrize("in_place,direct", [(False, False), (True, True)])
def test_a_reassigned_buffer_or_a_forward_called_directly(in_place, direct):
    # T == B: every call runs padded. A buffer reassigned (self.mu = new), or one of a
    # module whose forward is called directly, advanced once per run (0.61 off the loop).
    B = T = 4
    torch.manual_seed(10)
    m = _WithEMA(T, in_place, direct)
    calls: list[int] = []
    losses = _losses_of(m, calls)
    params = params_of(m)
    for method in ("hooks", "auto"):
        for _ in range(2):
            x, y = torch.randn(B, T, 3) * 2 + 1, torch.randint(0, 3, (B,))
            want, one = _references(m, losses, params, x, y)
            calls.clear()
            got = fp.per_sample_grads(losses, method=method)(params, x, y)
            assert B + 1 in calls
            _assert_grads(got, want, 1e-10)
            _assert_states_equal(m, one)


def test_only_buffers_seen_to_change_are_copied_again(monkeypatch):
    # small buffers (the 8-byte count here, for 64 KiB) are copied every call; larger ones
    # only while they are not known to stay unchanged in the module's mode
    monkeypatch.setattr(_state, "_ALWAYS_COPY_BYTES", 8)
    torch.manual_seed(11)
    m = nn.Sequential(nn.Linear(3, 3), nn.BatchNorm1d(3))
    m.register_buffer("table", torch.randn(5))
    x = torch.randn(6, 3)

    def copied(s):
        return sorted(e[4] for e in s._entries.values() if e[2] is not None)

    with _state.Snapshot() as first:
        m(x)
    assert copied(first) == ["num_batches_tracked", "running_mean", "running_var", "table"]
    with _state.Snapshot() as second:
        m(x)
    assert copied(second) == ["num_batches_tracked", "running_mean", "running_var"]
    m.eval()  # another mode: everything is copied once more
    with _state.Snapshot() as third:
        m(x)
    assert copied(third) == ["num_batches_tracked", "running_mean", "running_var", "table"]
    with _state.Snapshot() as fourth:
        m(x)
    assert copied(fourth) == ["num_batches_tracked"]


def test_a_buffer_that_changes_for_the_first_time_in_a_discarded_run_is_an_error(monkeypatch):
    monkeypatch.setattr(_state, "_ALWAYS_COPY_BYTES", 0)
    B = T = 4
    torch.manual_seed(12)
    m = _WithEMA(T, True, False)
    m.ema.register_buffer("steps", torch.zeros(()))
    losses = _losses_of(m, [])
    params = params_of(m)
    x, y = torch.randn(B, T, 3), torch.randint(0, 3, (B,))
    fp.per_sample_grads(losses, method="hooks")(params, x, y)  # "steps" did not change
    m.ema.forward = lambda h, f=m.ema.forward: (m.ema.steps.add_(1), f(h))[1]
    with pytest.raises(_state.StateLost, match=r"'steps' of a _EMA .*not copied.*method='vmap'"):
        fp.per_sample_grads(losses, method="hooks")(params, x, y)


def test_a_global_legacy_backward_hook_is_refused():
    torch.manual_seed(13)
    m = nn.Sequential(nn.Linear(5, 6), nn.Tanh(), nn.Linear(6, 3))
    losses = _losses_of(m, [])
    params = params_of(m)
    x, y = torch.randn(7, 5), torch.randint(0, 3, (7,))
    with warnings.catch_warnings():
        warnings.simplefilter("ignore")
        handle = torch.nn.modules.module.register_module_backward_hook(
            lambda mod, gi, go: tuple(None if g is None else 3 * g for g in gi))
    try:
        want = _loop_from(m, _state_of(m), losses, params, x, y)
        with pytest.raises(ValueError, match=r"register_module_backward_hook"):
            fp.per_sample_grads(losses, method="hooks")(params, x, y)
        with warnings.catch_warnings():
            warnings.simplefilter("ignore")
            got = fp.per_sample_grads(losses)(params, x, y)
    finally:
        handle.remove()
    _assert_grads(got, want, 1e-10)


def _legacy_hooked(seed: int, act: nn.Module, at: int, change) -> nn.Module:
    """An MLP whose layer ``at`` has a legacy backward hook applying ``change`` to its
    input gradients."""
    torch.manual_seed(seed)
    m = nn.Sequential(nn.Linear(5, 6), act, nn.Linear(6, 3))
    with warnings.catch_warnings():
        warnings.simplefilter("ignore")
        m[at].register_backward_hook(lambda mod, gi, go: tuple(None if g is None else change(g) for g in gi))
    return m


def test_a_legacy_backward_hook_on_a_module_without_parameters_is_followed():
    m = _legacy_hooked(14, nn.ReLU(), 1, lambda g: g.clamp(min=0))
    losses = _losses_of(m, [])
    params = params_of(m)
    x, y = torch.randn(7, 5), torch.randint(0, 3, (7,))
    want = _loop_from(m, _state_of(m), losses, params, x, y)
    got = fp.per_sample_grads(losses, method="hooks")(params, x, y)
    _assert_grads(got, want, 1e-10)


def test_a_refused_call_learns_which_buffers_changed(monkeypatch):
    # The refusal put the buffers back before the snapshot learned which changed, so it
    # learned "none": the next call did not copy spectral_norm's vectors (StateLost).
    monkeypatch.setattr(_state, "_ALWAYS_COPY_BYTES", 0)
    m, sn, losses = _spectral_and_refused_head(15)

    params = params_of(m)
    for _ in range(3):  # a new loss_fn object each step: each call tries the engine first
        x, y = torch.randn(7, 5), torch.randint(0, 3, (7,))
        want, one = _sn_references(m, sn, losses, params, x, y)
        with warnings.catch_warnings():
            warnings.simplefilter("ignore")
            got = fp.per_sample_grads(lambda p, x, y: losses(p, x, y))(params, x, y)
        _assert_grads(got, want, 1e-10)
        _assert_states_equal(m, one)


class _Branch(nn.Module):
    def __init__(self, T: int) -> None:
        super().__init__()
        self.lin = nn.Linear(3, 3)
        self.norm = nn.InstanceNorm1d(3, track_running_stats=True)
        self.out = nn.Linear(3 * T, 3)

    def forward(self, x, task):
        h = self.lin(x)
        h = self.norm(h.transpose(1, 2)).transpose(1, 2) if task == 1 else torch.tanh(h)
        return self.out(h.flatten(1))


def test_nothing_is_learned_from_a_module_that_did_not_run(monkeypatch):
    monkeypatch.setattr(_state, "_ALWAYS_COPY_BYTES", 0)
    B = T = 4  # runs padded
    torch.manual_seed(16)
    m = _Branch(T).train()
    params = params_of(m)

    def losses(p, x, y, task):
        return F.cross_entropy(functional_call(m, p, (x, task)), y, reduction="none")

    fn = fp.per_sample_grads(losses, method="hooks", batch_argnums=(1, 2))
    x, y = torch.randn(B, T, 3) * 2 + 1, torch.randint(0, 3, (B,))
    fn(params, x, y, 0)  # the norm is met with its parent, but not run
    state = _state_of(m)
    with torch.no_grad():
        m(x, 1)
    one = _state_of(m)
    m.load_state_dict(state)
    fn(params, x, y, 1)  # was StateLost
    _assert_states_equal(m, one)


def test_buffers_that_hold_no_values_or_cannot_change():
    torch.manual_seed(17)
    B = T = 4  # runs padded
    m = _SeqInstanceNorm(T).train()
    with torch.inference_mode():
        m.lin.register_buffer("table", torch.randn(3))  # an inference tensor: no version counter
    m.lin.register_buffer("shape_only", torch.empty(2, 3, device="meta"))  # torch.equal: no meta kernel
    losses = _losses_of(m, [])
    params = params_of(m)
    for fn in (fp.per_sample_grads(losses, method="hooks"),
               fp.per_sample_grad_norms(losses, method="ghost")):
        for _ in range(2):
            x, y = torch.randn(B, T, 3), torch.randint(0, 3, (B,))
            state = {k: v.clone() for k, v in m.norm.state_dict().items()}
            with torch.no_grad():
                m(x)
            one = {k: v.clone() for k, v in m.norm.state_dict().items()}
            m.norm.load_state_dict(state)
            fn(params, x, y)  # raised StateLost, or NotImplementedError for the meta buffer
            for k, v in one.items():
                torch.testing.assert_close(m.norm.state_dict()[k], v, rtol=0, atol=1e-12, msg=k)
    mlp = nn.Sequential(nn.Linear(5, 6), nn.Tanh(), nn.Linear(6, 3))
    mlp[0].register_buffer("shape_only", torch.empty(2, device="meta"))
    losses = _losses_of(mlp, [])
    x, y = torch.randn(6, 5), torch.randint(0, 3, (6,))
    want = loop_grads(losses, params_of(mlp), x, y)
    got = fp.per_sample_grads(losses, method="vmap", chunk_size=2)(params_of(mlp), x, y)
    _assert_grads(got, want, 1e-10)


def test_vmap_chunks_do_not_refuse_a_legacy_hook():
    # the refusal is the engine's: vmap (with chunks too) applies such a hook
    m = _legacy_hooked(18, nn.Tanh(), 2, lambda g: 3 * g)
    losses = _losses_of(m, [])
    params = params_of(m)
    x, y = torch.randn(6, 5), torch.randint(0, 3, (6,))
    want = _loop_from(m, _state_of(m), losses, params, x, y)
    got = fp.per_sample_grads(losses, method="vmap", chunk_size=2)(params, x, y)
    _assert_grads(got, want, 1e-10)


"""The hooks and ghost engines inside ``fp.jit`` (NOTE [engines under torch.compile]): a
compiled step that calls ``clipped_grad`` (any method), ``per_sample_grads(method="hooks")``
or ``DPTrainer.step`` gives what a per-example autograd loop gives, and what the same call
gives outside ``torch.compile``. Before, dynamo traced into the model with the engines'
tracked parameters and raised an InternalTorchDynamoError (ghost, hooks, sometimes auto),
or auto silently switched to vmap. Compiled with the "eager" backend: dynamo's tracing,
where the failure was, without code generation time."""

from __future__ import annotations

import warnings

import pytest
import torch
import torch.nn.functional as F
from per_example_reference import SmallConvNet
from per_example_reference import float64_default  # noqa: F401 (autouse fixture)
from per_example_reference import loop_grads
from per_example_reference import params_of

import functorch_pipeline as fp
from functorch_pipeline import optim

CLIP = 0.5


def _setup():
    torch.manual_seed(0)
    model = SmallConvNet(side=6)
    x, y = torch.randn(5, 1, 6, 6), torch.randint(0, 5, (5,))

    def losses(p, x, y):
        return F.cross_entropy(torch.func.functional_call(model, p, (x,)), y, reduction="none")

    return model, params_of(model), x, y, losses


def _clipped_reference(losses, params, x, y):
    grads = loop_grads(losses, params, x, y)
    norms = torch.stack([g.flatten(1).pow(2).sum(1) for g in grads.values()]).sum(0).sqrt()
    c = 1.0 / torch.clamp(norms / CLIP, min=1.0)
    return {k: (g * c.view(-1, *[1] * (g.dim() - 1))).sum(0) for k, g in grads.items()}, norms


@pytest.mark.parametrize("method", ["auto", "ghost", "hooks", "vmap"])
def test_clipped_grad_inside_a_compiled_step(method, monkeypatch):
    from functorch_pipeline.transforms import _clipped

    torch._dynamo.reset()
    _, params, x, y, losses = _setup()
    clip = fp.clipped_grad(losses, CLIP, method=method)
    vmapped = []  # auto must not switch to vmap's B x params gradients under compile
    real = _clipped._per_sample
    monkeypatch.setattr(_clipped, "_per_sample",
                        lambda *a, **k: vmapped.append(1) or real(*a, **k))

    def step(p, x, y):  # compiled work on both sides of the clipped sum
        g, norms = clip(p, x * 1.0, y)
        return {k: p[k] - 0.1 * g[k] for k in p}, norms

    with warnings.catch_warnings():
        warnings.simplefilter("ignore")  # dynamo's graph-break notes
        got, norms = fp.jit(step, backend="eager")(params, x, y)
        eager, eager_norms = step(params, x, y)
    want, want_norms = _clipped_reference(losses, params, x, y)
    for k in params:
        torch.testing.assert_close(got[k], params[k] - 0.1 * want[k], rtol=0, atol=1e-10)
    torch.testing.assert_close(norms, want_norms, rtol=0, atol=1e-10)
    if method != "vmap":  # the eager call, behind a graph break: the same method, bit for bit
        assert all(torch.equal(got[k], eager[k]) for k in params)
        assert torch.equal(norms, eager_norms)
        assert not vmapped


def test_per_sample_grads_hooks_inside_a_compiled_step():
    torch._dynamo.reset()
    _, params, x, y, losses = _setup()
    hooks = fp.per_sample_grads(losses, method="hooks")
    with warnings.catch_warnings():
        warnings.simplefilter("ignore")
        got = fp.jit(lambda p, x, y: hooks(p, x * 1.0, y), backend="eager")(params, x, y)
    want = loop_grads(losses, params, x, y)
    for k in want:
        torch.testing.assert_close(got[k], want[k], rtol=0, atol=1e-10)


@pytest.mark.parametrize("call", ["clipped_grad ghost", "per_sample_grads hooks"])
def test_fullgraph_refuses_the_engines_graph_break(call):
    """``fullgraph=True`` cannot run the engines eagerly: dynamo refuses, naming
    ``torch.compiler.disable`` (and, from torch 2.12, the reason)."""
    torch._dynamo.reset()
    _, params, x, y, losses = _setup()
    f = (fp.clipped_grad(losses, CLIP, method="ghost") if call.startswith("clipped")
         else fp.per_sample_grads(losses, method="hooks"))
    with pytest.raises(Exception, match="disable"):
        fp.jit(lambda p, x, y: f(p, x * 1.0, y), fullgraph=True, backend="eager")(params, x, y)


def test_vmap_stays_traceable_with_fullgraph():
    torch._dynamo.reset()
    _, params, x, y, losses = _setup()
    clip = fp.clipped_grad(losses, CLIP, method="vmap")
    got, norms = fp.jit(lambda p, x, y: clip(p, x * 1.0, y), fullgraph=True,
                        backend="eager")(params, x, y)
    want, want_norms = _clipped_reference(losses, params, x, y)
    for k in want:
        torch.testing.assert_close(got[k], want[k], rtol=0, atol=1e-10)
    torch.testing.assert_close(norms, want_norms, rtol=0, atol=1e-10)


def test_dp_trainer_step_compiled_matches_eager(monkeypatch):
    """A whole DPTrainer step under fp.jit: the ghost clipping runs eagerly (it used to
    switch to vmap's B x params gradients there), the noise (the tensor form of
    fp.random's hash there) and Adam compiled; float64."""
    from functorch_pipeline.transforms import _clipped

    torch._dynamo.reset()
    _, params, x, y, losses = _setup()
    vmapped = []
    real = _clipped._per_sample
    monkeypatch.setattr(_clipped, "_per_sample",
                        lambda *a, **k: vmapped.append(1) or real(*a, **k))

    def per_example(p, b):
        return losses(p, *b)

    trainer = fp.train.DPTrainer(per_example, optim.adam(1e-2), l2_norm_clip=CLIP,
                                 noise_multiplier=1.1, sample_rate=0.1, expected_batch_size=5.0)
    state = trainer.init(params, fp.random.key(3))
    with warnings.catch_warnings():
        warnings.simplefilter("ignore")
        eager, _ = trainer.step(state, (x, y))
        got, _ = fp.jit(trainer.step, backend="eager")(state, (x, y))
    for k in params:
        torch.testing.assert_close(got.params[k], eager.params[k], rtol=0, atol=1e-12)
    assert int(got.step) == int(eager.step) == 1
    assert not vmapped


_FRESH = r"""
import sys, torch, torch.nn as nn, torch.nn.functional as F
import functorch_pipeline as fp
from functorch_pipeline.transforms._grad_sample import _api
model = nn.Linear(6, 3)
def lf(p, x, y):
    return F.cross_entropy(torch.func.functional_call(model, p, (x,)), y, reduction="none")
P = {k: v.detach() for k, v in model.named_parameters()}
x, y = torch.randn(4, 6), torch.randint(0, 3, (4,))
compile = fp.jit if sys.argv[1] == "fp.jit" else torch.compile
try:
    compile(fp.clipped_grad(lf, 0.5), fullgraph=True, backend="eager")(P, x, y)
    print("NO ERROR")
except Exception as e:
    print(_api._DISABLE_TAKES_REASON)
    print(str(e).replace("\n", " "))
"""


@pytest.mark.parametrize("compile", ["fp.jit", "torch.compile"])
def test_fullgraph_names_the_reason_in_a_fresh_process(compile):
    """In a fresh process the first traced call used to build the graph-break wrapper
    itself, inside the trace, and ``fullgraph=True`` failed on that instead ("Unsupported
    hasattr call" from ``inspect.signature``, then "Call to torch.compiler.disable()"),
    naming nothing of ours. ``fp.jit`` now builds it before tracing, so the message gives
    the reason (torch >= 2.12); a bare ``torch.compile`` gets a wrapper whose name says it."""
    import subprocess
    import sys

    out = subprocess.run([sys.executable, "-c", _FRESH, compile], capture_output=True, text=True,
                         timeout=240, check=True).stdout.splitlines()
    assert out[0] != "NO ERROR"
    takes_reason, message = out[0] == "True", out[1]
    if compile == "torch.compile":
        assert "fp_hooks_and_ghost_engines_run_eagerly_under_compile_method_vmap_traces" in message
    else:
        assert "torch.compiler.disable" in message and "hasattr" not in message
        assert ("fp's hooks and ghost engines" in message) == takes_reason

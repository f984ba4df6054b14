"""Per-sample gradients of an LSTM text classifier, against the plain batch gradient.

Model: Embedding(5000, 64) -> 2-layer bidirectional LSTM(64, 64) -> Dropout(0.5) ->
Linear(128, 64) -> ReLU -> mean over time -> Linear(64, 2); cross entropy; batch 32,
sequence length 50, train mode (dropout on). The yardstick is one eager ``backward()`` of
the mean loss with ``nn.LSTM`` (fused mkldnn kernel, the fastest standard way); the batch
gradient with ``fp.nn.LSTM`` is shown too. Every row runs in the same process,
interleaved; ratios are throughput ratios (> 1 is faster than the yardstick). When ``jax``
and ``optax`` are installed, the same network and weights in JAX (``_jax_models``: the LSTM
a ``lax.scan`` over torch's cell equations) add ``jax.jit(jax.grad)`` (batch gradient) and
``jax.jit(jax.vmap(jax.grad))`` (per-example, one dropout key per example) rows, checked
in eval mode against ``vmap(grad)`` first; their compile is the "1st call s" column.

    .venv/bin/python benchmarks/per_sample_lstm.py                 # default settings
    .venv/bin/python benchmarks/per_sample_lstm.py --malloc both   # + tuned glibc malloc
    .venv/bin/python benchmarks/per_sample_lstm.py --compile       # + torch.compile(vmap(grad)), slow to compile
"""

from __future__ import annotations

import os
import sys
import time

import torch
import torch.nn.functional as F
from torch import nn

sys.path.insert(0, os.path.dirname(os.path.abspath(__file__)))
sys.path.insert(0, os.path.dirname(os.path.dirname(os.path.abspath(__file__))))

import _common  # noqa: E402
import _jax_models  # noqa: E402
from models import TextClassifier  # noqa: E402  (examples/models.py, via _common)

import functorch_pipeline as fp  # noqa: E402
from functorch_pipeline.nn import recurrent as _recurrent  # noqa: E402
from functorch_pipeline.transforms import _grad_sample  # noqa: E402

YARDSTICK = "nn.LSTM batch gradient (yardstick)"


SHIPPED = _recurrent._lstm_direction
PLAIN = getattr(SHIPPED, "__wrapped__", SHIPPED)  # the undecorated loop: per-step F.linear rules
if SHIPPED in _grad_sample._rules.RULES:
    FUSED, FUSED_NOTE = SHIPPED, "fp.nn.LSTM registers the fused direction rule"
else:
    FUSED = _grad_sample.overridable(PLAIN)
    _grad_sample.register_rule(FUSED, _grad_sample.lstm_direction_rule)
    FUSED_NOTE = ("fp.nn.LSTM does not register the fused direction rule yet: the `fused` rows "
                  "apply it in this process (overridable + register_rule on "
                  "fp.nn.recurrent._lstm_direction, see NOTE [fused LSTM direction])")


def using(direction: object, fn: object) -> object:
    """``fn`` run with ``fp.nn.recurrent._lstm_direction`` set to ``direction``."""

    def run() -> object:
        _recurrent._lstm_direction = direction
        try:
            return fn()
        finally:
            _recurrent._lstm_direction = SHIPPED

    return run


def candidates(batch: int, seq: int, loop: bool, compile_: bool) -> dict:
    torch.manual_seed(0)
    ref = TextClassifier(rnn=nn.LSTM)
    model = TextClassifier(rnn=fp.nn.LSTM)
    model.load_state_dict(ref.state_dict())
    params = {k: v.detach() for k, v in model.named_parameters()}
    ref_params = {k: v.detach() for k, v in ref.named_parameters()}
    tokens, labels = torch.randint(0, 5000, (batch, seq)), torch.randint(0, 2, (batch,))

    def losses(p: dict, t: torch.Tensor, y: torch.Tensor) -> torch.Tensor:
        return F.cross_entropy(torch.func.functional_call(model, p, (t,)), y, reduction="none")

    def one(module: nn.Module) -> object:
        def mean_loss(p: dict, t: torch.Tensor, y: torch.Tensor) -> torch.Tensor:
            return F.cross_entropy(torch.func.functional_call(module, p, (t[None],)), y[None])
        return torch.func.vmap(torch.func.grad(mean_loss), in_dims=(None, 0, 0), randomness="different")

    def batch_grad(module: nn.Module) -> object:
        def run() -> None:
            module.zero_grad(set_to_none=True)
            F.cross_entropy(module(tokens), labels).backward()
        return run

    hooks = fp.per_sample_grads(losses, method="hooks")
    vmap_fp, vmap_nn = one(model), one(ref)

    def python_loop() -> list[torch.Tensor]:
        return _common.python_loop_grads(ref, F.cross_entropy, tokens, labels)

    # Same numbers first (eval mode: no dropout), the fast method against vmap(grad).
    model.eval()
    with torch.no_grad():
        want = vmap_fp(params, tokens, labels)
        for direction in (PLAIN, FUSED):
            got = using(direction, lambda: hooks(params, tokens, labels))()
            worst = max(float((got[k] - want[k]).abs().max() / want[k].abs().max()) for k in got)
            print(f"  check (eval mode): hooks ({'fused' if direction is FUSED else 'per-step'}) vs "
                  f"vmap(grad), max relative difference {worst:.1e}")
            assert worst < 1e-4, worst
        jax_fns = _jax(ref, tokens, labels, want) if _jax_models.modules() is not None else {}
    model.train()

    default = fp.per_sample_grads(losses)
    fns = {
        YARDSTICK: batch_grad(ref),
        "fp.nn.LSTM batch gradient": batch_grad(model),
        "fp.per_sample_grads (default method)": lambda: default(params, tokens, labels),
        "fp.per_sample_grads hooks, fused rule": using(FUSED, lambda: hooks(params, tokens, labels)),
        "fp.per_sample_grads hooks, per-step": using(PLAIN, lambda: hooks(params, tokens, labels)),
        "torch.func vmap(grad), fp.nn.LSTM": lambda: vmap_fp(params, tokens, labels),
        "torch.func vmap(grad), nn.LSTM": lambda: vmap_nn(ref_params, tokens, labels),
    }
    if loop:
        fns["python loop, nn.LSTM"] = python_loop
    opacus_row = _opacus(ref, tokens, labels)
    if opacus_row is not None:
        fns["Opacus DPLSTM (GradSampleModule)"] = opacus_row
    fns.update(jax_fns)
    if compile_:
        compiled = torch.compile(vmap_fp)
        start = time.perf_counter()
        compiled(params, tokens, labels)
        print(f"  torch.compile(vmap(grad)) over fp.nn.LSTM: first call {time.perf_counter() - start:.1f} s")
        fns["torch.compile(vmap(grad)), fp.nn.LSTM"] = lambda: compiled(params, tokens, labels)
    return fns


def _jax(ref: nn.Module, tokens: torch.Tensor, labels: torch.Tensor, want: dict) -> dict:
    """The JAX rows on ``ref``'s weights, after checking their eval-mode (no dropout)
    gradients against torch's ``vmap(grad)`` result ``want``. The timed rows run in train
    mode (dropout; fixed keys, one per example for vmap), as the torch rows do."""
    jax = _jax_models.modules()[0]
    params = _jax_models.params_from_torch(ref.named_parameters())
    jt, jy = _jax_models.to_jax(tokens), _jax_models.to_jax(labels)
    batch_grad = jax.jit(jax.grad(_jax_models.text_mean_loss))
    per_example = jax.jit(jax.vmap(jax.grad(_jax_models.text_example_loss),
                                   in_axes=(None, 0, 0, 0)))
    eval_per_example = jax.jit(jax.vmap(jax.grad(_jax_models.text_example_loss),
                                        in_axes=(None, 0, 0)))
    for name, got, ref_grads in (
            ("JAX batch gradient (jit)", batch_grad(params, jt, jy),
             {k: v.mean(0) for k, v in want.items()}),
            ("JAX vmap(grad) (jit)", eval_per_example(params, jt, jy), want)):
        worst = _jax_models.max_relative_difference(got, ref_grads)
        print(f"  check (eval mode): {name} vs vmap(grad){' mean' if 'batch' in name else ''}, "
              f"max relative difference {worst:.1e}")
        assert worst < 1e-4, worst
    key, keys = jax.random.key(1), jax.random.split(jax.random.key(2), tokens.shape[0])
    return {
        "JAX batch gradient (jit)":
            lambda: jax.block_until_ready(batch_grad(params, jt, jy, key)),
        "JAX vmap(grad) (jit)":
            lambda: jax.block_until_ready(per_example(params, jt, jy, keys)),
    }


def _opacus(ref: nn.Module, tokens: torch.Tensor, labels: torch.Tensor) -> object:
    """Opacus' per-sample gradients: the model with ``opacus.layers.DPLSTM`` (same weights)
    under ``GradSampleModule``; None without opacus."""
    if _common.optional("opacus") is None:
        return None
    from opacus.layers import DPLSTM

    net = TextClassifier(rnn=DPLSTM)
    net.load_state_dict(ref.state_dict(), strict=False)  # DPLSTM names its weights per cell
    return _common.opacus_per_sample(net, F.cross_entropy, tokens, labels)


def main() -> None:
    p = _common.parser(__doc__.splitlines()[0])
    p.add_argument("--batch", type=int, default=32)
    p.add_argument("--seq", type=int, default=50)
    p.add_argument("--no-loop", action="store_true", help="skip the Python-loop baseline")
    p.add_argument("--compile", action="store_true", help="add torch.compile(vmap(grad)) (minutes to compile)")
    args = p.parse_args()
    if _common.begin(args):
        return
    print(f"  {FUSED_NOTE}")
    if _common.optional("opacus") is None:
        print("  skipped Opacus DPLSTM: `opacus` is not installed")
    if _jax_models.modules() is None:
        print(_jax_models.skip_line("JAX batch gradient and vmap(grad) (jit)"))
    else:
        print(_jax_models.threads_line())
    fns = candidates(args.batch, args.seq, not args.no_loop, args.compile)
    slow = {"torch.func vmap(grad), nn.LSTM": 3, "python loop, nn.LSTM": 3}
    stats = _common.measure(fns, rounds=args.rounds, budget_s=args.budget, every=slow,
                            apart=_jax_models.rows(fns))
    baselines = {"yardstick": YARDSTICK, "fp batch": "fp.nn.LSTM batch gradient"}
    print(_common.table(stats, baselines, args.batch,
                        f"\nper-sample gradients, LSTM text classifier, batch {args.batch}, seq {args.seq}"))


if __name__ == "__main__":
    main()
